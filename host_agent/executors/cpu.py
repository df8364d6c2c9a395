"""CPU executor: NumPy on the agent's CPU. An honest executor, not a GPU: it
says so in QUERY_INFO (executor CPU, name "cpu-numpy (not a GPU)").

Device memory is one ``uint8`` NumPy array per allocation; H2D DATA lands in
it directly and D2H is sent from it directly (memoryviews, no copies). Work
runs synchronously in the calling thread; big NumPy operations release the
GIL, so the session's reader keeps answering PINGs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from host_agent.executors.base import Executor, HostLanding, Landing, Region
from host_agent.executors.cpu_info import CPU_NAME, host_memory_bytes
from vpcie.errors import ErrorCode, VgpuError
from vpcie.protocol.codes import DType, ExecutorKind

NP_DTYPES: dict[DType, type[np.generic]] = {
    DType.F32: np.float32,
    DType.F16: np.float16,
    DType.F64: np.float64,
}


def typed(region: Region, dtype: DType, count: int) -> npt.NDArray[Any]:
    """``count`` elements of ``dtype`` at the region's start (range checked)."""
    arr: npt.NDArray[np.uint8] = region.buf.mem
    itemsize = np.dtype(NP_DTYPES[dtype]).itemsize
    return arr[region.offset : region.offset + count * itemsize].view(NP_DTYPES[dtype])


class CpuExecutor(Executor):
    kind = ExecutorKind.CPU
    name = CPU_NAME

    def mem_info(self) -> tuple[int, int]:
        total = min(host_memory_bytes(), self.limits.mem_quota) or host_memory_bytes()
        return total, max(total - self.mem_used, 0)

    def _alloc(self, size: int) -> Any:
        try:
            return np.empty(size, dtype=np.uint8)
        except MemoryError as exc:
            raise VgpuError(ErrorCode.OUT_OF_MEMORY, f"{size} bytes: {exc}") from exc

    @staticmethod
    def _view(region: Region) -> memoryview:
        arr: npt.NDArray[np.uint8] = region.buf.mem
        view = memoryview(arr.data)  # the array's own buffer: no copy
        return view[region.offset : region.offset + region.size]

    def direct_landing(self, regions: list[Region], stream: int) -> Landing | None:
        return HostLanding([self._view(r) for r in regions])

    def copy_h2d(self, dst: Region, src: memoryview, stream: int) -> None:
        self._view(dst)[:] = src

    def d2h_chunks(self, src: Region, chunk: int, stream: int) -> Iterator[memoryview]:
        view = self._view(src)
        for pos in range(0, len(view), chunk):
            yield view[pos : pos + chunk]

    def copy_d2d(self, dst: Region, src: Region, stream: int) -> None:
        d: npt.NDArray[np.uint8] = dst.buf.mem
        s: npt.NDArray[np.uint8] = src.buf.mem
        # np.copyto handles overlap inside one allocation (memmove semantics).
        np.copyto(d[dst.offset : dst.offset + dst.size], s[src.offset : src.offset + src.size])

    def memset(self, dst: Region, value: int, stream: int) -> None:
        d: npt.NDArray[np.uint8] = dst.buf.mem
        d[dst.offset : dst.offset + dst.size] = value

    def gemm(
        self,
        dtype: DType,
        trans_a: bool,
        trans_b: bool,
        m: int,
        n: int,
        k: int,
        alpha: float,
        beta: float,
        a: Region,
        b: Region,
        c: Region,
        stream: int,
    ) -> None:
        amat = typed(a, dtype, m * k).reshape((k, m) if trans_a else (m, k))
        bmat = typed(b, dtype, k * n).reshape((n, k) if trans_b else (k, n))
        cmat = typed(c, dtype, m * n).reshape((m, n))
        op_a = amat.T if trans_a else amat
        op_b = bmat.T if trans_b else bmat
        if dtype == DType.F16:  # NumPy has no fp16 BLAS: accumulate in fp32, as cuBLAS does
            op_a, op_b = op_a.astype(np.float32), op_b.astype(np.float32)
        if alpha == 1.0 and beta == 0.0 and dtype != DType.F16:
            np.matmul(op_a, op_b, out=cmat)
            return
        prod = np.matmul(op_a, op_b)
        if alpha != 1.0:
            prod *= alpha
        if beta != 0.0:  # BLAS: beta == 0 means C is not read (NaNs in C vanish)
            prod += beta * cmat.astype(prod.dtype)
        cmat[...] = prod

    def axpy(self, dtype: DType, alpha: float, x: Region, y: Region, stream: int) -> None:
        isz = np.dtype(NP_DTYPES[dtype]).itemsize
        n = x.size // isz
        xv, yv = typed(x, dtype, n), typed(y, dtype, n)
        if dtype == DType.F16:
            yv[...] = (np.float32(alpha) * xv.astype(np.float32) + yv).astype(np.float16)
        else:
            yv += NP_DTYPES[dtype](alpha) * xv

    def reduce_sum(self, dtype: DType, x: Region, out: Region | None, stream: int) -> float:
        isz = np.dtype(NP_DTYPES[dtype]).itemsize
        xv = typed(x, dtype, x.size // isz)
        acc = np.float32 if dtype == DType.F16 else NP_DTYPES[dtype]
        total = xv.sum(dtype=acc).astype(NP_DTYPES[dtype])
        if out is not None:
            typed(out, dtype, 1)[0] = total
        return float(total)
