"""The lane's C side (vpcie/_native/lane.c) against a socket the test plays
the agent on: frames it answers itself, frames it leaves to Python, every
way a session breaks, and the hand-back of a session's bytes. The control
ring side runs in tests/integration/test_vgpu_lane.py."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import wait_for
from vpcie._native import native, native_available
from vpcie.errors import ErrorCode
from vpcie.gpu.fencepage import HEADER_ST, SLOT_ST
from vpcie.gpu.native_lane import FRAME, LOST, TURN, LaneEvent, NativeLane
from vpcie.protocol import virtio_gpu as wire
from vpcie.protocol.codes import (
    FRAME_MAGIC,
    MAX_BATCH_RECORDS,
    MAX_PAYLOAD,
    NO_INDEX,
    PROTOCOL_VERSION,
    FrameType,
)
from vpcie.protocol.frames import HEADER_SIZE, encode_completion, encode_frame, encode_payload

pytestmark = pytest.mark.skipif(not native_available(), reason="native module not built")

SESSION = 7


def test_constants_match_python() -> None:
    from vpcie._native.batchcheck import MAX_FAST_SIGNALS
    from vpcie.backend.device import MAX_CHAINS_PER_KICK
    from vpcie.gpu.forwarding import MAX_CTX_INFLIGHT
    from vpcie.tunnel.liveness import Verdict

    _ffi, lib = native()
    assert lib.VPCIE_FRAME_MAGIC == FRAME_MAGIC and lib.VPCIE_PROTOCOL_VERSION == PROTOCOL_VERSION
    for name in ("COMMAND", "DATA", "COMPLETION", "ERROR", "PING", "PONG"):
        assert getattr(lib, f"VPCIE_T_{name}") == FrameType[name]
    assert lib.VPCIE_MAX_PAYLOAD_COMMAND == MAX_PAYLOAD[FrameType.COMMAND]
    assert lib.VPCIE_MAX_PAYLOAD_COMPLETION == MAX_PAYLOAD[FrameType.COMPLETION]
    assert (
        lib.VPCIE_MAX_CONTROL_PAYLOAD
        == MAX_PAYLOAD[FrameType.PING]
        == MAX_PAYLOAD[FrameType.ERROR]
    )
    assert lib.VPCIE_COMPLETION_OK_LEN == len(encode_completion(0, failed_index=NO_INDEX))
    assert lib.VL_CMD_SUBMIT_3D == wire.Cmd.SUBMIT_3D
    assert lib.VL_RESP_OK_NODATA == wire.Resp.OK_NODATA
    assert lib.VL_FENCE_HDR == HEADER_ST.size and lib.VL_FENCE_SLOT == SLOT_ST.size
    assert lib.VPCIE_NO_INDEX == NO_INDEX and lib.VPCIE_E_OUT_OF_RANGE == ErrorCode.OUT_OF_RANGE
    assert lib.VL_MAX_SIGS == MAX_FAST_SIGNALS and lib.VPCIE_MAX_BATCH_RECORDS == MAX_BATCH_RECORDS
    assert lib.VL_MAX_CTX_INFLIGHT == MAX_CTX_INFLIGHT
    assert lib.VL_CHAINS_PER_WAKE == MAX_CHAINS_PER_KICK
    # The tick and the liveness constants are no longer C's: Python gives them
    # (vl_new, vl_add_ctx); the verdict numbers still are (test_liveness.py
    # holds the rule itself to Python's).
    assert [lib.VL_ALIVE, lib.VL_HUNG, lib.VL_UNREACHABLE, lib.VL_SILENT] == list(Verdict)
    assert not hasattr(lib, "VL_DEAD_NS") and not hasattr(lib, "VL_TICK_NS")
    assert (lib.VL_EV_TURN, lib.VL_EV_FRAME, lib.VL_EV_LOST) == (TURN, FRAME, LOST)


@contextmanager
def lent_pair(seq: int, *, small: bool = False) -> Iterator[tuple[NativeLane, socket.socket]]:
    """A lane holding context 1, lent one end of a socket pair (``seq`` sent
    so far); the test is the agent on the other end. ``small``: a small send
    buffer on the lane's end and a non-blocking agent end."""
    ours, agent = socket.socketpair()
    if small:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        agent.setblocking(False)
    ours.setblocking(False)
    lane = NativeLane(64, 1 << 16)
    assert lane.add(1, ours.fileno(), SESSION, seq, 8, 0)
    try:
        yield lane, agent
    finally:
        lane.kill(1)
        lane.release(1)
        lane.close()
        ours.close()
        agent.close()


@pytest.fixture
def lent() -> Iterator[tuple[NativeLane, socket.socket]]:
    with lent_pair(41) as pair:
        yield pair


def wait_event(lane: NativeLane, timeout: float = 3.0) -> tuple[int, int, bytes]:
    """The next event: (kind, ctx_id, data), waiting on the lane's eventfd."""
    deadline = time.monotonic() + timeout
    while True:
        ev = lane.next_event()
        if ev is not None:
            return ev.kind, ev.ctx_id, ev.data
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no lane event")
        select.select([lane.event_fd], [], [], left)


def unread(agent: socket.socket) -> int:
    """Bytes the test sent on ``agent`` that the lane has not read yet
    (SIOCOUTQ on a unix socket: what the peer has not consumed)."""
    return int(struct.unpack("i", fcntl.ioctl(agent.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])


def read_frame(sock: socket.socket, timeout: float = 3.0) -> tuple[int, int, int, bytes]:
    sock.settimeout(timeout)
    head = b""
    while len(head) < HEADER_SIZE:
        head += sock.recv(HEADER_SIZE - len(head))
    magic, version, ftype, _flags, session, seq, length = struct.unpack("<IBBHIQI", head)
    assert (magic, version) == (FRAME_MAGIC, PROTOCOL_VERSION)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return ftype, session, seq, body


def test_pings_are_answered_and_sent(lent: tuple[NativeLane, socket.socket]) -> None:
    lane, agent = lent
    agent.sendall(encode_frame(FrameType.PING, struct.pack("<Q", 1234), session=SESSION, seq=9))
    frames = [read_frame(agent) for _ in range(3)]  # the PONG, and the lane's own PINGs
    pong = [f for f in frames if f[0] == FrameType.PONG]
    assert pong == [(FrameType.PONG, SESSION, 9, struct.pack("<Q", 1234))]
    assert sum(f[0] == FrameType.PING for f in frames) == 2  # every 250 ms, until lost
    assert lane.stats()["pings"] >= 2


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (encode_frame(FrameType.COMPLETION, encode_completion(0), session=SESSION, seq=42),
         "COMPLETION for seq 42, which is not in flight"),
        (encode_frame(FrameType.COMPLETION, encode_completion(0), session=3, seq=42),
         "COMPLETION for session 3, this is 7"),
        (b"\0" * HEADER_SIZE, "bad frame magic"),
        (struct.pack("<IBBHIQI", FRAME_MAGIC, PROTOCOL_VERSION + 1, FrameType.PING, 0, SESSION,
                     0, 8),
         f"frame version {PROTOCOL_VERSION + 1} not supported"),
        (struct.pack("<IBBHIQI", FRAME_MAGIC, PROTOCOL_VERSION, 77, 0, SESSION, 0, 0),
         "unknown frame type 77"),
        (encode_frame(FrameType.DATA, bytes(16), session=SESSION, seq=1), "DATA with no D2H"),
        (encode_frame(FrameType.HELLO, b"x", session=SESSION), "unexpected HELLO frame"),
        (struct.pack("<IBBHIQI", FRAME_MAGIC, PROTOCOL_VERSION, FrameType.PONG, 0, SESSION, 0,
                     5000),
         "frame type 10 of 5000 bytes over cap"),
    ],
)  # fmt: skip
def test_a_broken_stream_loses_the_session(
    lent: tuple[NativeLane, socket.socket], frame: bytes, why: str
) -> None:
    lane, agent = lent
    agent.sendall(frame)
    kind, ctx_id, data = wait_event(lane)
    assert (kind, ctx_id) == (LOST, 1)
    assert data.decode().startswith("agent broke the protocol: ") and why in data.decode()
    # The lane has let go of the stream; what it had not consumed comes back.
    back = lane.release(1)
    assert back is not None and back.lost == data.decode()
    assert back.seq == 41


def test_eof_and_silence_lose_the_session(lent: tuple[NativeLane, socket.socket]) -> None:
    lane, agent = lent
    agent.shutdown(socket.SHUT_WR)
    assert wait_event(lane)[::2] == (LOST, b"connection to agent lost (EOF)")
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    try:
        assert lane.add(2, ours.fileno(), SESSION, 0, 1, 0)
        t0 = time.monotonic()
        kind, ctx_id, data = wait_event(lane)  # the peer never answers
        # A socket pair has no TCP_INFO: what the lane read stands in, and
        # silence with no sign of trouble is a hung agent after hang_after.
        assert (kind, ctx_id) == (LOST, 2)
        assert data.startswith(b"agent's host answers but the agent is silent for 1.")
        assert 1.0 < time.monotonic() - t0 < 2.0
    finally:
        lane.kill(2)
        lane.release(2)
        ours.close()
        peer.close()


@pytest.fixture
def stuck() -> Iterator[tuple[NativeLane, socket.socket]]:
    """``fill`` makes the lane's answers back up on this one."""
    with lent_pair(0, small=True) as pair:
        yield pair


PING_3 = encode_frame(FrameType.PING, struct.pack("<Q", 5), session=SESSION, seq=3)


def fill(
    lane: NativeLane, agent: socket.socket, until: float, *, flood: bool = False
) -> tuple[int, float, LaneEvent | None]:
    """Send PINGs (whole frames only: the stream stays well-formed) and read
    nothing, until the lane has a backlog (or with ``flood``, on), an event
    comes, or ``until`` s pass. Returns (bytes sent, the longest a call into
    the lane took, the event or None)."""
    pending, sent, ev, slowest = b"", 0, None, 0.0
    deadline = time.monotonic() + until
    while ev is None and time.monotonic() < deadline:
        if not pending:
            if lane.stats()["backlogged"] and not flood:
                break
            pending = PING_3
        try:
            n = agent.send(pending)
            pending, sent = pending[n:], sent + n
        except BlockingIOError:  # the lane is not reading as fast as we send
            time.sleep(0.01)
        t0 = time.monotonic()
        ev = lane.next_event()
        slowest = max(slowest, time.monotonic() - t0)
    return sent, slowest, ev


def test_a_stuck_agent_loses_the_session(stuck: tuple[NativeLane, socket.socket]) -> None:
    """The agent stops reading (and sending) with the lane's answers backed
    up. The lane never waits on the socket: every call into it stays quick
    (its lock is not held across a send), and once nothing has come from the
    agent nor been taken by it for hang_after (1 s) the session is lost."""
    lane, agent = stuck
    sent, slowest, ev = fill(lane, agent, 5.0)
    assert ev is None and sent > len(PING_3) and lane.stats()["backlogged"] > 0
    t0 = time.monotonic()
    while (ev := lane.next_event()) is None and time.monotonic() - t0 < 5:
        t1 = time.monotonic()
        lane.stats()
        slowest = max(slowest, time.monotonic() - t1)
        time.sleep(0.005)
    assert ev is not None and ev.kind == LOST, "the lane never gave up"
    assert ev.data.startswith(b"agent's host answers but the agent is silent for 1.")
    assert time.monotonic() - t0 < 2.0
    assert slowest < 0.5  # a send waited on under the lock would take up to 1 s
    back = lane.release(1)
    assert back is not None and back.lost == ev.data.decode()


def test_an_agent_that_sends_but_never_reads(stuck: tuple[NativeLane, socket.socket]) -> None:
    """PINGs flood in and no PONG is read: the backlog stops at its cap
    (one COMMAND and 64 KiB) and the session is lost, memory bounded."""
    lane, agent = stuck
    _sent, _slowest, ev = fill(lane, agent, 10.0, flood=True)
    assert ev is not None and ev.kind == LOST
    assert ev.data in (
        b"the agent reads nothing of what it is sent (backlog over its cap)",
    ) or ev.data.startswith(b"agent's host answers but the agent is silent")  # a slow machine


def test_take_back_hands_over_the_backlog(stuck: tuple[NativeLane, socket.socket]) -> None:
    """Taken back while its answers are backed up: the socket's bytes plus
    ``unsent`` are exactly the lane's frames, whole and in order."""
    lane, agent = stuck
    sent, _slowest, ev = fill(lane, agent, 0.8)
    assert ev is None and lane.stats()["backlogged"] > 0
    lane.kill(1)
    back = lane.release(1)
    assert back is not None and back.lost == "" and back.unsent
    agent.setblocking(True)
    agent.settimeout(0.2)
    got = b""
    while True:
        try:
            chunk = agent.recv(1 << 16)
        except TimeoutError:
            break
        if not chunk:
            break
        got += chunk
    stream, pongs = got + back.unsent, 0
    while stream:
        magic, _v, ftype, _f, session, seq, length = struct.unpack_from("<IBBHIQI", stream)
        assert magic == FRAME_MAGIC and session == SESSION and length == 8
        assert ftype in (FrameType.PONG, FrameType.PING)
        if ftype == FrameType.PONG:
            assert seq == 3 and stream[HEADER_SIZE : HEADER_SIZE + 8] == struct.pack("<Q", 5)
            pongs += 1
        stream = stream[HEADER_SIZE + length :]
    # Every PING the lane read was answered, once: the rest it had not read
    # (part of one in its leftover, the others still queued on its socket).
    unread = len(back.leftover)
    while True:
        try:
            chunk = os.read(back.fd, 1 << 16)
        except BlockingIOError:
            break
        unread += len(chunk)
        if not chunk:
            break
    assert (sent - unread) % len(PING_3) == 0
    assert pongs == (sent - unread) // len(PING_3) > 0


def test_frames_left_to_python(lent: tuple[NativeLane, socket.socket]) -> None:
    """An ERROR and a malformed PING are Python's to judge (TunnelClient's
    rules); a frame split across reads is parsed once it is whole."""
    lane, agent = lent
    err = encode_frame(FrameType.ERROR, encode_payload("ERROR", 5, 0, "slow down"), session=SESSION)
    agent.sendall(err[:10])
    wait_for(lambda: unread(agent) == 0, 3, "the lane never read the first 10 bytes")
    agent.sendall(err[10:])
    bad_ping = (
        struct.pack("<IBBHIQI", FRAME_MAGIC, PROTOCOL_VERSION, FrameType.PING, 0, SESSION, 0, 4)
        + b"abcd"
    )
    agent.sendall(bad_ping)
    assert wait_event(lane) == (FRAME, 1, err)
    assert wait_event(lane) == (FRAME, 1, bad_ping)
    assert lane.stats()["python_frames"] == 2


def test_take_back_returns_unread_bytes(lent: tuple[NativeLane, socket.socket]) -> None:
    lane, agent = lent
    assert lane.release(1) is None  # still lent
    pong_head = encode_frame(FrameType.PONG, struct.pack("<Q", 5), session=SESSION)[:20]
    agent.sendall(pong_head)  # part of a frame: the lane keeps it
    wait_for(lambda: unread(agent) == 0, 3, "the lane never read the partial frame")
    lane.kill(1)
    assert lane.take_frame(1) is None and lane.take_batch(1) is None
    back = lane.release(1)
    assert back is not None
    assert back.leftover == pong_head and back.seq == 41 and back.lost == ""
    assert lane.release(1) is None  # the slot is free
    assert lane.add(1, back.fd, SESSION, back.seq, 8, 0)  # and can be lent again
