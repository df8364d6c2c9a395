"""A real agent process (CPU executor) over real TCP on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from host_agent.testclient import AgentProcess, RawClient
from tests.conftest import wait_for
from vpcie.errors import ErrorCode
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import NO_INDEX, DType, FrameType, ModuleKind, Opcode
from vpcie.protocol.frames import decode_payload

QUOTA = 256 << 20
MAX_INFLIGHT = 8


def _psk(d: Path) -> bytes:
    psk = os.urandom(16).hex().encode()
    (d / "psk").write_bytes(psk)
    os.chmod(d / "psk", 0o600)
    return psk


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProcess, bytes]]:
    d = tmp_path_factory.mktemp("agent")
    psk = _psk(d)
    a = AgentProcess(
        d,
        "--psk-file",
        str(d / "psk"),
        "--executor",
        "cpu",
        "--mem-quota",
        str(QUOTA),
        "--max-inflight",
        str(MAX_INFLIGHT),
        "--event-wait-timeout",
        "2",
    )
    yield a, psk
    a.stop()


@pytest.fixture
def client(agent: tuple[AgentProcess, bytes]) -> Iterator[RawClient]:
    a, psk = agent
    c = RawClient(a.port, psk=psk)
    c.connect()
    yield c
    c.close()


def alloc(c: RawClient, size: int) -> int:
    r = c.call([rec(Opcode.MEM_ALLOC, size, 0)])
    assert r.status == 0, r.message
    return r.results[0]


def f64(bits: int) -> float:
    value: float = struct.unpack("<d", struct.pack("<Q", bits))[0]
    return value


def test_open_reports_cpu_executor(agent: tuple[AgentProcess, bytes]) -> None:
    a, psk = agent
    c = RawClient(a.port, psk=psk)
    info = c.connect(mem_quota=QUOTA * 4, max_inflight=1000)
    assert info["executor"] == 1 and info["name"] == "cpu-numpy (not a GPU)"
    assert info["mem_quota"] == QUOTA and info["max_inflight"] == MAX_INFLIGHT  # capped
    assert info["uuid"] == "cpu0" and info["agent"] == "test-agent"
    closing = c.close()
    assert closing is not None and closing.type == FrameType.CLOSE


@pytest.mark.parametrize("size", [0, 1, 4097, (8 << 20) + 3])
def test_h2d_d2h_checksums(client: RawClient, size: int) -> None:
    h = alloc(client, size + 10)
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    r = client.call([rec(Opcode.COPY_H2D, h, 0, 10, 0, size)], data)
    assert r.status == 0, r.message
    r = client.call([rec(Opcode.COPY_D2H, h, 0, 10, 0, size)])
    assert r.status == 0 and len(r.data) == size
    assert zlib.crc32(r.data) == zlib.crc32(data)


def test_multi_record_streams_concatenate(client: RawClient) -> None:
    h1, h2 = alloc(client, 100), alloc(client, 50)
    r = client.call(
        [
            rec(Opcode.MEMSET, h1, 3, 0, 100),  # not a copy: data is staged
            rec(Opcode.COPY_H2D, h1, 0, 20, 0, 30),
            rec(Opcode.COPY_H2D, h2, 0, 0, 0, 50),
            rec(Opcode.COPY_D2H, h2, 0, 0, 0, 50),
            rec(Opcode.COPY_D2H, h1, 0, 0, 0, 100),
        ],
        b"A" * 30 + b"B" * 50,
    )
    assert r.status == 0, r.message
    assert r.data == b"B" * 50 + b"\3" * 20 + b"A" * 30 + b"\3" * 50


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16])
@pytest.mark.parametrize(("ta", "tb", "alpha", "beta"), [(0, 0, 1.0, 0.0), (1, 1, 0.5, 2.0)])
def test_gemm_matches_numpy(
    client: RawClient, dtype: DType, ta: int, tb: int, alpha: float, beta: float
) -> None:
    npt = np.float32 if dtype == DType.F32 else np.float16
    m, n, k = 33, 17, 65
    rng = np.random.default_rng(7)
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(npt)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(npt)
    c0 = rng.standard_normal((m, n)).astype(npt)
    ha, hb, hc = alloc(client, a.nbytes), alloc(client, b.nbytes), alloc(client, c0.nbytes)
    r = client.call(
        [
            rec(Opcode.COPY_H2D, ha, 0, 0, 0, a.nbytes),
            rec(Opcode.COPY_H2D, hb, 0, 0, 0, b.nbytes),
            rec(Opcode.COPY_H2D, hc, 0, 0, 0, c0.nbytes),
            rec(Opcode.GEMM, dtype, ta, tb, m, n, k, alpha, beta, ha, hb, hc, 0, 0, 0),
            rec(Opcode.COPY_D2H, hc, 0, 0, 0, c0.nbytes),
        ],
        a.tobytes() + b.tobytes() + c0.tobytes(),
    )
    assert r.status == 0, r.message
    op_a = (a.T if ta else a).astype(np.float64)
    op_b = (b.T if tb else b).astype(np.float64)
    want = alpha * op_a @ op_b + beta * c0.astype(np.float64)
    got = np.frombuffer(r.data, npt).reshape(m, n).astype(np.float64)
    tol = 1e-4 if dtype == DType.F32 else 3e-2
    assert np.allclose(got, want, rtol=tol, atol=tol * 10)


def test_axpy_reduce_memset_d2d(client: RawClient) -> None:
    x = np.linspace(-1, 1, 1001, dtype=np.float32)
    y = np.full(1001, 0.25, dtype=np.float32)
    hx, hy, hout = alloc(client, x.nbytes), alloc(client, y.nbytes), alloc(client, 16)
    r = client.call(
        [
            rec(Opcode.COPY_H2D, hx, 0, 0, 0, x.nbytes),
            rec(Opcode.COPY_H2D, hy, 0, 0, 0, y.nbytes),
            rec(Opcode.AXPY, DType.F32, hx, hy, -3.0, 1001, 0, 0),
            rec(Opcode.REDUCE_SUM, DType.F32, hy, hout, 1001, 0, 4),
            rec(Opcode.COPY_D2H, hy, 0, 0, 0, y.nbytes),
            rec(Opcode.COPY_D2H, hout, 0, 4, 0, 4),
        ],
        x.tobytes() + y.tobytes(),
    )
    assert r.status == 0, r.message
    want_y = (-3.0 * x + y).astype(np.float32)
    got_y = np.frombuffer(r.data[: y.nbytes], np.float32)
    assert np.allclose(got_y, want_y, atol=1e-6)
    assert f64(r.results[3]) == pytest.approx(float(want_y.sum()), abs=1e-3)
    assert np.frombuffer(r.data[y.nbytes :], np.float32)[0] == pytest.approx(f64(r.results[3]))
    hd = alloc(client, 64)
    r = client.call(
        [
            rec(Opcode.MEMSET, hd, 0xAB, 0, 64),
            rec(Opcode.COPY_D2D, hd, hx, 8, 0, 16),
            rec(Opcode.COPY_D2H, hd, 0, 0, 0, 64),
        ]
    )
    assert r.status == 0, r.message
    assert r.data[:8] == b"\xab" * 8 and r.data[24:] == b"\xab" * 40
    assert r.data[8:24] == x.tobytes()[:16]


def test_errors_name_the_failing_record(client: RawClient) -> None:
    h = alloc(client, 100)
    cases = [
        ([rec(Opcode.MEMSET, 9999, 0, 0, 1)], ErrorCode.INVALID_HANDLE),
        ([rec(Opcode.MEMSET, h, 0, 90, 11)], ErrorCode.OUT_OF_RANGE),
        ([rec(Opcode.MEMSET, h, 0, (1 << 64) - 1, 2)], ErrorCode.OUT_OF_RANGE),
        ([rec(Opcode.MEMSET, h, 256, 0, 1)], ErrorCode.INVALID_ARGUMENT),
        ([rec(Opcode.COPY_D2H, h, 7, 0, 0, 1)], ErrorCode.INVALID_ARGUMENT),  # guest resource
        ([rec(Opcode.MODULE_LOAD, ModuleKind.PTX, "m", b"x")], ErrorCode.NOT_SUPPORTED),
        ([rec(Opcode.LAUNCH, 1, 1, 1, 1, 1, 1, 1, 0, "k", 0, [])], ErrorCode.NOT_SUPPORTED),
        ([rec(Opcode.NOP, stream=64)], ErrorCode.INVALID_ARGUMENT),
        ([rec(Opcode.AXPY, 9, h, h, 1.0, 1, 0, 0)], ErrorCode.INVALID_ARGUMENT),
        ([rec(Opcode.AXPY, DType.F32, h, h, 1.0, 1, 1, 0)], ErrorCode.INVALID_ARGUMENT),  # align
        (
            [rec(Opcode.GEMM, DType.F32, 0, 0, 10, 10, 10, 1.0, 0.0, h, h, h, 0, 0, 0)],
            ErrorCode.OUT_OF_RANGE,
        ),
        ([rec(Opcode.MEM_FREE, 0)], ErrorCode.INVALID_HANDLE),
    ]
    for records, code in cases:
        r = client.call([rec(Opcode.NOP), *records])
        assert (r.status, r.failed_index) == (code, 1), (records, r)
    # Earlier records of a failing batch took effect.
    r = client.call([rec(Opcode.MEM_ALLOC, 8, 0), rec(Opcode.MEM_FREE, 12345)])
    assert r.status == ErrorCode.INVALID_HANDLE and 0 in r.results
    r = client.call([rec(Opcode.MEM_FREE, r.results[0])])
    assert r.status == 0 and r.failed_index == NO_INDEX


def test_mem_quota(client: RawClient) -> None:
    def used() -> int:
        r = client.call([rec(Opcode.QUERY)])
        value: int = decode_payload("QUERY_INFO", r.blob)[6]
        return value

    before = used()
    r = client.call([rec(Opcode.MEM_ALLOC, QUOTA - before + 1, 0)])
    assert r.status == ErrorCode.QUOTA_EXCEEDED and "quota" in r.message
    assert used() == before
    h = alloc(client, QUOTA - before)
    assert client.call([rec(Opcode.MEM_ALLOC, 1, 0)]).status == ErrorCode.QUOTA_EXCEEDED
    assert client.call([rec(Opcode.MEM_FREE, h)]).status == 0
    assert used() == before


def test_inflight_limit_answers_at_once(client: RawClient) -> None:
    # A stream held by EVENT_WAIT on an unrecorded event, then more than the limit.
    held = [client.submit([rec(Opcode.EVENT_WAIT, 7, stream=1)])]
    held += [client.submit([rec(Opcode.NOP, stream=1)]) for _ in range(MAX_INFLIGHT - 1)]
    t0 = time.monotonic()
    over = [client.submit([rec(Opcode.NOP, stream=2)]) for _ in range(2)]
    over.append(client.submit([rec(Opcode.COPY_H2D, 1, 0, 0, 0, 5)], b"12345"))  # DATA dropped
    for seq in over:
        r = client.wait(seq)
        assert r.status == ErrorCode.QUOTA_EXCEEDED and "in flight" in r.message
    assert time.monotonic() - t0 < 1.0  # answered at once, not stalled behind stream 1
    statuses = [client.wait(s).status for s in held]  # the gate times out (2 s), then all run
    assert statuses == [ErrorCode.TIMEOUT] + [0] * (MAX_INFLIGHT - 1)
    assert client.call([rec(Opcode.NOP, stream=1)]).status == 0


def test_event_record_releases_waiting_stream(client: RawClient) -> None:
    h = alloc(client, 4)
    waiting = client.submit(
        [rec(Opcode.EVENT_WAIT, 8, stream=4), rec(Opcode.COPY_D2H, h, 0, 0, 0, 4, stream=4)]
    )
    # Asserting an absence: event 8 is recorded only below, so the copy must
    # not complete; 0.2 s gives a wrong agent the time to answer it.
    time.sleep(0.2)
    assert waiting not in client.completions
    r = client.call(
        [rec(Opcode.MEMSET, h, 0x42, 0, 4, stream=5), rec(Opcode.EVENT_RECORD, 8, stream=5)]
    )
    assert r.status == 0
    r = client.wait(waiting)
    assert r.status == 0 and r.data == b"BBBB"


def test_event_wait_times_out(client: RawClient) -> None:
    t0 = time.monotonic()
    r = client.call([rec(Opcode.EVENT_WAIT, 99, stream=3)])
    assert r.status == ErrorCode.TIMEOUT and 1.5 < time.monotonic() - t0 < 6


def test_ping_answered_during_long_command(client: RawClient) -> None:
    n = 1800  # ~6 GFLOP on the CPU: long enough to ping through
    h = alloc(client, n * n * 4)
    seq = client.submit(
        [
            rec(Opcode.MEMSET, h, 0, 0, n * n * 4),
            *[
                rec(Opcode.GEMM, DType.F32, 0, 0, n, n, n, 1.0, 0.0, h, h, h, 0, 0, 0)
                for _ in range(3)
            ],
        ]
    )
    worst = 0.0
    client.sock.settimeout(5)
    done = False
    for i in range(10):
        t0 = time.perf_counter()
        client.ping(i)
        while True:
            f = client.recv_frame()
            if f.type == FrameType.PONG:
                worst = max(worst, time.perf_counter() - t0)
                break
            client._take(f)
            done = seq in client.completions
        if done:
            break
        time.sleep(0.02)
    assert client.wait(seq).status == 0
    assert worst < 0.5, f"PONG took {worst * 1000:.0f} ms during a GEMM"


def test_pipelined_commands(client: RawClient) -> None:
    n = 2000
    t0 = time.perf_counter()
    pending: list[int] = []
    for _ in range(n):
        pending.append(client.submit([rec(Opcode.NOP)]))
        if len(pending) >= MAX_INFLIGHT // 2:
            assert client.wait(pending.pop(0)).status == 0
    for s in pending:
        assert client.wait(s).status == 0
    rate = n / (time.perf_counter() - t0)
    print(f"pipelined null commands: {rate:.0f}/s")


def test_malformed_frame_closes_only_that_session(agent: tuple[AgentProcess, bytes]) -> None:
    a, psk = agent
    good, bad = RawClient(a.port, psk=psk), RawClient(a.port, psk=psk)
    good.connect()
    bad.connect()
    bad.send_raw(b"NOPE" + bytes(20))
    frames = bad.expect_closed()
    errors = [decode_payload("ERROR", f.payload) for f in frames if f.type == FrameType.ERROR]
    assert errors and errors[0][0] == ErrorCode.PROTOCOL and errors[0][1] == 1
    assert good.call([rec(Opcode.NOP)]).status == 0
    bad2 = RawClient(a.port, psk=psk)
    bad2.connect()
    bad2.send(FrameType.COMMAND, b"\x00" * 7, seq=1)  # not a batch
    assert any(f.type == FrameType.ERROR for f in bad2.expect_closed())
    assert good.call([rec(Opcode.NOP)]).status == 0
    good.close()


def test_worker_crash_fails_only_its_session(agent: tuple[AgentProcess, bytes]) -> None:
    a, psk = agent
    victim, other = RawClient(a.port, psk=psk), RawClient(a.port, psk=psk)
    victim_sid = victim.connect() and victim.session
    other.connect()
    sessions = a.wait_sessions(
        lambda ss: any(s["session"] == victim_sid and s["env"] is not None and s["pid"] for s in ss)
    )
    pid = next(s["pid"] for s in sessions if s["session"] == victim_sid)
    os.kill(pid, signal.SIGKILL)
    victim.sock.settimeout(5)
    with pytest.raises((ConnectionError, OSError)):
        victim.call([rec(Opcode.NOP)])
    assert other.call([rec(Opcode.NOP)]).status == 0
    fresh = RawClient(a.port, psk=psk)
    fresh.connect()
    assert fresh.call([rec(Opcode.NOP)]).status == 0
    fresh.close()
    other.close()
    wait_for(lambda: f"event=worker_exited pid={pid}" in a.log_text(), 5, a.log_text)


def test_protocol_violations_in_session(agent: tuple[AgentProcess, bytes]) -> None:
    a, psk = agent
    for action in ("seq", "data", "session"):
        c = RawClient(a.port, psk=psk)
        c.connect()
        if action == "seq":
            assert c.call([rec(Opcode.NOP)]).status == 0
            c.send(FrameType.COMMAND, b"", seq=1)  # seq not increasing
        elif action == "data":
            c.send_raw(
                __import__("vpcie.protocol.frames", fromlist=["x"]).data_frame_header(
                    c.session, 5, 0, 1, last=True
                )
                + b"x"
            )
        else:
            c.session += 1
            c.send(FrameType.PING, b"\0" * 8)
        frames = c.expect_closed()
        assert any(f.type == FrameType.ERROR for f in frames), action


def test_idle_session_dropped(tmp_path: Path) -> None:
    psk = _psk(tmp_path)
    a = AgentProcess(tmp_path, "--psk-file", str(tmp_path / "psk"), "--idle-timeout", "1")
    try:
        c = RawClient(a.port, psk=psk)
        c.connect()
        t0 = time.monotonic()
        c.sock.settimeout(5)
        data = b""
        try:
            data = c.sock.recv(100)
        except (TimeoutError, ConnectionError):
            pass
        assert data == b"" and 0.8 < time.monotonic() - t0 < 4
        assert "event=session_idle" in a.log_text()
    finally:
        a.stop()
