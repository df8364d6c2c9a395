"""CuPy executor on a real GPU, through the same batch runner the agent uses."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np
import pytest

from host_agent.executors.base import DeviceIdentity, Executor, SessionLimits
from host_agent.runner import BatchRun, Command, EventGates, lane_of, stream_total
from vpcie.errors import ErrorCode
from vpcie.protocol.batch import Record, rec
from vpcie.protocol.codes import ArgKind, DType, ModuleKind, Opcode

pytestmark = pytest.mark.gpu
OK = ErrorCode.OK


@pytest.fixture(scope="module")
def ex() -> Iterator[Executor]:
    from host_agent.executors.cuda import CudaExecutor

    e = CudaExecutor(SessionLimits(256 << 20, 64), DeviceIdentity(agent="gpu-test"))
    yield e
    e.close()


def run(
    ex: Executor, records: list[Record], data: bytes = b""
) -> tuple[int, int, str, dict[int, int], bytes]:
    """Run records like a session does (staged H2D); returns status, index,
    message, results, D2H bytes."""
    cmd = Command(1, records, lane_of(records))
    cmd.h2d_total = stream_total(records, Opcode.COPY_H2D)
    cmd.d2h_total = stream_total(records, Opcode.COPY_D2H)
    if cmd.h2d_total:
        cmd.landing = ex.staging(cmd.h2d_total)
        pos = 0
        for v in cmd.landing.views(0, cmd.h2d_total):
            v[:] = data[pos : pos + len(v)]
            pos += len(v)
    out: list[bytes] = []
    payload = BatchRun(ex, EventGates(), 2.0, lambda off, v, last: out.append(bytes(v))).run(cmd)
    from vpcie.protocol.frames import decode_payload

    st, idx, msg, _n, res, _blob = decode_payload("COMPLETION", payload)
    return st, idx, msg, dict(res), b"".join(out)


def alloc(ex: Executor, size: int) -> int:
    st, _i, msg, res, _ = run(ex, [rec(Opcode.MEM_ALLOC, size, 0)])
    assert st == OK, msg
    return res[0]


def put(ex: Executor, h: int, arr: np.ndarray) -> None:
    raw = arr.tobytes()
    st, _i, msg, _r, _d = run(ex, [rec(Opcode.COPY_H2D, h, 0, 0, 0, len(raw))], raw)
    assert st == OK, msg


def get(ex: Executor, h: int, n: int, dtype: type, offset: int = 0) -> np.ndarray:
    size = n * np.dtype(dtype).itemsize
    st, _i, msg, _r, data = run(ex, [rec(Opcode.COPY_D2H, h, 0, offset, 0, size), rec(Opcode.SYNC)])
    assert st == OK, msg
    return np.frombuffer(data, dtype=dtype)


def test_query_says_cuda(ex: Executor) -> None:
    from host_agent.testclient import query_info

    info = query_info(ex.query_info())
    assert info["executor"] == 2 and info["mem_total"] > 0 and info["sm_count"] > 0


def test_copies_roundtrip_sizes(ex: Executor) -> None:
    rng = np.random.default_rng(1)
    for size in (0, 1, 4097, (8 << 20) + 3):
        h = alloc(ex, size + 16)
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        st, _i, msg, _r, _d = run(ex, [rec(Opcode.COPY_H2D, h, 0, 16, 0, size)], data)
        assert st == OK, msg
        st, _i, msg, _r, back = run(ex, [rec(Opcode.COPY_D2H, h, 0, 16, 0, size)])
        assert st == OK and back == data, (size, msg)
        run(ex, [rec(Opcode.MEM_FREE, h)])


def test_direct_landing_double_buffered(ex: Executor) -> None:
    h = alloc(ex, 10 << 20)
    region = ex.check_range(h, 1 << 20, 9 << 20)
    landing = ex.direct_landing([region], 0)
    assert landing is not None
    data = np.random.default_rng(2).integers(0, 256, 9 << 20, dtype=np.uint8).tobytes()
    for pos in range(0, len(data), 4 << 20):
        n = min(4 << 20, len(data) - pos)
        (view,) = landing.views(pos, n)
        view[:] = data[pos : pos + n]
        landing.chunk_done(pos, n)
    landing.finish()
    assert get(ex, h, 9 << 20, np.uint8, 1 << 20).tobytes() == data


def test_memset_d2d_and_bounds(ex: Executor) -> None:
    a, b = alloc(ex, 1000), alloc(ex, 1000)
    assert run(ex, [rec(Opcode.MEMSET, a, 0x5A, 0, 1000)])[0] == OK
    assert run(ex, [rec(Opcode.COPY_D2D, b, a, 100, 0, 900)])[0] == OK
    assert run(ex, [rec(Opcode.MEMSET, b, 1, 0, 100)])[0] == OK
    got = get(ex, b, 1000, np.uint8)
    assert (got[:100] == 1).all() and (got[100:] == 0x5A).all()
    st, idx, *_ = run(ex, [rec(Opcode.NOP), rec(Opcode.COPY_D2D, b, a, 500, 0, 501)])
    assert (st, idx) == (ErrorCode.OUT_OF_RANGE, 1)
    assert run(ex, [rec(Opcode.MEMSET, 999, 0, 0, 1)])[0] == ErrorCode.INVALID_HANDLE


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16])
@pytest.mark.parametrize(("ta", "tb"), [(0, 0), (1, 0), (0, 1)])
def test_gemm_matches_numpy(ex: Executor, dtype: DType, ta: int, tb: int) -> None:
    npt = np.float32 if dtype == DType.F32 else np.float16
    m, n, k = 67, 45, 129
    rng = np.random.default_rng(3)
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(npt)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(npt)
    c0 = rng.standard_normal((m, n)).astype(npt)
    ha, hb, hc = alloc(ex, a.nbytes), alloc(ex, b.nbytes), alloc(ex, c0.nbytes)
    put(ex, ha, a)
    put(ex, hb, b)
    put(ex, hc, c0)
    alpha, beta = 1.5, 0.5
    st, _i, msg, _r, _d = run(
        ex, [rec(Opcode.GEMM, dtype, ta, tb, m, n, k, alpha, beta, ha, hb, hc, 0, 0, 0)]
    )
    assert st == OK, msg
    op_a = (a.T if ta else a).astype(np.float64)
    op_b = (b.T if tb else b).astype(np.float64)
    want = alpha * op_a @ op_b + beta * c0.astype(np.float64)
    got = get(ex, hc, m * n, npt).reshape(m, n).astype(np.float64)
    tol = 1e-3 if dtype == DType.F32 else 5e-2
    assert np.allclose(got, want, rtol=tol, atol=tol * np.sqrt(k))


def test_axpy_and_reduce(ex: Executor) -> None:
    x = np.arange(1000, dtype=np.float32)
    y = np.ones(1000, dtype=np.float32)
    hx, hy, ho = alloc(ex, x.nbytes), alloc(ex, y.nbytes), alloc(ex, 8)
    put(ex, hx, x)
    put(ex, hy, y)
    assert run(ex, [rec(Opcode.AXPY, DType.F32, hx, hy, 2.0, 1000, 0, 0)])[0] == OK
    assert np.array_equal(get(ex, hy, 1000, np.float32), 2 * x + 1)
    st, _i, msg, res, _ = run(ex, [rec(Opcode.REDUCE_SUM, DType.F32, hy, ho, 1000, 0, 0)])
    assert st == OK, msg
    want = float((2 * x + 1).sum())
    assert struct.unpack("<d", struct.pack("<Q", res[0]))[0] == pytest.approx(want)
    assert get(ex, ho, 1, np.float32)[0] == pytest.approx(want)


CUDA_C = r"""
extern "C" __global__ void scale_add(float *y, const float *x, float a, unsigned n) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}
"""


def _launch_scale_add(ex: Executor, module: int) -> None:
    x = np.arange(300, dtype=np.float32)
    hx, hy = alloc(ex, x.nbytes), alloc(ex, x.nbytes)
    put(ex, hx, x)
    put(ex, hy, np.ones(300, np.float32))
    a_bits = struct.unpack("<I", struct.pack("<f", 3.0))[0]
    args = [
        (ArgKind.PTR, hy, 0),
        (ArgKind.PTR, hx, 0),
        (ArgKind.F32, 0, a_bits),
        (ArgKind.U32, 0, 300),
    ]
    st, _i, msg, _r, _d = run(
        ex, [rec(Opcode.LAUNCH, module, 3, 1, 1, 128, 1, 1, 0, "scale_add", len(args), args)]
    )
    assert st == OK, msg
    assert np.allclose(get(ex, hy, 300, np.float32), 3 * x + 1)


def test_cuda_c_module_launch(ex: Executor) -> None:
    st, _i, msg, res, _ = run(
        ex, [rec(Opcode.MODULE_LOAD, ModuleKind.CUDA_C, "k", CUDA_C.encode())]
    )
    assert st == OK, msg
    _launch_scale_add(ex, res[0])
    st, *_ = run(ex, [rec(Opcode.MODULE_LOAD, ModuleKind.CUDA_C, "bad", b"this is not C")])
    assert st == ErrorCode.COMPILE_FAILED
    st, *_ = run(ex, [rec(Opcode.LAUNCH, res[0], 1, 1, 1, 1, 1, 1, 0, "nope", 0, [])])
    assert st == ErrorCode.INVALID_ARGUMENT


def test_ptx_module_launch(ex: Executor) -> None:
    import cupy
    from cupy.cuda import nvrtc

    cc = cupy.cuda.Device(0).compute_capability
    prog = nvrtc.createProgram(CUDA_C, "k.cu", [], [])
    nvrtc.compileProgram(prog, [f"-arch=compute_{cc}"])
    ptx = nvrtc.getPTX(prog)
    code = ptx if isinstance(ptx, bytes) else ptx.encode()
    assert b".entry" in code
    st, _i, msg, res, _ = run(ex, [rec(Opcode.MODULE_LOAD, ModuleKind.PTX, "p", code)])
    assert st == OK, msg
    _launch_scale_add(ex, res[0])
    assert run(ex, [rec(Opcode.MODULE_FREE, res[0])])[0] == OK


def test_events_order_streams(ex: Executor) -> None:
    h = alloc(ex, 4 << 20)
    gates = EventGates()
    recs1 = [rec(Opcode.MEMSET, h, 7, 0, 4 << 20, stream=1), rec(Opcode.EVENT_RECORD, 5, stream=1)]
    recs2 = [
        rec(Opcode.EVENT_WAIT, 5, stream=2),
        rec(Opcode.MEMSET, h, 9, 0, 1, stream=2),
        rec(Opcode.SYNC, stream=2),
    ]
    for recs in (recs1, recs2):
        cmd = Command(1, recs, lane_of(recs))
        payload = BatchRun(ex, gates, 2.0, lambda *a: None).run(cmd)
        from vpcie.protocol.frames import decode_payload

        assert decode_payload("COMPLETION", payload)[0] == OK
    got = get(ex, h, 4 << 20, np.uint8)
    assert got[0] == 9 and (got[1:] == 7).all()


def test_quota_exceeded_allocates_nothing(ex: Executor) -> None:
    used = ex.mem_used
    st, *_ = run(ex, [rec(Opcode.MEM_ALLOC, ex.limits.mem_quota, 0)])
    assert st == ErrorCode.QUOTA_EXCEEDED and ex.mem_used == used
