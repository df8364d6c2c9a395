"""Session state between two CUDA sessions on a real GPU (docs/PROTOCOL.md
"Session state"): buffers, contents, a CUDA C module (recompiled on the
target) and events move; the guest's handles stay the same."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np
import pytest

from host_agent.executors.base import DeviceIdentity, Executor, SessionLimits
from host_agent.runner import BatchRun, Command, EventGates, lane_of, stream_total
from vpcie.errors import ErrorCode
from vpcie.protocol.batch import Record, rec
from vpcie.protocol.codes import HANDLE_EPOCH_SHIFT, ArgKind, ModuleKind, Opcode
from vpcie.protocol.frames import decode_payload

pytestmark = pytest.mark.gpu
EPOCH = 2
N = 300
CUDA_C = r"""
extern "C" __global__ void scale_add(float *y, const float *x, float a, unsigned n) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}
"""


class Session:
    """One CUDA executor and its runner state, driven like an agent session."""

    def __init__(self) -> None:
        from host_agent.executors.cuda import CudaExecutor

        self.ex: Executor = CudaExecutor(SessionLimits(256 << 20, 64), DeviceIdentity())
        self.ex.set_handle_epoch(EPOCH)
        self.gates = EventGates()

    def run(self, records: list[Record], data: bytes = b"") -> tuple[dict[int, int], bytes, bytes]:
        cmd = Command(1, records, lane_of(records))
        cmd.h2d_total = stream_total(records, Opcode.COPY_H2D)
        cmd.d2h_total = stream_total(records, Opcode.COPY_D2H)
        if cmd.h2d_total:
            cmd.landing = self.ex.staging(cmd.h2d_total)
            pos = 0
            for v in cmd.landing.views(0, cmd.h2d_total):
                v[:] = data[pos : pos + len(v)]
                pos += len(v)
        out: list[bytes] = []
        runner = BatchRun(self.ex, self.gates, 2.0, lambda off, v, last: out.append(bytes(v)))
        st, _i, msg, _n, res, blob = decode_payload("COMPLETION", runner.run(cmd))
        assert st == ErrorCode.OK, msg
        return dict(res), blob, b"".join(out)


@pytest.fixture
def pair() -> Iterator[tuple[Session, Session]]:
    a, b = Session(), Session()
    yield a, b
    a.ex.close()
    b.ex.close()


def _launch(s: Session, module: int, hy: int, hx: int, a: float) -> None:
    bits = struct.unpack("<I", struct.pack("<f", a))[0]
    args = [(ArgKind.PTR, hy, 0), (ArgKind.PTR, hx, 0), (ArgKind.F32, 0, bits),
            (ArgKind.U32, 0, N)]  # fmt: skip
    s.run([rec(Opcode.LAUNCH, module, 3, 1, 1, 128, 1, 1, 0, "scale_add", len(args), args)])


def test_state_moves_between_cuda_sessions(pair: tuple[Session, Session]) -> None:
    src, dst = pair
    x = np.arange(N, dtype=np.float32)
    load = rec(Opcode.MODULE_LOAD, ModuleKind.CUDA_C, "k.cu", CUDA_C.encode())
    res, _, _ = src.run(
        [rec(Opcode.MEM_ALLOC, x.nbytes, 0), rec(Opcode.MEM_ALLOC, x.nbytes, 0), load]
    )
    hx, hy, mod = res[0], res[1], res[2]
    assert {h >> HANDLE_EPOCH_SHIFT for h in (hx, hy, mod)} == {EPOCH}
    src.run([rec(Opcode.COPY_H2D, hx, 0, 0, 0, x.nbytes)], x.tobytes())
    src.run([rec(Opcode.COPY_H2D, hy, 0, 0, 0, x.nbytes)], np.ones(N, np.float32).tobytes())
    _launch(src, mod, hy, hx, 3.0)  # y = 3x + 1, still running maybe: STATE_EXPORT waits
    src.run([rec(Opcode.EVENT_RECORD, 7, stream=1)])

    _, blob, _ = src.run([rec(Opcode.STATE_EXPORT)])
    epoch, nxt, _used, events, _nb, bufs, _nm, mods = decode_payload("STATE_SUMMARY", blob)
    assert epoch == EPOCH and sorted(h for h, _ in bufs) == sorted([hx, hy])
    assert [(m[0], m[1], m[2]) for m in mods] == [(mod, int(ModuleKind.CUDA_C), "k.cu")]
    code = src.run([rec(Opcode.MODULE_EXPORT, mod)])[1]
    assert code == CUDA_C.encode()

    dst.run([rec(Opcode.MODULE_LOAD_AT, mod, ModuleKind.CUDA_C, "k.cu", code)])
    for h, size in bufs:
        dst.run([rec(Opcode.ALLOC_AT, h, size, 0)])
        moved = src.run([rec(Opcode.COPY_D2H, h, 0, 0, 0, size)])[2]
        dst.run([rec(Opcode.COPY_H2D, h, 0, 0, 0, size)], moved)
    dst.run([rec(Opcode.SESSION_RESTORE, nxt, events)])
    dst.run([rec(Opcode.EVENT_WAIT, 7, stream=2)])  # restored as complete: no wait

    _launch(dst, mod, hy, hx, 2.0)  # the same handles, the module compiled here
    y = np.frombuffer(dst.run([rec(Opcode.COPY_D2H, hy, 0, 0, 0, x.nbytes), rec(Opcode.SYNC)])[2],
                      dtype=np.float32)  # fmt: skip
    assert np.allclose(y, 5 * x + 1)
    fresh = dst.run([rec(Opcode.MEM_ALLOC, 16, 0)])[0][0]
    assert fresh == (EPOCH << HANDLE_EPOCH_SHIFT) | nxt
