"""CuPy executor: one session on one GPU or MIG slice.

Imported only inside a worker after ``CUDA_VISIBLE_DEVICES`` is pinned to the
session's device UUID, so device 0 is the session's device and nothing else is
visible. Memory comes from a session-private CuPy pool capped at the quota;
streams are ``cupy.cuda.Stream`` per stream id (at most MAX_STREAMS); events
are ``cupy.cuda.Event``; modules are PTX/cubin (cuModuleLoadData) or CUDA C
compiled by NVRTC (``cupy.RawModule``).

Copies: H2D DATA lands in two pinned chunks, each copied asynchronously to the
device while the next one is received (double buffering); D2H is copied to
pinned chunks, the next chunk's copy overlapping the send of the previous.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import cupy
import numpy as np

from host_agent.executors.base import (
    DeviceIdentity,
    Executor,
    HostLanding,
    Landing,
    Region,
    SessionLimits,
)
from vpcie.errors import ErrorCode, VgpuError
from vpcie.protocol.codes import (
    MAX_DATA_CHUNK,
    MAX_STREAMS,
    ArgKind,
    DType,
    ExecutorKind,
    ModuleKind,
)

CP_DTYPES: dict[DType, Any] = {DType.F32: np.float32, DType.F16: np.float16, DType.F64: np.float64}
_ITEMSIZE = {DType.F32: 4, DType.F16: 2, DType.F64: 8}
_D2D = 3  # cudaMemcpyDeviceToDevice
_H2D = 1
_D2H = 2


def _pinned(n: int) -> tuple[Any, memoryview]:
    mem = cupy.cuda.alloc_pinned_memory(max(n, 1))
    arr = np.frombuffer(mem, dtype=np.uint8, count=max(n, 1))  # type: ignore[call-overload]
    view = memoryview(arr.data)[:n]
    return mem, view


class CudaLanding(Landing):
    """H2D straight to device memory via two pinned chunks (double-buffered)."""

    def __init__(self, ex: CudaExecutor, regions: list[Region], stream: Any) -> None:
        self.ex = ex
        self.regions = regions
        self.total = sum(r.size for r in regions)
        self.stream = stream
        self.count = 0

    def views(self, offset: int, n: int) -> list[memoryview]:
        if n > MAX_DATA_CHUNK:
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, "DATA chunk over the cap")
        slot = self.count % 2
        self.count += 1
        ev = self.ex.landing_events[slot]
        if ev is not None:
            ev.synchronize()  # that chunk's previous copy is done
        self.slot = slot
        return [self.ex.landing_views[slot][:n]]

    def chunk_done(self, offset: int, n: int) -> None:
        slot = self.slot
        base = self.ex.landing_mem[slot].ptr
        pos = 0  # position inside the chunk
        start = 0  # running stream offset of each region
        for r in self.regions:
            lo, hi = max(offset, start), min(offset + n, start + r.size)
            if lo < hi:
                dst = r.buf.mem.ptr + r.offset + (lo - start)
                cupy.cuda.runtime.memcpyAsync(dst, base + pos, hi - lo, _H2D, self.stream.ptr)
                pos += hi - lo
            start += r.size
        ev = cupy.cuda.Event(disable_timing=True)
        ev.record(self.stream)
        self.ex.landing_events[slot] = ev

    def finish(self) -> None:
        self.stream.synchronize()


class PinnedStaging(HostLanding):
    def __init__(self, total: int) -> None:
        self.mem, view = _pinned(total)
        super().__init__([view] if total else [])


class CudaExecutor(Executor):
    kind = ExecutorKind.CUDA
    name = "cuda"
    synchronous = False

    def __init__(self, limits: SessionLimits, identity: DeviceIdentity) -> None:
        self.device = cupy.cuda.Device(0)
        self.device.use()
        attrs = self.device.attributes
        cc = str(self.device.compute_capability)
        props = cupy.cuda.runtime.getDeviceProperties(0)
        gpu_name = (
            props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        )
        identity = DeviceIdentity(
            name=identity.name or gpu_name,
            uuid=identity.uuid,
            agent=identity.agent,
            sm_count=int(attrs.get("MultiProcessorCount", 0)),
            cc_major=int(cc[:-1] or 0),
            cc_minor=int(cc[-1:] or 0),
        )
        super().__init__(limits, identity)
        self.pool = cupy.cuda.MemoryPool()
        cupy.cuda.set_allocator(self.pool.malloc)
        self.streams: dict[int, Any] = {}
        self.events: dict[int, Any] = {}
        self.landing_mem: list[Any] = []
        self.landing_views: list[memoryview] = []
        self.landing_events: list[Any] = [None, None]
        self._keep: list[tuple[Any, Any]] = []  # (event, pinned) until the copy is done

    def stream(self, sid: int) -> Any:
        s = self.streams.get(sid)
        if s is None:
            if sid >= MAX_STREAMS:
                raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"stream {sid} >= {MAX_STREAMS}")
            s = self.streams[sid] = cupy.cuda.Stream(non_blocking=True)
        return s

    def mem_info(self) -> tuple[int, int]:
        free, total = cupy.cuda.runtime.memGetInfo()
        return int(total), int(free)

    def _alloc(self, size: int) -> Any:
        try:
            return self.pool.malloc(size)
        except cupy.cuda.memory.OutOfMemoryError as exc:
            raise VgpuError(ErrorCode.OUT_OF_MEMORY, f"{size} bytes: {exc}") from exc

    def _arr(self, region: Region, dtype: DType, shape: tuple[int, ...]) -> Any:
        return cupy.ndarray(shape, dtype=CP_DTYPES[dtype], memptr=region.buf.mem + region.offset)

    # -- copies -----------------------------------------------------------------
    def direct_landing(self, regions: list[Region], stream: int) -> Landing | None:
        if not self.landing_mem:
            for _ in range(2):
                mem, view = _pinned(MAX_DATA_CHUNK)
                self.landing_mem.append(mem)
                self.landing_views.append(view)
        return CudaLanding(self, regions, self.stream(stream))

    def staging(self, total: int) -> Landing:
        return PinnedStaging(total)

    def copy_h2d(self, dst: Region, src: memoryview, stream: int) -> None:
        s = self.stream(stream)
        host = np.frombuffer(src, dtype=np.uint8)
        cupy.cuda.runtime.memcpyAsync(
            dst.buf.mem.ptr + dst.offset, host.ctypes.data, dst.size, _H2D, s.ptr
        )
        ev = cupy.cuda.Event(disable_timing=True)
        ev.record(s)
        self._keep = [(e, m) for e, m in self._keep if not e.done]
        self._keep.append((ev, src))

    def d2h_chunks(self, src: Region, chunk: int, stream: int) -> Iterator[memoryview]:
        if src.size == 0:
            return
        s = self.stream(stream)
        size = min(chunk, src.size)
        bufs = [_pinned(size), _pinned(size)]
        starts = list(range(0, src.size, chunk))
        events: list[Any] = [None, None]

        def issue(i: int) -> None:
            pos = starts[i]
            n = min(chunk, src.size - pos)
            mem, _view = bufs[i % 2]
            cupy.cuda.runtime.memcpyAsync(
                mem.ptr, src.buf.mem.ptr + src.offset + pos, n, _D2H, s.ptr
            )
            ev = cupy.cuda.Event(disable_timing=True)
            ev.record(s)
            events[i % 2] = ev

        issue(0)
        for i, pos in enumerate(starts):
            if i + 1 < len(starts):
                issue(i + 1)
            events[i % 2].synchronize()
            n = min(chunk, src.size - pos)
            yield bufs[i % 2][1][:n]

    def copy_d2d(self, dst: Region, src: Region, stream: int) -> None:
        s = self.stream(stream)
        d, sp = dst.buf.mem.ptr + dst.offset, src.buf.mem.ptr + src.offset
        if dst.buf is src.buf and abs(d - sp) < dst.size:  # overlap: go through a temp
            tmp = self.pool.malloc(dst.size)
            cupy.cuda.runtime.memcpyAsync(tmp.ptr, sp, dst.size, _D2D, s.ptr)
            cupy.cuda.runtime.memcpyAsync(d, tmp.ptr, dst.size, _D2D, s.ptr)
            s.synchronize()
            return
        cupy.cuda.runtime.memcpyAsync(d, sp, dst.size, _D2D, s.ptr)

    def memset(self, dst: Region, value: int, stream: int) -> None:
        s = self.stream(stream)
        cupy.cuda.runtime.memsetAsync(dst.buf.mem.ptr + dst.offset, value, dst.size, s.ptr)

    # -- built-in kernels -----------------------------------------------------------
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
        with self.stream(stream):
            amat = self._arr(a, dtype, (k, m) if trans_a else (m, k))
            bmat = self._arr(b, dtype, (n, k) if trans_b else (k, n))
            cmat = self._arr(c, dtype, (m, n))
            op_a = amat.T if trans_a else amat
            op_b = bmat.T if trans_b else bmat
            if alpha == 1.0 and beta == 0.0:
                cupy.matmul(op_a, op_b, out=cmat)  # cuBLAS (GemmEx for fp16)
                return
            prod = cupy.matmul(op_a, op_b)
            if beta == 0.0:
                cupy.multiply(prod, CP_DTYPES[dtype](alpha), out=cmat)
            else:
                tmp = prod.astype(np.float32) * np.float32(alpha) + cmat.astype(
                    np.float32
                ) * np.float32(beta)
                cmat[...] = tmp.astype(CP_DTYPES[dtype])

    def axpy(self, dtype: DType, alpha: float, x: Region, y: Region, stream: int) -> None:
        n = x.size // _ITEMSIZE[dtype]
        with self.stream(stream):
            xv, yv = self._arr(x, dtype, (n,)), self._arr(y, dtype, (n,))
            if dtype == DType.F16:
                yv[...] = (xv.astype(np.float32) * np.float32(alpha) + yv).astype(np.float16)
            else:
                yv += xv * CP_DTYPES[dtype](alpha)

    def reduce_sum(self, dtype: DType, x: Region, out: Region | None, stream: int) -> float:
        n = x.size // _ITEMSIZE[dtype]
        s = self.stream(stream)
        with s:
            xv = self._arr(x, dtype, (n,))
            acc = np.float32 if dtype == DType.F16 else CP_DTYPES[dtype]
            total = xv.sum(dtype=acc).astype(CP_DTYPES[dtype])
            if out is not None:
                self._arr(out, dtype, (1,))[...] = total
            value = float(total.get(stream=s))
        return value

    # -- modules ------------------------------------------------------------------
    def module_load(self, kind: int, name: str, code: bytes) -> int:
        try:
            if kind == ModuleKind.CUDA_C:
                mod = cupy.RawModule(code=code.decode("utf-8"), backend="nvrtc")
                mod.compile()
            else:
                data = code if kind == ModuleKind.CUBIN else code.rstrip(b"\0") + b"\0"
                mod = cupy.cuda.function.Module()
                mod.load(data)
        except UnicodeDecodeError as exc:
            raise VgpuError(
                ErrorCode.INVALID_ARGUMENT, f"CUDA C source is not UTF-8: {exc}"
            ) from exc
        except cupy.cuda.compiler.CompileException as exc:
            raise VgpuError(ErrorCode.COMPILE_FAILED, str(exc)[:900]) from exc
        except (cupy.cuda.driver.CUDADriverError, RuntimeError, ValueError) as exc:
            raise VgpuError(ErrorCode.COMPILE_FAILED, f"{name}: {exc}"[:900]) from exc
        handle = self._new_handle()
        self.modules[handle] = mod
        return handle

    def launch(
        self,
        module: int,
        kernel: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        shared_mem: int,
        args: list[tuple[int, int, Region | None]],
        stream: int,
    ) -> None:
        mod = self.module(module)
        try:
            func = mod.get_function(kernel)
        except Exception as exc:  # CUDADriverError (not found) or KeyError
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"no kernel {kernel!r}: {exc}") from exc
        values = [_arg(kind, value, region) for kind, value, region in args]
        try:
            func(grid, block, tuple(values), shared_mem=shared_mem, stream=self.stream(stream))
        except (cupy.cuda.driver.CUDADriverError, ValueError, TypeError) as exc:
            raise VgpuError(ErrorCode.LAUNCH_FAILED, str(exc)[:900]) from exc

    # -- streams and events ---------------------------------------------------------
    def event_record(self, event: int, stream: int) -> None:
        ev = cupy.cuda.Event(disable_timing=True)
        ev.record(self.stream(stream))
        self.events[event] = ev

    def event_wait(self, event: int, stream: int) -> None:
        ev = self.events.get(event)
        if ev is not None:
            self.stream(stream).wait_event(ev)

    def sync(self, stream: int | None) -> None:
        try:
            if stream is None:
                self.device.synchronize()
            else:
                self.stream(stream).synchronize()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise VgpuError(ErrorCode.LAUNCH_FAILED, f"device error: {exc}") from exc

    def close(self) -> None:
        try:
            self.device.synchronize()
        finally:
            super().close()
            self.events.clear()
            self.pool.free_all_blocks()


def _arg(kind: int, value: int, region: Region | None) -> Any:
    """A kernel argument as the C type its kind names; F32/F64 values are bit
    patterns (low 32 bits for F32), integer kinds take the low bits."""
    if kind == ArgKind.PTR:
        assert region is not None
        return np.uint64(region.buf.mem.ptr + region.offset)
    if kind == ArgKind.I32:
        return np.int32(struct.unpack("<i", struct.pack("<I", value & 0xFFFFFFFF))[0])
    if kind == ArgKind.U32:
        return np.uint32(value & 0xFFFFFFFF)
    if kind == ArgKind.I64:
        return np.int64(struct.unpack("<q", struct.pack("<Q", value))[0])
    if kind == ArgKind.U64:
        return np.uint64(value)
    if kind == ArgKind.F32:
        return np.float32(struct.unpack("<f", struct.pack("<I", value & 0xFFFFFFFF))[0])
    return np.float64(struct.unpack("<d", struct.pack("<Q", value))[0])
