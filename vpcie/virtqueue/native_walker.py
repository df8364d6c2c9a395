"""The native chain walker: one C call per chain (walk + gather of small requests).

The C code gets the GuestMemory's region table (base pointers from
``ffi.from_buffer``, GPA, size) and re-checks every bound itself. The table is
cached on the GuestMemory (``mem.native``) and released by ``mem.close()``;
chains refuse to touch memory once it is closed.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from vpcie._native import native
from vpcie.errors import GuestError
from vpcie.memory import GuestMemory
from vpcie.protocol.virtq import MAX_CHAIN_BYTES, MAX_CHAIN_SEGMENTS, MAX_INDIRECT_ENTRIES
from vpcie.virtqueue.chain import DescChain
from vpcie.virtqueue.faults import ChainError, ChainFault

GATHER_INLINE_MAX = 4096  # requests up to this size are gathered in the walk call itself
_SEG = struct.Struct("<QII")  # struct vq_seg { u64 addr; u32 len; u32 flags; }


class NativeRegions:
    """A C ``struct vq_region[]`` over a GuestMemory's mappings."""

    def __init__(self, mem: GuestMemory) -> None:
        ffi, _ = native()
        regions = mem.regions()
        self.table: Any = ffi.new("struct vq_region[]", max(1, len(regions)))
        self._bufs: list[Any] = []
        for i, (gpa, size, view) in enumerate(regions):
            buf = ffi.from_buffer(view, require_writable=True)
            self._bufs.append(buf)
            self.table[i].gpa = gpa
            self.table[i].size = size
            self.table[i].base = ffi.cast("uint8_t *", buf)
        self.n = len(regions)

    def release(self) -> None:
        ffi, _ = native()
        self.n = 0
        for buf in self._bufs:
            ffi.release(buf)
        self._bufs = []


def native_regions(mem: GuestMemory) -> NativeRegions:
    regs = mem.native
    if regs is None:
        if mem.closed:
            raise GuestError("guest memory table was closed (replaced or device reset)")
        regs = NativeRegions(mem)
        mem.native = regs
    assert isinstance(regs, NativeRegions)
    return regs


class NativeDescChain(DescChain):
    """A DescChain whose segments stay packed (C layout) until someone asks for them."""

    __slots__ = ("_nreadable", "_nsegs", "_pre", "_raw", "_regs")

    def __init__(
        self,
        mem: GuestMemory,
        head: int,
        regs: NativeRegions,
        raw: bytes,
        nsegs: int,
        nreadable: int,
        read_len: int,
        write_len: int,
        pre: bytes | None,
    ) -> None:
        # DescChain.__init__, inlined: one chain per guest request (hot path).
        self.mem = mem
        self.head = head
        self._readable = None
        self._writable = None
        self.read_len = read_len
        self.write_len = write_len
        self._regs = regs
        self._raw = raw
        self._nsegs = nsegs
        self._nreadable = nreadable
        self._pre = pre

    def _unpack(self) -> None:
        segs = [(a, n) for a, n, _ in _SEG.iter_unpack(self._raw)]
        self._readable = segs[: self._nreadable]
        self._writable = segs[self._nreadable :]

    @property
    def readable(self) -> list[tuple[int, int]]:
        if self._readable is None:
            self._unpack()
        assert self._readable is not None
        return self._readable

    @property
    def writable(self) -> list[tuple[int, int]]:
        if self._writable is None:
            self._unpack()
        assert self._writable is not None
        return self._writable

    def _live(self) -> NativeRegions:
        if self.mem.closed or self._regs.n == 0:
            raise GuestError("guest memory table was closed (replaced or device reset)")
        return self._regs

    def read_all(self) -> bytes:
        if self._pre is not None:
            return self._pre
        buf = bytearray(self.read_len)
        self.read_into(buf)
        return bytes(buf)

    def read_into(self, buf: bytearray | memoryview, offset: int = 0) -> int:
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        ffi, lib = native()
        regs = self._live()
        dst = ffi.from_buffer(buf, require_writable=True)
        n = lib.vq_gather(regs.table, regs.n, self._raw, self._nsegs, offset, dst, len(dst))
        if n < 0:
            raise GuestError("descriptor chain buffer left guest memory")
        return int(n)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        ffi, lib = _FFI_LIB if _FFI_LIB is not None else native()
        regs = self._live()
        src = ffi.from_buffer(data)
        n = lib.vq_scatter(regs.table, regs.n, self._raw, self._nsegs, offset, src, len(src))
        if n < 0:
            raise GuestError("descriptor chain buffer left guest memory")
        return int(n)


_FFI_LIB: tuple[Any, Any] | None = None  # native(), once a NativeWalker exists


class WalkBuffers(NamedTuple):
    segs: Any  # struct vq_seg[max_segments]
    gather: Any  # char[gather_max]
    gather_max: int
    out: Any  # struct vq_walk_out *


class NativeWalker:
    """ChainWalker backed by ``vq_walk`` in C."""

    name = "native"

    def __init__(
        self, max_segments: int = MAX_CHAIN_SEGMENTS, gather_max: int = GATHER_INLINE_MAX
    ) -> None:
        global _FFI_LIB
        ffi, lib = _FFI_LIB = native()
        self._ffi, self._lib = ffi, lib
        self.max_segments = max_segments
        self._segs = ffi.new("struct vq_seg[]", max(1, max_segments))
        self._out = ffi.new("struct vq_walk_out *")
        self._gather = ffi.new("char[]", max(1, gather_max))
        self._gather_max = gather_max

    @property
    def buffers(self) -> WalkBuffers:
        """The C buffers a walk fills, for NativeRing, whose pop walks the chain
        in the same C call (vq_ring_pop): the segments, the gather buffer and its
        size, and the walk's outcome."""
        return WalkBuffers(self._segs, self._gather, self._gather_max, self._out)

    def walk(
        self,
        mem: GuestMemory,
        desc_gpa: int,
        num: int,
        head: int,
        desc_view: memoryview | None = None,
    ) -> DescChain:
        regs = self.regions(mem)
        out = self._out
        rc = self._lib.vq_walk(
            regs.table,
            regs.n,
            desc_gpa,
            num,
            head,
            self.max_segments,
            MAX_CHAIN_BYTES,
            MAX_INDIRECT_ENTRIES,
            self._segs,
            self._gather,
            self._gather_max,
            out,
        )
        if rc:
            raise self.fault()
        return self.chain(mem, head, regs)

    @staticmethod
    def regions(mem: GuestMemory) -> NativeRegions:
        """The C region table of ``mem`` (built once); GuestError once it is closed."""
        regs = mem.native
        if regs is None or mem.closed:
            regs = native_regions(mem)  # builds it, or raises for a closed table
            if mem.closed:
                raise GuestError("guest memory table was closed (replaced or device reset)")
        assert isinstance(regs, NativeRegions)
        return regs

    def fault(self) -> ChainError:
        """The ChainError the last failed walk described in ``out``."""
        out = self._out
        return ChainError(ChainFault(out.fault), out.index, out.value, bool(out.indirect))

    def chain(self, mem: GuestMemory, head: int, regs: NativeRegions) -> NativeDescChain:
        """The chain the last successful walk left in ``segs`` / ``out``."""
        out = self._out
        nsegs = out.nsegs
        raw = self._ffi.buffer(self._segs, nsegs * _SEG.size)[:]
        pre = self._ffi.unpack(self._gather, out.read_len) if out.gathered else None
        return NativeDescChain(
            mem, head, regs, raw, nsegs, out.nreadable, out.read_len, out.write_len, pre
        )
