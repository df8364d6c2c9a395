"""The Executor interface every session talks to (STYLE.md habit 5).

An executor owns one session's device memory, modules, streams and events.
Handles are u32 ids of this session (never raw pointers); every handle, offset
and size a guest or client names is checked here, once, before an executor
touches memory: ``buffer()`` / ``check_range()`` are the one checked way into
a session's device memory, like GuestMemory is into guest RAM.

Subclasses implement the storage primitives (``_alloc``/``_free``) and the
operations they support; everything else answers NOT_SUPPORTED. The batch
runner (host_agent/runner.py) decodes records and calls these methods; it does
the executor-neutral parts (event gate, per-stream order, data streams).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from vpcie.errors import ErrorCode, VgpuError
from vpcie.protocol.codes import (
    HANDLE_EPOCH_SHIFT,
    HANDLE_INDEX_MASK,
    MAX_BATCH_BYTES,
    MAX_EVENTS,
    MAX_HANDLE_EPOCH,
    MAX_STREAMS,
    PROTOCOL_VERSION,
    DType,
    ExecutorKind,
)
from vpcie.protocol.frames import encode_payload

MAX_HANDLES = 1 << 16  # live allocations + modules per session (habit 6)
if MAX_HANDLES >= HANDLE_INDEX_MASK:  # _new_handle must always find a free number
    raise AssertionError("MAX_HANDLES must be below the handle numbers of one epoch")


@dataclass
class Buffer:
    """One device allocation: ``mem`` is the executor's object for it.

    ``gen`` is its write generation (STATE_SUMMARY's "gen"): the runner adds 1
    for every command that may write it, so a live migration's pre-copy can
    tell which buffers changed since it copied them. It starts at the
    allocation's serial number in the high 32 bits, so a buffer freed and
    allocated again under the same handle never repeats an earlier gen."""

    handle: int
    size: int
    mem: Any
    gen: int = 0


class Region(NamedTuple):
    """A checked byte range inside one buffer."""

    buf: Buffer
    offset: int
    size: int


class ModuleSource(NamedTuple):
    """A loaded module as the client sent it: MODULE_EXPORT gives ``code``
    back, and a migration target compiles it again for its own device."""

    kind: int
    name: str
    code: bytes


@dataclass(frozen=True)
class SessionLimits:
    mem_quota: int
    max_inflight: int


@dataclass(frozen=True)
class DeviceIdentity:
    """What QUERY_INFO says about the device this session is bound to."""

    name: str = ""
    uuid: str = ""
    agent: str = ""
    sm_count: int = 0
    cc_major: int = 0
    cc_minor: int = 0


class Landing(ABC):
    """Where the H2D bytes of one command land as DATA frames arrive.

    ``views(offset, n)`` gives the writable buffers for the next DATA payload
    (offsets arrive in order); ``chunk_done`` is called after those bytes are
    in; ``finish`` after the last one (a GPU landing waits for its copies)."""

    total: int

    @abstractmethod
    def views(self, offset: int, n: int) -> list[memoryview]: ...

    def chunk_done(self, offset: int, n: int) -> None:  # noqa: B027 - optional hook
        """Bytes [offset, offset+n) have landed."""

    def finish(self) -> None:  # noqa: B027 - optional hook
        """All bytes have landed; make them visible to later work."""


def slice_segments(segs: Sequence[memoryview], offset: int, n: int) -> list[memoryview]:
    """The scatter list covering bytes [offset, offset+n) of concatenated segs."""
    out: list[memoryview] = []
    pos = 0
    end = offset + n
    for seg in segs:
        seg_end = pos + len(seg)
        lo = max(offset, pos) - pos
        hi = min(end, seg_end) - pos
        if lo < hi:
            out.append(seg[lo:hi])
        pos = seg_end
        if pos >= end:
            break
    return out


class HostLanding(Landing):
    """Bytes land in host buffers (direct views of device memory for the CPU
    executor, or one staging buffer copied at execution time)."""

    def __init__(self, segments: list[memoryview]) -> None:
        self.segments = segments
        self.total = sum(len(s) for s in segments)

    def views(self, offset: int, n: int) -> list[memoryview]:
        return slice_segments(self.segments, offset, n)


class Executor(ABC):
    """One session's device. Methods raise VgpuError; defaults are NOT_SUPPORTED."""

    kind: ExecutorKind = ExecutorKind.NONE
    name = "none"
    dtypes: frozenset[DType] = frozenset({DType.F32, DType.F16, DType.F64})
    synchronous = True  # work is done when a method returns (no device queue)

    def __init__(self, limits: SessionLimits, identity: DeviceIdentity) -> None:
        self.limits = limits
        self.identity = identity
        self.buffers: dict[int, Buffer] = {}
        self.modules: dict[int, Any] = {}
        # (kind, name, code) of every live module (load_module keeps them): the
        # code stays in memory while the module is loaded, so that it can migrate.
        self.module_sources: dict[int, ModuleSource] = {}
        self.mem_used = 0
        self.handle_epoch = 0
        self._next_index = 1  # handle number within the epoch; 0 is never a handle
        self._forced_handle = 0  # ALLOC_AT / MODULE_LOAD_AT: the next handle, checked
        self._allocs = 0  # allocations made: the high half of each new Buffer.gen

    # -- identity ------------------------------------------------------------
    @abstractmethod
    def mem_info(self) -> tuple[int, int]:
        """(total, free) bytes of the device."""

    def query_info(self) -> bytes:
        """QUERY_INFO payload (docs/PROTOCOL.md "QUERY_INFO")."""
        total, free = self.mem_info()
        ident = self.identity
        return encode_payload(
            "QUERY_INFO",
            PROTOCOL_VERSION,
            int(self.kind),
            0,
            total,
            free,
            self.limits.mem_quota,
            self.mem_used,
            self.limits.max_inflight,
            MAX_BATCH_BYTES,
            MAX_STREAMS,
            ident.sm_count,
            ident.cc_major,
            ident.cc_minor,
            (ident.name or self.name)[:255],
            ident.uuid[:255],
            ident.agent[:255],
        )

    # -- handles and checked ranges -------------------------------------------
    def set_handle_epoch(self, epoch: int) -> None:
        """Issue this session's handles as ``epoch << HANDLE_EPOCH_SHIFT | n``
        (OPEN's handle_epoch: the sessions its guest context had before, one
        per binding). A handle of a lower epoch was issued to that context
        under an earlier binding: it is refused with STALE_HANDLE, never
        taken for a buffer of this session."""
        if not 0 <= epoch <= MAX_HANDLE_EPOCH or self.buffers or self.modules:
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"handle epoch {epoch} cannot be set")
        self.handle_epoch = epoch

    def _new_handle(self) -> int:
        if len(self.buffers) + len(self.modules) >= MAX_HANDLES:
            raise VgpuError(ErrorCode.QUOTA_EXCEEDED, f"more than {MAX_HANDLES} live handles")
        if self._forced_handle:  # checked by _claim
            return self._forced_handle
        # Numbers run 1..HANDLE_INDEX_MASK, then start over skipping live ones
        # (fewer than MAX_HANDLES): they never leave this session's epoch.
        base = self.handle_epoch << HANDLE_EPOCH_SHIFT
        while True:
            n = self._next_index
            self._next_index = n + 1 if n < HANDLE_INDEX_MASK else 1
            h = base | n
            if h not in self.buffers and h not in self.modules:
                return h

    @property
    def next_index(self) -> int:
        """The handle number the next allocation or module tries first."""
        return self._next_index

    def restore_next_index(self, index: int) -> None:
        """SESSION_RESTORE: go on numbering where the migrated session was."""
        if not 1 <= index <= HANDLE_INDEX_MASK:
            raise VgpuError(
                ErrorCode.INVALID_ARGUMENT,
                f"next handle index {index} not in 1..{HANDLE_INDEX_MASK}",
            )
        self._next_index = index

    def _claim(self, handle: int, op: str) -> None:
        """``handle`` may be created by ALLOC_AT / MODULE_LOAD_AT: of this
        session's epoch, index nonzero, not live (INVALID_HANDLE otherwise)."""
        epoch, index = handle >> HANDLE_EPOCH_SHIFT, handle & HANDLE_INDEX_MASK
        why = ""
        if epoch != self.handle_epoch:
            why = f"its epoch {epoch} is not this session's ({self.handle_epoch})"
        elif index == 0:
            why = "index 0 is never a handle"
        elif handle in self.buffers or handle in self.modules:
            why = "it is live"
        if why:
            raise VgpuError(ErrorCode.INVALID_HANDLE, f"{op} handle {handle}: {why}")

    def unknown_handle(self, handle: int, what: str) -> VgpuError:
        """The error for a handle this session does not hold: STALE_HANDLE
        when an earlier binding issued it, else INVALID_HANDLE."""
        epoch = handle >> HANDLE_EPOCH_SHIFT
        if epoch < self.handle_epoch:
            return VgpuError(
                ErrorCode.STALE_HANDLE,
                f"handle {handle} belongs to an earlier binding of this vGPU "
                f"(epoch {epoch}, this session's is {self.handle_epoch})",
            )
        return VgpuError(ErrorCode.INVALID_HANDLE, f"no {what} {handle}")

    def buffer(self, handle: int) -> Buffer:
        buf = self.buffers.get(handle)
        if buf is None:
            raise self.unknown_handle(handle, "allocation")
        return buf

    def module(self, handle: int) -> Any:
        mod = self.modules.get(handle)
        if mod is None:
            raise self.unknown_handle(handle, "module")
        return mod

    def check_range(self, handle: int, offset: int, size: int, align: int = 1) -> Region:
        buf = self.buffer(handle)
        if offset > buf.size or size > buf.size - offset:
            raise VgpuError(
                ErrorCode.OUT_OF_RANGE,
                f"[{offset}, +{size}) outside allocation {handle} of {buf.size} bytes",
            )
        if align > 1 and offset % align:
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"offset {offset} not {align}-aligned")
        return Region(buf, offset, size)

    # -- memory -----------------------------------------------------------------
    @abstractmethod
    def _alloc(self, size: int) -> Any:
        """Allocate ``size`` bytes; raise VgpuError(OUT_OF_MEMORY) if impossible."""

    def _free(self, mem: Any) -> None:  # noqa: B027 - dropping the reference frees
        """Release ``mem`` (default: drop the reference)."""

    def mem_alloc(self, size: int, flags: int = 0) -> int:
        if size > self.limits.mem_quota - self.mem_used:
            raise VgpuError(
                ErrorCode.QUOTA_EXCEEDED,
                f"{size} bytes over the session quota ({self.mem_used} of "
                f"{self.limits.mem_quota} used)",
            )
        handle = self._new_handle()
        mem = self._alloc(size)
        self._allocs += 1
        self.buffers[handle] = Buffer(handle, size, mem, self._allocs << 32)
        self.mem_used += size
        return handle

    def mem_alloc_at(self, handle: int, size: int, flags: int = 0) -> int:
        """ALLOC_AT: MEM_ALLOC that creates exactly ``handle`` (a migration target)."""
        self._claim(handle, "ALLOC_AT")
        self._forced_handle = handle
        try:
            return self.mem_alloc(size, flags)
        finally:
            self._forced_handle = 0

    def mem_free(self, handle: int) -> None:
        buf = self.buffer(handle)
        del self.buffers[handle]
        self.mem_used -= buf.size
        self._free(buf.mem)

    # -- copies -------------------------------------------------------------------
    def direct_landing(self, regions: list[Region], stream: int) -> Landing | None:
        """A landing straight into device memory, or None to stage."""
        return None

    def staging(self, total: int) -> Landing:
        """A host staging buffer for H2D bytes copied at execution time."""
        return HostLanding([memoryview(bytearray(total))] if total else [])

    @abstractmethod
    def copy_h2d(self, dst: Region, src: memoryview, stream: int) -> None: ...

    @abstractmethod
    def d2h_chunks(self, src: Region, chunk: int, stream: int) -> Iterator[memoryview]:
        """Yield the bytes of ``src`` in views of at most ``chunk`` bytes; a view
        is valid until the next one is asked for."""

    def copy_d2d(self, dst: Region, src: Region, stream: int) -> None:
        raise VgpuError(ErrorCode.NOT_SUPPORTED, f"{self.name}: COPY_D2D")

    def memset(self, dst: Region, value: int, stream: int) -> None:
        raise VgpuError(ErrorCode.NOT_SUPPORTED, f"{self.name}: MEMSET")

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
        raise VgpuError(ErrorCode.NOT_SUPPORTED, f"{self.name}: GEMM")

    def axpy(self, dtype: DType, alpha: float, x: Region, y: Region, stream: int) -> None:
        raise VgpuError(ErrorCode.NOT_SUPPORTED, f"{self.name}: AXPY")

    def reduce_sum(self, dtype: DType, x: Region, out: Region | None, stream: int) -> float:
        raise VgpuError(ErrorCode.NOT_SUPPORTED, f"{self.name}: REDUCE_SUM")

    # -- modules --------------------------------------------------------------------
    def module_load(self, kind: int, name: str, code: bytes) -> int:
        raise VgpuError(ErrorCode.NOT_SUPPORTED, f"{self.name} runs no kernels (MODULE_LOAD)")

    def load_module(self, kind: int, name: str, code: bytes, handle: int = 0) -> int:
        """MODULE_LOAD (``handle`` 0) or MODULE_LOAD_AT: compile with this
        device's ``module_load`` and keep the source for MODULE_EXPORT."""
        if handle:
            self._claim(handle, "MODULE_LOAD_AT")
        self._forced_handle = handle
        try:
            h = self.module_load(kind, name, code)
        finally:
            self._forced_handle = 0
        self.module_sources[h] = ModuleSource(kind, name, bytes(code))
        return h

    def module_code(self, handle: int) -> bytes:
        """MODULE_EXPORT: the module's code as it was loaded."""
        src = self.module_sources.get(handle)
        if src is None:
            raise self.unknown_handle(handle, "module")
        return src.code

    def module_free(self, handle: int) -> None:
        if self.modules.pop(handle, None) is None:
            raise self.unknown_handle(handle, "module")
        self.module_sources.pop(handle, None)

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
        raise VgpuError(ErrorCode.NOT_SUPPORTED, f"{self.name} runs no kernels (LAUNCH)")

    # -- streams and events -----------------------------------------------------------
    def event_record(self, event: int, stream: int) -> None:
        """Record ``event`` on ``stream`` (default: execution is synchronous)."""
        if event >= MAX_EVENTS:
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"event {event} >= {MAX_EVENTS}")

    def event_wait(self, event: int, stream: int) -> None:  # noqa: B027 - optional
        """Make ``stream`` wait for the last record of ``event`` (already submitted)."""

    def sync(self, stream: int | None) -> None:  # noqa: B027 - optional
        """Wait for ``stream`` (None: all streams) to finish its device work."""

    def close(self) -> None:
        for h in list(self.buffers):
            self.mem_free(h)
        self.modules.clear()
        self.module_sources.clear()


class NullExecutor(Executor):
    """No device: memory bookkeeping only, every operation NOT_SUPPORTED.
    Used where a session has no device bound, and as the interface's floor."""

    kind = ExecutorKind.NONE
    name = "none"

    def mem_info(self) -> tuple[int, int]:
        return 0, 0

    def _alloc(self, size: int) -> Any:
        raise VgpuError(ErrorCode.NOT_SUPPORTED, "no device bound")

    def copy_h2d(self, dst: Region, src: memoryview, stream: int) -> None:
        raise VgpuError(ErrorCode.NOT_SUPPORTED, "no device bound")

    def d2h_chunks(self, src: Region, chunk: int, stream: int) -> Iterator[memoryview]:
        raise VgpuError(ErrorCode.NOT_SUPPORTED, "no device bound")
