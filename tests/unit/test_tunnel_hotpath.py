"""The per-command fast paths of both tunnel ends say what the slow ones say.

Header prefixes (agent COMPLETION, client COMMAND) against encode_header; the
reader's merged type/cap check against the error texts it always gave; the
agent's inline batches against the in-flight count and the vectored sender;
the client's OK-completion shortcut against a D2H stream left short.
"""

from __future__ import annotations

import array
import asyncio
import random
import socket
from typing import Any

import pytest

from host_agent.executors.base import DeviceIdentity, SessionLimits
from host_agent.executors.cpu import CpuExecutor
from host_agent.session import Session, SessionConfig
from host_agent.wire import SEQ_LENGTH, Sender, completion_head
from vpcie.errors import ErrorCode, ProtocolError
from vpcie.protocol.batch import encode_batch, rec
from vpcie.protocol.codes import (
    FRAME_MAGIC,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    FrameType,
    Opcode,
)
from vpcie.protocol.frames import (
    HEADER_SIZE,
    FrameReader,
    decode_payload,
    encode_completion,
    encode_frame,
    encode_header,
)
from vpcie.tunnel import client as client_mod
from vpcie.tunnel.client import TunnelClient
from vpcie.tunnel.runstate import Runstate

_EDGES = [0, 1, 0xFFFF_FFFF]
_SEQ_EDGES = [0, 1, 1 << 32, (1 << 64) - 1]


def _cases(cap: int) -> list[tuple[int, int, int]]:
    rng = random.Random(20240611)
    out = [(s, q, n) for s in _EDGES for q in _SEQ_EDGES for n in (0, cap)]
    out += [(rng.getrandbits(32), rng.getrandbits(64), rng.randrange(cap + 1)) for _ in range(300)]
    return out


def test_completion_head_is_encode_header() -> None:
    cap = MAX_PAYLOAD[FrameType.COMPLETION]
    for session, seq, n in _cases(cap):
        fast = completion_head(session) + SEQ_LENGTH.pack(seq, n)
        assert fast == encode_header(FrameType.COMPLETION, n, session=session, seq=seq)


def test_command_head_is_encode_header() -> None:
    cap = MAX_PAYLOAD[FrameType.COMMAND]
    for session, seq, n in _cases(cap):
        fast = client_mod._command_head(session) + client_mod._SEQ_LENGTH.pack(seq, n)
        assert fast == encode_header(FrameType.COMMAND, n, session=session, seq=seq)


def _raw_header(ftype: int, length: int, magic: int = FRAME_MAGIC, version: int = 0) -> bytes:
    good = encode_header(FrameType.PING, 0)
    hdr = bytearray(good)
    hdr[0:4] = magic.to_bytes(4, "little")
    hdr[4] = version or PROTOCOL_VERSION
    hdr[5] = ftype
    hdr[20:24] = length.to_bytes(4, "little")
    assert len(hdr) == HEADER_SIZE
    return bytes(hdr)


def _parse_error(data: bytes) -> str:
    reader = FrameReader()
    view = reader.get_buffer()
    view[: len(data)] = data
    with pytest.raises(ProtocolError) as err:
        reader.buffer_updated(len(data))
    assert reader.dead
    with pytest.raises(ProtocolError, match="already failed"):
        reader.buffer_updated(0)
    return str(err.value)


@pytest.mark.parametrize("ftype", [0, max(FrameType) + 1, 31, 255])
def test_reader_unknown_type(ftype: int) -> None:
    assert _parse_error(_raw_header(ftype, 0)) == f"unknown frame type {ftype}"


@pytest.mark.parametrize("ftype", list(FrameType))
def test_reader_cap_per_type(ftype: FrameType) -> None:
    cap = MAX_PAYLOAD[ftype]
    over = _parse_error(_raw_header(ftype, cap + 1))
    assert over == f"{ftype.name} frame of {cap + 1} bytes over cap"
    # At the cap: no error (the frame just waits for its payload).
    reader = FrameReader()
    data = _raw_header(ftype, cap) + b"\0" * 8
    reader.get_buffer()[: len(data)] = data
    assert reader.buffer_updated(len(data)) == [] and not reader.dead


def test_reader_magic_and_version_checked_first() -> None:
    assert _parse_error(_raw_header(255, 1 << 31, magic=1)).startswith("bad frame magic")
    assert _parse_error(_raw_header(255, 1 << 31, version=9)) == "frame version 9 not supported"


# -- the agent's inline path -------------------------------------------------------
def _session(max_inflight: int) -> tuple[Session, socket.socket, FrameReader]:
    a, b = socket.socketpair()
    reader = FrameReader()
    ex = CpuExecutor(SessionLimits(1 << 20, max_inflight), DeviceIdentity(uuid="u", agent="t"))
    return Session(a, reader, ex, SessionConfig(3, max_inflight)), b, reader


def _replies(peer: socket.socket, count: int) -> list[tuple[int, int, int]]:
    """(seq, status, ftype) of the next ``count`` frames from the session."""
    reader = FrameReader()
    out: list[tuple[int, int, int]] = []
    peer.settimeout(5.0)
    while len(out) < count:
        n = peer.recv_into(reader.get_buffer())
        assert n
        for f in reader.buffer_updated(n):
            status = decode_payload("COMPLETION", f.payload)[0]
            out.append((f.seq, status, f.type))
    return out


def test_inline_batches_are_not_counted_and_reply_in_one_write() -> None:
    sess, peer, reader = _session(max_inflight=1)
    nop = encode_batch([rec(Opcode.NOP)])
    query = encode_batch([rec(Opcode.QUERY)])
    data = b"".join(
        encode_frame(FrameType.COMMAND, batch, session=3, seq=seq)
        for seq, batch in ((1, nop), (2, query), (5, nop))
    )
    reader.get_buffer()[: len(data)] = data
    # A limit of 1 and three commands in one recv: each runs inline, none is
    # refused, and the count is back at 0.
    assert sess._handle_all(reader.buffer_updated(len(data))) is False
    assert sess.inflight == 0 and not sess.lanes
    got = _replies(peer, 3)
    assert got == [(s, 0, FrameType.COMPLETION) for s in (1, 2, 5)]
    peer.close()
    sess.sock.close()


def test_quota_still_refuses_while_a_lane_holds_the_limit() -> None:
    sess, peer, reader = _session(max_inflight=1)
    held = encode_batch([rec(Opcode.EVENT_WAIT, 4, stream=1)])  # not inline: blocks
    nop = encode_batch([rec(Opcode.NOP, stream=2)])
    data = encode_frame(FrameType.COMMAND, held, session=3, seq=1) + encode_frame(
        FrameType.COMMAND, nop, session=3, seq=2
    )
    reader.get_buffer()[: len(data)] = data
    sess._handle_all(reader.buffer_updated(len(data)))
    assert sess.inflight == 1 and set(sess.lanes) == {1}
    (seq, status, _t) = _replies(peer, 1)[0]
    assert (seq, status) == (2, ErrorCode.QUOTA_EXCEEDED)
    sess.gates.set(4)  # release the lane; its completion follows
    assert _replies(peer, 1)[0][:2] == (1, 0)
    sess._teardown()
    peer.close()
    sess.sock.close()


def test_sender_counts_typed_views_in_bytes() -> None:
    a, b = socket.socketpair()
    floats = memoryview(array.array("f", [1.0, 2.0, 3.0]))  # len 3, nbytes 12
    sender = Sender(a)
    sender.send([b"hdr", floats, bytearray(b"xy")])
    sender.send_alone([b"!", floats])
    b.settimeout(5.0)
    want = b"hdr" + floats.tobytes() + b"xy" + b"!" + floats.tobytes()
    got = b""
    while len(got) < len(want):
        got += b.recv(4096)
    assert got == want
    a.close()
    b.close()


# -- the client's completion shortcut ----------------------------------------------
class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> None:
        return None

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


async def _ready_client(session: int) -> tuple[TunnelClient, _Transport]:
    # The state OPEN leaves behind, without an agent (session, header prefix).
    c = TunnelClient(psk=b"k", name="unit", endpoint="none")
    t = _Transport()
    c.connection_made(t)  # type: ignore[arg-type]
    c._set_state(Runstate.READY)
    c.session = session
    c._head = client_mod._command_head(session)
    return c, t


def _feed(c: TunnelClient, data: bytes) -> None:
    buf = c.get_buffer(-1)
    buf[: len(data)] = data
    c.buffer_updated(len(data))


async def test_lone_nop_is_one_exact_write_and_ok_completes() -> None:
    c, t = await _ready_client(0x1234)
    fut = c.send_nop()
    assert t.written == [
        encode_frame(FrameType.COMMAND, encode_batch([rec(Opcode.NOP)]), session=0x1234, seq=1)
    ]
    _feed(c, encode_frame(FrameType.COMPLETION, encode_completion(0), session=0x1234, seq=1))
    done = fut.result()
    assert done.ok and done.results == {} and done.blob == b"" and c.inflight == 0


async def test_ok_completion_with_short_d2h_is_a_protocol_status() -> None:
    c, _t = await _ready_client(5)
    sink = bytearray(4)
    fut = c.send([rec(Opcode.COPY_D2H, 1, 0, 0, 0, 4)], d2h=[sink])
    _feed(c, encode_frame(FrameType.COMPLETION, encode_completion(0), session=5, seq=1))
    done = fut.result()
    assert done.status is ErrorCode.PROTOCOL and "0 of 4 D2H bytes" in done.message


async def test_pipelined_commands_are_coalesced() -> None:
    c, t = await _ready_client(5)
    futs = [c.send_nop() for _ in range(3)]
    assert len(t.written) == 1  # the first went at once; the others wait for the flush
    await asyncio.sleep(0)
    nop = encode_batch([rec(Opcode.NOP)])
    assert t.written[1] == b"".join(
        encode_frame(FrameType.COMMAND, nop, session=5, seq=s) for s in (2, 3)
    )
    reply = b"".join(
        encode_frame(FrameType.COMPLETION, encode_completion(0), session=5, seq=s)
        for s in (3, 1, 2)
    )
    _feed(c, reply)
    assert [f.result().ok for f in futs] == [True] * 3
