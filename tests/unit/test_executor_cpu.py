"""CPU executor and the batch runner, in-process (no sockets)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from host_agent.executors.base import (
    DeviceIdentity,
    Executor,
    NullExecutor,
    SessionLimits,
    slice_segments,
)
from host_agent.executors.cpu import CpuExecutor
from host_agent.runner import BARRIER, BatchRun, Command, EventGates, lane_of, stream_total
from host_agent.testclient import query_info
from vpcie.errors import ErrorCode, VgpuError
from vpcie.protocol.batch import Record, rec
from vpcie.protocol.codes import ALL_STREAMS, DType, ExecutorKind, Opcode
from vpcie.protocol.frames import decode_payload


def make(quota: int = 1 << 20) -> CpuExecutor:
    return CpuExecutor(SessionLimits(quota, 4), DeviceIdentity(uuid="cpu0", agent="unit"))


def run(
    ex: Executor, records: list[Record], data: bytes = b""
) -> tuple[int, int, dict[int, int], bytes]:
    cmd = Command(1, records, lane_of(records))
    cmd.h2d_total = stream_total(records, Opcode.COPY_H2D)
    cmd.d2h_total = stream_total(records, Opcode.COPY_D2H)
    if cmd.h2d_total:
        cmd.landing = ex.staging(cmd.h2d_total)
        cmd.landing.views(0, cmd.h2d_total)[0][:] = data
    out: list[tuple[int, bytes, bool]] = []
    payload = BatchRun(
        ex, EventGates(), 0.2, lambda o, v, last: out.append((o, bytes(v), last))
    ).run(cmd)
    st, idx, _msg, _n, res, _blob = decode_payload("COMPLETION", payload)
    if out:
        assert out[-1][2] and not any(last for _, _, last in out[:-1])
    return st, idx, dict(res), b"".join(b for _, b, _ in out)


def test_query_is_honest() -> None:
    info = query_info(make().query_info())
    assert info["executor"] == ExecutorKind.CPU and info["name"] == "cpu-numpy (not a GPU)"
    assert info["mem_quota"] == 1 << 20 and info["uuid"] == "cpu0"


def test_handles_are_small_ids_and_quota_is_exact() -> None:
    ex = make(1000)
    st, _i, res, _ = run(ex, [rec(Opcode.MEM_ALLOC, 600, 0), rec(Opcode.MEM_ALLOC, 400, 0)])
    assert st == 0 and res == {0: 1, 1: 2} and ex.mem_used == 1000
    st, idx, _r, _ = run(ex, [rec(Opcode.MEM_ALLOC, 1, 0)])
    assert (st, idx) == (ErrorCode.QUOTA_EXCEEDED, 0) and ex.mem_used == 1000
    assert run(ex, [rec(Opcode.MEM_FREE, 1)])[0] == 0 and ex.mem_used == 400
    assert run(ex, [rec(Opcode.MEM_FREE, 1)])[0] == ErrorCode.INVALID_HANDLE


@pytest.mark.parametrize(
    ("offset", "size"), [(0, 101), (100, 1), (101, 0), (2**64 - 1, 2), (1, 2**64 - 1)]
)
def test_check_range_rejects(offset: int, size: int) -> None:
    ex = make()
    h = ex.mem_alloc(100)
    with pytest.raises(VgpuError) as err:
        ex.check_range(h, offset, size)
    assert err.value.code == ErrorCode.OUT_OF_RANGE
    assert ex.check_range(h, 100, 0).size == 0


def test_copies_and_d2h_chunks() -> None:
    ex = make(64 << 20)
    h = ex.mem_alloc(9 << 20)
    data = np.random.default_rng(0).integers(0, 256, 9 << 20, dtype=np.uint8).tobytes()
    assert run(ex, [rec(Opcode.COPY_H2D, h, 0, 0, 0, len(data))], data)[0] == 0
    st, _i, _r, back = run(ex, [rec(Opcode.COPY_D2H, h, 0, 0, 0, len(data))])
    assert st == 0 and back == data
    chunks = list(ex.d2h_chunks(ex.check_range(h, 0, len(data)), 4 << 20, 0))
    assert [len(c) for c in chunks] == [4 << 20, 4 << 20, 1 << 20]


def test_gemm_alpha_beta_and_nan_free_beta_zero() -> None:
    ex = make(1 << 20)
    m = n = k = 8
    a = np.arange(64, dtype=np.float32).reshape(8, 8)
    ha, hc = ex.mem_alloc(256), ex.mem_alloc(256)
    c0 = np.full((8, 8), np.nan, np.float32)
    st, *_ = run(
        ex,
        [
            rec(Opcode.COPY_H2D, ha, 0, 0, 0, 256),
            rec(Opcode.COPY_H2D, hc, 0, 0, 0, 256),
            rec(Opcode.GEMM, DType.F32, 1, 0, m, n, k, 2.0, 0.0, ha, ha, hc, 0, 0, 0),
        ],
        a.tobytes() + c0.tobytes(),
    )
    assert st == 0
    got = np.frombuffer(run(ex, [rec(Opcode.COPY_D2H, hc, 0, 0, 0, 256)])[3], np.float32)
    assert np.array_equal(got.reshape(8, 8), 2 * a.T @ a)


def test_reduce_f16_and_f64_bits() -> None:
    ex = make()
    x = np.full(3000, 0.5, np.float16)  # fp16 accumulation would stall at 1024
    h = ex.mem_alloc(x.nbytes)
    st, _i, res, _ = run(
        ex,
        [
            rec(Opcode.COPY_H2D, h, 0, 0, 0, x.nbytes),
            rec(Opcode.REDUCE_SUM, DType.F16, h, 0, 3000, 0, 0),
        ],
        x.tobytes(),
    )
    assert st == 0 and struct.unpack("<d", struct.pack("<Q", res[1]))[0] == 1500.0


def test_unknown_opcode_and_stream_caps() -> None:
    ex = make()
    raw = Record(200, 0, 0, b"abc")
    assert run(ex, [raw])[:2] == (ErrorCode.NOT_SUPPORTED, 0)
    assert run(ex, [rec(Opcode.SYNC, stream=ALL_STREAMS)])[0] == 0
    assert run(ex, [rec(Opcode.NOP, stream=ALL_STREAMS)])[0] == ErrorCode.INVALID_ARGUMENT
    assert run(ex, [rec(Opcode.EVENT_RECORD, 5000)])[0] == ErrorCode.INVALID_ARGUMENT
    assert run(ex, [rec(Opcode.EVENT_WAIT, 3)])[0] == ErrorCode.TIMEOUT  # 0.2 s gate


def test_lanes() -> None:
    assert lane_of([rec(Opcode.NOP, stream=3), rec(Opcode.NOP, stream=3)]) == 3
    assert lane_of([rec(Opcode.NOP, stream=3), rec(Opcode.NOP, stream=4)]) == BARRIER
    assert lane_of([rec(Opcode.SYNC, stream=ALL_STREAMS)]) == BARRIER


def test_slice_segments() -> None:
    segs = [
        memoryview(bytearray(b"abc")),
        memoryview(bytearray(b"")),
        memoryview(bytearray(b"defg")),
    ]
    assert [bytes(v) for v in slice_segments(segs, 2, 3)] == [b"c", b"de"]
    assert [bytes(v) for v in slice_segments(segs, 0, 7)] == [b"abc", b"defg"]


def test_null_executor_supports_nothing() -> None:
    ex = NullExecutor(SessionLimits(100, 1), DeviceIdentity())
    assert run(ex, [rec(Opcode.MEM_ALLOC, 1, 0)])[0] == ErrorCode.NOT_SUPPORTED
    assert query_info(ex.query_info())["executor"] == ExecutorKind.NONE


def test_scan_agrees_with_lane_of_and_stream_total() -> None:
    """runner.scan (the one-pass hot path) gives what lane_of/stream_total give."""
    import random

    from host_agent.runner import lane_of, scan, stream_total
    from vpcie.protocol.batch import rec
    from vpcie.protocol.codes import Opcode

    rnd = random.Random(7)
    for _ in range(500):
        records = []
        for _ in range(rnd.randrange(0, 6)):
            stream = rnd.choice([0, 1, 5, 63, 64, 0xFFFFFFFF])
            kind = rnd.randrange(3)
            if kind == 0:
                records.append(rec(Opcode.NOP, stream=stream))
            else:
                op = Opcode.COPY_H2D if kind == 1 else Opcode.COPY_D2H
                res = rnd.choice([0, 0, 3])
                records.append(rec(op, 1, res, 0, 0, rnd.randrange(100), stream=stream))
        expect = (
            lane_of(records),
            stream_total(records, Opcode.COPY_H2D),
            stream_total(records, Opcode.COPY_D2H),
        )
        assert scan(records) == expect
