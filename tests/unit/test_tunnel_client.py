"""TunnelClient against a tiny in-test agent speaking docs/PROTOCOL.md.

The fake agent is deliberately small (NOP, QUERY, MEM_ALLOC/FREE, resource-0
copies into a bytearray) and has knobs to misbehave: hold completions, go
silent, send garbage, refuse auth. The real agent is exercised by
tests/integration/test_tunnel_agent.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast

import pytest

from tests.conftest import until
from vpcie.errors import AuthError, ErrorCode, VgpuError
from vpcie.protocol import guest_abi
from vpcie.protocol.batch import Record, decode_batch, encode_batch, fields
from vpcie.protocol.codes import (
    NO_INDEX,
    PROTOCOL_VERSION,
    ExecutorKind,
    FrameFlag,
    FrameType,
    Opcode,
)
from vpcie.protocol.frames import (
    FAST,
    Frame,
    FrameReader,
    data_frame_header,
    decode_payload,
    encode_completion,
    encode_frame,
    encode_payload,
    psk_mac,
)
from vpcie.tunnel import Completion, Runstate, RunstateError, TunnelClient
from vpcie.tunnel import commands as cmds
from vpcie.tunnel.results import QueryInfo
from vpcie.tunnel.runstate import TRANSITIONS

PSK = b"unit-test-key"
SESSION = 7
_COPY = fields(Opcode.COPY_H2D)


def query_info(max_inflight: int) -> bytes:
    return encode_payload(
        "QUERY_INFO", PROTOCOL_VERSION, int(ExecutorKind.CPU), 0, 1 << 30, 1 << 30, 1 << 28, 0,
        max_inflight, 1 << 20, 16, 0, 0, 0, "cpu-numpy (not a GPU)", "fake-uuid", "fake",
    )  # fmt: skip


@dataclass
class FakeAgent:
    key: bytes = PSK
    max_inflight: int = 8
    hold: bool = False  # keep completions back
    silent: bool = False  # stop sending anything (no PONG either)
    garbage_on_command: bool = False
    bad_completion: bool = False  # answer COMMANDs with an undecodable COMPLETION
    writers: list[asyncio.Transport] = field(default_factory=list)
    held: list[tuple[asyncio.Transport, bytes]] = field(default_factory=list)
    pings: int = 0
    opens: list[tuple[object, ...]] = field(default_factory=list)  # decoded OPEN payloads

    async def start(self) -> tuple[asyncio.Server, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _FakeConn(self), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        return server, port

    def release(self) -> None:
        for t, frame in self.held:
            t.write(frame)
        self.held.clear()


class _FakeConn(asyncio.Protocol):
    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent
        self.reader = FrameReader()
        self.mem: dict[int, bytearray] = {}
        self.next_handle = 1
        self.cnonce = b""
        self.snonce = os.urandom(32)
        self.h2d: tuple[int, list[bytes], int, list[Record]] | None = None  # seq, got, need, recs

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.agent.writers.append(self.t)

    def data_received(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            buf = self.reader.get_buffer()
            n = min(len(buf), len(data) - pos)
            buf[:n] = data[pos : pos + n]
            pos += n
            for f in self.reader.buffer_updated(n):
                self.on_frame(f)

    def send(self, ftype: int, payload: bytes, seq: int = 0, flags: int = 0) -> None:
        if not self.agent.silent:
            self.t.write(encode_frame(ftype, payload, session=SESSION, seq=seq, flags=flags))

    def on_frame(self, f: Frame) -> None:
        reply = int(FrameFlag.REPLY)
        if f.type == FrameType.HELLO:
            _mn, _mx, _auth, self.cnonce, _name = decode_payload("HELLO", f.payload)
            proof = psk_mac(self.agent.key, b"agent", self.cnonce, self.snonce)
            body = encode_payload("HELLO_REPLY", PROTOCOL_VERSION, 1, self.snonce, proof, "fake")
            self.send(FrameType.HELLO, body, flags=reply)
        elif f.type == FrameType.AUTH:
            (mac,) = decode_payload("AUTH", f.payload)
            if mac != psk_mac(self.agent.key, b"client", self.cnonce, self.snonce):
                err = encode_payload("ERROR", int(ErrorCode.PERMISSION_DENIED), 1, "bad key")
                self.send(FrameType.ERROR, err)
                self.t.close()
                return
            self.send(FrameType.AUTH, encode_payload("AUTH_REPLY", 0), flags=reply)
        elif f.type == FrameType.OPEN:
            self.agent.opens.append(decode_payload("OPEN", f.payload))
            body = encode_payload("OPEN_REPLY", 0, SESSION, "", query_info(self.agent.max_inflight))
            self.send(FrameType.OPEN, body, flags=reply)
        elif f.type == FrameType.PING:
            self.agent.pings += 1
            self.send(FrameType.PONG, bytes(f.payload), f.seq)
        elif f.type == FrameType.CLOSE:
            self.send(FrameType.CLOSE, encode_payload("AUTH_REPLY", 0), flags=reply)
            self.t.close()
        elif f.type == FrameType.COMMAND:
            if self.agent.garbage_on_command:
                self.t.write(b"\xde\xad" * 20)
                return
            if self.agent.bad_completion:  # a well-framed COMPLETION whose payload lies
                self.t.write(
                    encode_frame(FrameType.COMPLETION, b"\x01", session=SESSION, seq=f.seq)
                )
                return
            recs = decode_batch(f.payload)
            need = sum(
                r.body[_COPY.index("size")]
                for r in recs
                if r.opcode == Opcode.COPY_H2D and isinstance(r.body, tuple)
            )
            if need:
                self.h2d = (f.seq, [], need, recs)
            else:
                self.execute(f.seq, recs, b"")
        elif f.type == FrameType.DATA:
            assert self.h2d is not None and self.h2d[0] == f.seq
            self.h2d[1].append(bytes(f.payload))
            got = b"".join(self.h2d[1])
            if f.flags & FrameFlag.LAST:
                assert len(got) == self.h2d[2]
                seq, recs = self.h2d[0], self.h2d[3]
                self.h2d = None
                self.execute(seq, recs, got)

    def execute(self, seq: int, recs: list[Record], h2d: bytes) -> None:
        results: list[tuple[int, int]] = []
        blob = b""
        d2h: list[bytes] = []
        pos = 0
        for i, r in enumerate(recs):
            if r.opcode == Opcode.MEM_ALLOC:
                self.mem[self.next_handle] = bytearray(r.body[0])
                results.append((i, self.next_handle))
                self.next_handle += 1
            elif r.opcode == Opcode.QUERY:
                blob = query_info(self.agent.max_inflight)
            elif r.opcode in (Opcode.COPY_H2D, Opcode.COPY_D2H):
                handle, _res, off, _hoff, size = r.body
                mem = self.mem.get(handle)
                if mem is None:
                    self.complete(seq, encode_completion(ErrorCode.INVALID_HANDLE, failed_index=i))
                    return
                if r.opcode == Opcode.COPY_H2D:
                    mem[off : off + size] = h2d[pos : pos + size]
                    pos += size
                else:
                    d2h.append(bytes(mem[off : off + size]))
        out = b"".join(d2h)
        # D2H in odd-sized DATA frames to exercise the client's scatter mapping
        off = 0
        while off < len(out):
            n = min(777_777, len(out) - off)
            hdr = data_frame_header(SESSION, seq, off, n, last=off + n == len(out))
            if not self.agent.silent:
                self.t.write(hdr + out[off : off + n])
            off += n
        self.complete(seq, encode_completion(0, results=results, blob=blob))

    def complete(self, seq: int, payload: bytes) -> None:
        frame = encode_frame(FrameType.COMPLETION, payload, session=SESSION, seq=seq)
        if self.agent.hold:
            self.agent.held.append((self.t, frame))
        elif not self.agent.silent:
            self.t.write(frame)


@pytest.fixture
async def agent() -> AsyncIterator[tuple[FakeAgent, int]]:
    fake = FakeAgent()
    server, port = await fake.start()
    yield fake, port
    for t in fake.writers:
        t.abort()
    server.close()


async def test_connect_nop_query(agent: tuple[FakeAgent, int]) -> None:
    _fake, port = agent
    async with await TunnelClient.connect("127.0.0.1", port, psk=PSK, name="t") as c:
        assert c.state is Runstate.READY
        assert c.session == SESSION
        assert c.info.executor is ExecutorKind.CPU and c.info.max_inflight == 8
        assert "not a GPU" in c.info.describe()
        done = await c.nop()
        assert done.ok and done.failed_index == NO_INDEX
        q = await c.query()
        assert q.name == "cpu-numpy (not a GPU)"
    assert c.state.name == "CLOSED"


async def test_open_carries_epoch_and_lease(agent: tuple[FakeAgent, int]) -> None:
    fake, port = agent
    token = (1 << 64) - 2
    async with await TunnelClient.connect(
        "127.0.0.1", port, psk=PSK, name="t", handle_epoch=3, lease_token=token,
        lease_live=(7, token),
    ):  # fmt: skip
        pass
    async with await TunnelClient.connect("127.0.0.1", port, psk=PSK, name="t"):
        pass
    assert [o[4:] for o in fake.opens] == [(3, token, 2, [(7,), (token,)]), (0, 0, 0, [])]


async def test_scatter_copies_round_trip(agent: tuple[FakeAgent, int]) -> None:
    _fake, port = agent
    rng = os.urandom
    sizes = [1, 4095, 4097, 0, 3, 1 << 20, 12345, 2_000_001]
    src = [rng(n) for n in sizes]
    total = sum(sizes)
    async with await TunnelClient.connect("127.0.0.1", port, psk=PSK) as c:
        h = await c.alloc(total + 100)
        await c.copy_h2d(h, 100, src)
        back = [bytearray(n) for n in reversed(sizes)]
        await c.copy_d2h(h, 100, back)
        want = hashlib.sha256(b"".join(src)).hexdigest()
        assert hashlib.sha256(b"".join(back)).hexdigest() == want


async def test_inflight_limit_raises_at_once(agent: tuple[FakeAgent, int]) -> None:
    fake, port = agent
    fake.max_inflight = 4
    fake.hold = True
    async with await TunnelClient.connect("127.0.0.1", port, psk=PSK) as c:
        futs = [c.send_nop() for _ in range(4)]
        t0 = time.monotonic()
        with pytest.raises(VgpuError) as err:
            c.send([cmds.nop()])
        assert err.value.code is ErrorCode.QUOTA_EXCEEDED
        assert time.monotonic() - t0 < 0.1
        await until(lambda: len(fake.held) == 4, 5, "the fake agent never got the 4 commands")
        fake.hold = False
        fake.release()
        results = await asyncio.wait_for(asyncio.gather(*futs), 5)
        assert all(r.ok for r in results)
        assert (await c.nop()).ok  # the window is free again


async def test_wrong_psk_is_refused(agent: tuple[FakeAgent, int]) -> None:
    _fake, port = agent
    # the agent's proof fails first (with the real agent too): AuthError either way
    with pytest.raises(AuthError, match=r"PSK|refused"):
        await TunnelClient.connect("127.0.0.1", port, psk=b"wrong")


async def test_agent_without_the_key_is_rejected(agent: tuple[FakeAgent, int]) -> None:
    fake, port = agent
    fake.key = b"impostor"
    with pytest.raises(AuthError, match="does not hold"):
        await TunnelClient.connect("127.0.0.1", port, psk=PSK)


async def test_silent_agent_is_lost_within_2s(agent: tuple[FakeAgent, int]) -> None:
    fake, port = agent
    c = await TunnelClient.connect("127.0.0.1", port, psk=PSK)
    await c.nop()
    fake.silent = True
    t0 = time.monotonic()
    futs = [c.send_nop() for _ in range(5)]
    done = await asyncio.wait_for(asyncio.gather(*futs), 3)
    assert time.monotonic() - t0 < 2.0
    assert all(d.status is ErrorCode.DEVICE_LOST for d in done)
    assert c.state is Runstate.LOST
    with pytest.raises(VgpuError) as err:
        await c.nop()
    assert err.value.code is ErrorCode.DEVICE_LOST
    await c.close()  # harmless after a loss
    assert c.state is Runstate.LOST


async def test_pings_keep_an_idle_session_alive(agent: tuple[FakeAgent, int]) -> None:
    fake, port = agent
    async with await TunnelClient.connect("127.0.0.1", port, psk=PSK) as c:
        await until(lambda: fake.pings >= 4, 5, "the client sent fewer than 4 pings")
        assert c.state is Runstate.READY
        assert c.rtt is not None
        assert (await c.nop()).ok


async def test_garbage_from_agent_loses_the_session(agent: tuple[FakeAgent, int]) -> None:
    fake, port = agent
    c = await TunnelClient.connect("127.0.0.1", port, psk=PSK)
    fake.garbage_on_command = True
    done = await asyncio.wait_for(c.submit([cmds.nop()]), 3)
    assert done.status is ErrorCode.DEVICE_LOST
    assert "protocol" in done.message
    with pytest.raises(VgpuError):
        done.check()


async def test_malformed_completion_ends_its_command(agent: tuple[FakeAgent, int]) -> None:
    """The command a malformed COMPLETION names ends with DEVICE_LOST too
    (it had already left the in-flight table when decoding failed)."""
    fake, port = agent
    c = await TunnelClient.connect("127.0.0.1", port, psk=PSK)
    fake.hold = True
    held = c.send([cmds.nop()])  # in flight, completion held back
    await until(lambda: fake.held, 5, "the fake agent never took the command")
    fake.bad_completion = True
    done = await asyncio.wait_for(c.submit([cmds.nop()]), 3)
    assert done.status is ErrorCode.DEVICE_LOST and "malformed" in done.message
    other = await asyncio.wait_for(held, 3)
    assert other.status is ErrorCode.DEVICE_LOST


async def test_bad_arguments_are_refused_before_sending(agent: tuple[FakeAgent, int]) -> None:
    _fake, port = agent
    async with await TunnelClient.connect("127.0.0.1", port, psk=PSK) as c:
        with pytest.raises(VgpuError) as err:
            c.send([cmds.copy_h2d(1, 0, 10)], h2d=[b"123"])
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
        with pytest.raises(VgpuError) as err:
            c.send([cmds.copy_d2h(1, 0, 3)], d2h=[b"123"])  # read-only
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
        with pytest.raises(VgpuError) as err:
            c.send(b"not a batch at all")
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
        assert c.inflight == 0
        assert (await c.submit(encode_batch([cmds.nop()]))).ok


async def test_send_encoded_checks_the_copy_totals(agent: tuple[FakeAgent, int]) -> None:
    """The pre-encoded path (the vGPU device's) is not decoded again, but the
    scatter lists must still hold exactly the totals the caller names."""
    _fake, port = agent
    async with await TunnelClient.connect("127.0.0.1", port, psk=PSK) as c:
        h = await c.alloc(64)
        data = encode_batch([cmds.copy_h2d(h, 0, 5)])
        with pytest.raises(VgpuError) as err:
            c.send_encoded(data, 5, 0, h2d=[b"1234"])
        assert err.value.code is ErrorCode.INVALID_ARGUMENT and c.inflight == 0
        assert (await c.send_encoded(data, 5, 0, h2d=[b"12", b"345"])).ok
        back = bytearray(5)
        read = encode_batch([cmds.copy_d2h(h, 0, 5)])
        assert (await c.send_encoded(read, 0, 5, d2h=[back])).ok
        assert back == b"12345"


async def test_wrong_state_errors(agent: tuple[FakeAgent, int]) -> None:
    _fake, port = agent
    c = await TunnelClient.connect("127.0.0.1", port, psk=PSK)
    await c.close()
    await c.close()
    with pytest.raises(RunstateError, match="CLOSED"):
        c.send_nop()


async def test_unreachable_agent_is_device_lost() -> None:
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(VgpuError) as err:
        await TunnelClient.connect("127.0.0.1", port, psk=PSK)
    assert err.value.code is ErrorCode.DEVICE_LOST


def test_completion_check() -> None:
    Completion(ErrorCode.OK).check()
    with pytest.raises(VgpuError) as err:
        Completion(ErrorCode.OUT_OF_MEMORY, 2, "full").check()
    assert err.value.code is ErrorCode.OUT_OF_MEMORY and err.value.index == 2


def test_runs_on_uvloop() -> None:
    """The backend may run on uvloop: its transport is not an asyncio.Transport."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> bytes:
        fake = FakeAgent()
        server, port = await fake.start()
        try:
            async with await TunnelClient.connect("127.0.0.1", port, psk=PSK) as c:
                h = await c.alloc(3 * 1024 * 1024)
                data = os.urandom(3 * 1024 * 1024)
                await c.copy_h2d(h, 0, [data[:5], data[5:]])
                back = bytearray(len(data))
                await c.copy_d2h(h, 0, back)
                assert back == data
                return bytes(back[:4])
        finally:
            for t in fake.writers:
                t.abort()
            server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert len(runner.run(scenario())) == 4


async def test_a_lent_socket_comes_back_with_its_commands(agent: tuple[FakeAgent, int]) -> None:
    """lend() / take_back(), as the vGPU lane uses them: while lent the client
    neither sends nor reads; the borrower's command still in flight is adopted
    and its COMPLETION, half read by the borrower, finishes it; the next
    command goes on with the following seq."""
    _fake, port = agent
    c = await TunnelClient.connect("127.0.0.1", port, psk=PSK, name="t")
    try:
        assert (await c.nop()).ok and c.lendable()
        fd, session, seq = c.lend()
        assert not c.lendable()
        with pytest.raises(RuntimeError, match="lent"):
            c.send_nop()
        frame = encode_frame(
            FrameType.COMMAND, encode_batch([cmds.nop()]), session=session, seq=seq + 1
        )
        os.write(fd, frame)
        got = b""
        deadline = time.monotonic() + 5
        while len(got) < 10:  # the first bytes of the COMPLETION: the borrower's
            assert time.monotonic() < deadline
            try:
                got += os.read(fd, 10 - len(got))
            except BlockingIOError:
                await asyncio.sleep(0.001)
        done: list[Completion] = []
        c.take_back(seq + 1, [(seq + 1, done.append)], got)
        while not done:  # the rest arrives through the client's own reader
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        assert done[0].ok
        assert (await c.nop()).ok and c.inflight == 0
        with pytest.raises(RuntimeError, match="not lent"):
            c.take_back(seq + 2)
    finally:
        await c.close()


async def test_lent_is_a_runstate(agent: tuple[FakeAgent, int]) -> None:
    """Lending is a state of the tunnel's Runstate machine: while LENT every
    call that needs the socket says so (naming the state and what to do),
    and lend/take_back called in the wrong state are refused the same way."""
    _fake, port = agent
    c = await TunnelClient.connect("127.0.0.1", port, psk=PSK, name="t")
    try:
        not_lent = r"take_back\(\) needs a LENT tunnel, but it is READY"
        with pytest.raises(RunstateError, match=not_lent):
            c.take_back(0)
        _fd, _session, seq = c.lend()
        assert c.state is Runstate.LENT and not c.lendable()
        for call in (c.lend, c.send_nop, lambda: c.send([cmds.nop()])):
            with pytest.raises(RunstateError, match="needs a READY tunnel, but it is LENT") as e:
                call()
            assert e.value.state is Runstate.LENT and "take_back() first" in str(e.value)
        with pytest.raises(RunstateError, match=r"close\(\) needs a READY tunnel, but it is LENT"):
            await c.close()
        c.take_back(seq)
        assert c.state is Runstate.READY and (await c.nop()).ok
    finally:
        await c.close()
    assert c.state is Runstate.CLOSED


async def test_lost_while_lent_ends_the_adopted_commands(agent: tuple[FakeAgent, int]) -> None:
    """A tunnel that fails while LENT is LOST; the commands the borrower hands
    back with take_back() end with that loss at once, like every other
    in-flight command did, instead of waiting for a COMPLETION that cannot come."""
    _fake, port = agent
    c = await TunnelClient.connect("127.0.0.1", port, psk=PSK, name="t")
    try:
        _fd, _session, seq = c.lend()
        c.fail("the lane saw the agent go")
        assert c.state is Runstate.LOST
        done: list[Completion] = []
        c.take_back(seq + 1, [(seq + 1, done.append)])
        assert [(d.status, d.message) for d in done] == [
            (ErrorCode.DEVICE_LOST, "the lane saw the agent go")
        ]
        assert c.inflight == 0
    finally:
        await c.close()


@pytest.mark.parametrize(
    ("call", "build"),
    [
        ("query", cmds.query), ("alloc", cmds.mem_alloc), ("free", cmds.mem_free),
        ("memset", cmds.memset), ("gemm", cmds.gemm), ("axpy", cmds.axpy),
        ("reduce_sum", cmds.reduce_sum), ("sync", cmds.sync),
    ],
)  # fmt: skip
def test_convenience_calls_take_their_builders_parameters(
    call: str, build: Callable[..., Record]
) -> None:
    """TunnelClient's one-record calls are vpcie.tunnel.commands' builders
    sent: same parameters (after self), never a second list of them."""
    mine = list(inspect.signature(getattr(TunnelClient, call)).parameters.values())
    assert [p.name for p in mine[:1]] == ["self"]
    assert mine[1:] == list(inspect.signature(build).parameters.values())


def test_query_info_has_the_wire_fields() -> None:
    """The tunnel's QueryInfo names QUERY_INFO's fields, in wire order (as the
    guest ABI's VgpuInfo does): a field added on the wire fails here."""
    names = tuple(f.name for f in dataclasses.fields(QueryInfo))
    assert names == FAST["QUERY_INFO"].names == guest_abi.VgpuInfo._fields


def test_lent_transitions() -> None:
    """READY <-> LENT; a lent tunnel can still fail (LOST) or be torn down."""
    assert Runstate.LENT in TRANSITIONS[Runstate.READY]
    assert TRANSITIONS[Runstate.LENT] == {Runstate.READY, Runstate.LOST, Runstate.CLOSED}
    assert all(Runstate.LENT not in TRANSITIONS[s] for s in Runstate if s is not Runstate.READY)


async def test_a_lent_socket_comes_back_with_its_unsent_bytes(
    agent: tuple[FakeAgent, int],
) -> None:
    """The borrower got only part of a COMMAND into the kernel: take_back's
    ``unsent`` goes out first, so the agent sees the whole frame, answers it,
    and the client's own next command follows it on the stream."""
    _fake, port = agent
    c = await TunnelClient.connect("127.0.0.1", port, psk=PSK, name="t")
    try:
        assert (await c.nop()).ok
        fd, session, seq = c.lend()
        frame = encode_frame(
            FrameType.COMMAND, encode_batch([cmds.nop()]), session=session, seq=seq + 1
        )
        os.write(fd, frame[:7])  # mid-header: a frame the stream cannot do without
        done: list[Completion] = []
        c.take_back(seq + 1, [(seq + 1, done.append)], b"", frame[7:])
        deadline = time.monotonic() + 5
        while not done:
            assert time.monotonic() < deadline, "the agent never saw the whole COMMAND"
            await asyncio.sleep(0.001)
        assert done[0].ok
        assert (await c.nop()).ok and c.state is Runstate.READY and c.inflight == 0
    finally:
        await c.close()
