"""GuestMemory: the one checked way into guest RAM (rust-vmm ``vm-memory`` style).

QEMU hands the backend its memory table (vhost-user SET_MEM_TABLE): regions of
guest-physical address space (GPA), each backed by an fd that we mmap. Every
access here checks the whole range against the table before touching a byte;
no other module does address arithmetic on guest pointers (ring layout offsets
in ``vpcie.virtqueue`` are turned into GPAs and checked here, and the C walker
in ``vpcie._native`` re-checks every bound against the same region table).

Rules that every accessor follows (the native walker follows the same ones):

* A range ``[gpa, gpa + n)`` is valid when ``gpa + n <= 2**64`` and every byte
  lies in a region; a range may cross from one region into the next only where
  the regions are contiguous in GPA (``views()``, ``read()``, ``write()``);
  ``view()`` needs the range inside one region.
* A zero-length range is always valid (nothing is touched) and yields ``b""``.
* ``GuestMemory`` is immutable. A new memory table builds a new object; the
  backend swaps it with :class:`MemoryTable`, which refuses while a descriptor
  chain is in flight, then closes the old one.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import mmap
import os
import struct
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

from vpcie.errors import GuestError, ProtocolError

PAGE_SIZE = mmap.PAGESIZE
ADDR_LIMIT = 1 << 64  # GPAs and UVAs are u64: a range may end at 2**64, not beyond
MAX_REGIONS = 512  # vhost-user lets QEMU send any number; cap what we map

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


WordFormat = Literal["H", "I", "Q"]
_WORD_SIZES: dict[str, int] = {"H": 2, "I": 4, "Q": 8}


def word_view(view: memoryview, fmt: WordFormat) -> memoryview[int]:
    """``view`` as little-endian words (``fmt`` "H", "I" or "Q") for fields a
    guest reads while we write them (used.idx, avail_event, fence sequences).

    Item assignment on the result is one aligned store of the word's width
    (CPython's memoryview packs an item with a single fixed-size memcpy), so a
    concurrent reader sees the old value or the new one. ``struct.pack_into``
    is not safe there: it zero-fills its target before packing, and a reader in
    between sees 0. The view must start word-aligned and hold whole words.
    """
    size = _WORD_SIZES.get(fmt)
    if size is None:
        raise ValueError(f"word format {fmt!r} is not one of H, I, Q")
    if sys.byteorder != "little":  # the cast is native order; virtio is little-endian
        raise ValueError("shared guest words need a little-endian host")
    raw = view.cast("B") if view.format != "B" else view
    if not len(raw) or len(raw) % size:
        raise ValueError(f"{len(raw)} bytes are not a whole number of {size}-byte words")
    if ctypes.addressof(ctypes.c_char.from_buffer(raw)) % size:
        raise ValueError(f"view does not start {size}-byte aligned")
    return raw.cast(fmt)


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One entry of a vhost-user memory table (vhost-user spec, "Memory regions")."""

    guest_phys_addr: int
    size: int
    user_addr: int  # QEMU's virtual address of the region (used by SET_VRING_ADDR)
    mmap_offset: int
    fd: int


class NativeHandle(Protocol):
    """What ``vpcie._native`` caches on a GuestMemory (a C region table)."""

    def release(self) -> None: ...


@dataclass(slots=True)
class _Mapped:
    gpa: int
    size: int
    uva: int
    mm: mmap.mmap
    view: memoryview  # exactly the region's bytes (the mmap may start earlier: page alignment)


def _check_table(regions: Sequence[MemoryRegion]) -> list[MemoryRegion]:
    """Stage one: is this table well formed? (ProtocolError: QEMU sent it.)"""
    if len(regions) > MAX_REGIONS:
        raise ProtocolError(f"memory table has {len(regions)} regions, limit {MAX_REGIONS}")
    ordered = sorted(regions, key=lambda r: r.guest_phys_addr)
    for r in ordered:
        for name in ("guest_phys_addr", "size", "user_addr", "mmap_offset"):
            value = getattr(r, name)
            if not 0 <= value < ADDR_LIMIT:
                raise ProtocolError(f"memory region {name}={value:#x} is not a u64")
        if r.size == 0:
            raise ProtocolError(f"memory region at GPA {r.guest_phys_addr:#x} has size 0")
        if r.guest_phys_addr + r.size > ADDR_LIMIT or r.user_addr + r.size > ADDR_LIMIT:
            raise ProtocolError(f"memory region at GPA {r.guest_phys_addr:#x} wraps past 2**64")
    for a, b in itertools.pairwise(ordered):
        if a.guest_phys_addr + a.size > b.guest_phys_addr:
            raise ProtocolError(
                f"memory regions overlap at GPA {b.guest_phys_addr:#x} "
                f"(previous ends at {a.guest_phys_addr + a.size:#x})"
            )
    return ordered


class GuestMemory:
    """Immutable, bounds-checked view of guest RAM built from a memory table."""

    def __init__(self, regions: Sequence[MemoryRegion], *, owned_fds: Sequence[int] = ()) -> None:
        """mmap every region (MAP_SHARED). The caller keeps ownership of the fds
        (they may be closed right after this returns) unless listed in ``owned_fds``,
        which ``close()`` closes."""
        table = _check_table(regions)
        self._regions: list[_Mapped] = []
        self._owned_fds = list(owned_fds)
        self._closed = False
        self.native: NativeHandle | None = None  # set by vpcie._native, released by close()
        try:
            for r in table:
                # mmap offsets must be page aligned: map from the aligned-down
                # offset and slice the region out of the mapping.
                lead = r.mmap_offset % PAGE_SIZE
                try:
                    mm = mmap.mmap(
                        r.fd,
                        lead + r.size,
                        flags=mmap.MAP_SHARED,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=r.mmap_offset - lead,
                    )
                except (OSError, ValueError, OverflowError) as exc:
                    raise ProtocolError(
                        f"cannot mmap region GPA {r.guest_phys_addr:#x} size {r.size:#x} "
                        f"fd {r.fd} offset {r.mmap_offset:#x}: {exc}"
                    ) from exc
                view = memoryview(mm)[lead : lead + r.size]
                self._regions.append(_Mapped(r.guest_phys_addr, r.size, r.user_addr, mm, view))
        except BaseException:
            self.close()
            raise
        self._starts = [m.gpa for m in self._regions]
        self.table: tuple[MemoryRegion, ...] = tuple(table)

    # ------------------------------------------------------------------ building
    @classmethod
    def anonymous(
        cls, layout: Sequence[tuple[int, int]], *, uva_base: int = 0x7F00_0000_0000
    ) -> GuestMemory:
        """Guest RAM over one fresh memfd (as QEMU's memory-backend-memfd) for tests.

        ``layout`` is ``[(gpa, size), ...]``; region i lives at memfd offset
        sum(sizes before it) and at UVA ``uva_base + that offset``. The memfd is
        owned (closed by ``close()``) and exposed as ``fds`` / ``table`` so a test
        frontend can send it in SET_MEM_TABLE.
        """
        total = sum(size for _, size in layout)
        fd = os.memfd_create("vpcie-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, max(total, 1))
            regions, offset = [], 0
            for gpa, size in layout:
                regions.append(MemoryRegion(gpa, size, uva_base + offset, offset, fd))
                offset += size
            return cls(regions, owned_fds=[fd])
        except BaseException:
            os.close(fd)
            raise

    # ------------------------------------------------------------------ state
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(self._owned_fds)

    def regions(self) -> list[tuple[int, int, memoryview]]:
        """(gpa, size, writable view) per region, sorted by GPA: for the C walker."""
        self._check_open()
        return [(m.gpa, m.size, m.view) for m in self._regions]

    def close(self) -> None:
        """Unmap everything. Views handed out must be dropped first; an mmap
        still exported elsewhere is unmapped when its last view dies."""
        if self._closed:
            return
        self._closed = True
        if self.native is not None:
            self.native.release()
            self.native = None
        for m in self._regions:
            m.view.release()
            try:
                m.mm.close()
            except BufferError:
                pass  # a caller still holds a view: the GC unmaps it later
        self._regions = []
        for fd in self._owned_fds:
            os.close(fd)
        self._owned_fds = []

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise GuestError("guest memory table was closed (replaced or device reset)")

    # ------------------------------------------------------------------ checks
    def _find(self, gpa: int) -> _Mapped | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            m = self._regions[i]
            if gpa - m.gpa < m.size:
                return m
        return None

    def contains(self, gpa: int, length: int) -> bool:
        """True when ``[gpa, gpa+length)`` is valid (contiguous regions allowed)."""
        if gpa < 0 or length < 0 or gpa + length > ADDR_LIMIT or self._closed:
            return False
        while length > 0:
            m = self._find(gpa)
            if m is None:
                return False
            chunk = min(length, m.size - (gpa - m.gpa))
            gpa += chunk
            length -= chunk
        return True

    def _range_error(self, gpa: int, length: int, what: str = "range") -> GuestError:
        return GuestError(f"guest {what} GPA {gpa:#x} length {length:#x} is outside guest memory")

    # ------------------------------------------------------------------ access
    def views(self, gpa: int, length: int) -> list[memoryview]:
        """Writable views covering the range, one per region crossed."""
        self._check_open()
        if gpa < 0 or length < 0 or gpa + length > ADDR_LIMIT:
            raise self._range_error(gpa, length)
        out: list[memoryview] = []
        cur, left = gpa, length
        while left > 0:
            m = self._find(cur)
            if m is None:
                if cur != gpa:
                    raise GuestError(
                        f"guest range GPA {gpa:#x} length {length:#x} crosses into unmapped "
                        f"GPA {cur:#x} (regions not contiguous)"
                    )
                raise self._range_error(gpa, length)
            off = cur - m.gpa
            chunk = min(left, m.size - off)
            out.append(m.view[off : off + chunk])
            cur += chunk
            left -= chunk
        return out

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of a range that lies inside a single region."""
        self._check_open()
        if length == 0 and 0 <= gpa < ADDR_LIMIT:
            return memoryview(b"")
        m = self._find(gpa) if gpa >= 0 else None
        if m is None or length < 0 or length > m.size - (gpa - m.gpa):
            if m is not None and self.contains(gpa, length):
                raise GuestError(
                    f"guest range GPA {gpa:#x} length {length:#x} spans two regions; "
                    "a single view is impossible"
                )
            raise self._range_error(gpa, length)
        off = gpa - m.gpa
        return m.view[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        m = self._find(gpa) if gpa >= 0 and not self._closed else None
        if m is not None and 0 <= length <= m.size - (gpa - m.gpa):  # fast path: one region
            off = gpa - m.gpa
            return bytes(m.view[off : off + length])
        return b"".join(bytes(v) for v in self.views(gpa, length))

    def read_into(self, gpa: int, buf: memoryview | bytearray) -> int:
        """Fill ``buf`` from guest memory; returns the number of bytes (len(buf))."""
        dst = memoryview(buf).cast("B")
        pos = 0
        for v in self.views(gpa, len(dst)):
            dst[pos : pos + len(v)] = v
            pos += len(v)
        return pos

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> int:
        src = memoryview(data).cast("B")
        pos = 0
        for v in self.views(gpa, len(src)):
            v[:] = src[pos : pos + len(v)]
            pos += len(v)
        return pos

    def _small(self, gpa: int, size: int) -> memoryview:
        m = self._find(gpa) if gpa >= 0 and not self._closed else None
        if m is not None and size <= m.size - (gpa - m.gpa):
            off = gpa - m.gpa
            return m.view[off : off + size]
        return memoryview(self.read(gpa, size))  # crosses regions (or raises)

    def read_u16(self, gpa: int) -> int:
        return int(_U16.unpack(self._small(gpa, 2))[0])

    def read_u32(self, gpa: int) -> int:
        return int(_U32.unpack(self._small(gpa, 4))[0])

    def read_u64(self, gpa: int) -> int:
        return int(_U64.unpack(self._small(gpa, 8))[0])

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, _U16.pack(value))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, _U32.pack(value))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, _U64.pack(value))

    # ------------------------------------------------------------------ UVA
    def uva_to_gpa(self, uva: int, length: int) -> int:
        """Translate a QEMU virtual address (SET_VRING_ADDR) whose whole range
        ``[uva, uva+length)`` lies in one region."""
        self._check_open()
        if uva >= 0 and length >= 0:
            for m in self._regions:
                off = uva - m.uva
                if 0 <= off <= m.size and length <= m.size - off:
                    return m.gpa + off
        raise GuestError(f"QEMU address {uva:#x} length {length:#x} is in no memory region")


class MemoryTable:
    """Holder of the current GuestMemory; a replaced table stays mapped while in use.

    Whoever holds views into guest RAM beyond one call (a descriptor chain
    being served, a vGPU batch whose DMA is on the wire) takes the table with
    ``acquire()`` and gives it back with ``release(mem)``. ``replace()`` (a new
    vhost-user memory table: memory hotplug) installs the new table at once;
    the old one is retired and closed when its last user releases it, so
    in-flight work finishes on the mapping it started on and nothing is lost.
    """

    def __init__(self, mem: GuestMemory | None = None) -> None:
        self._mem = mem
        self._users: dict[int, int] = {}  # id(GuestMemory) -> acquire count
        self._retired: dict[int, GuestMemory] = {}  # replaced, closed at count 0

    @property
    def mem(self) -> GuestMemory:
        if self._mem is None:
            raise ProtocolError("no memory table yet (SET_MEM_TABLE not received)")
        return self._mem

    @property
    def present(self) -> bool:
        return self._mem is not None

    @property
    def in_flight(self) -> int:
        """Users of any table, current or retired."""
        return sum(self._users.values())

    @property
    def retired(self) -> int:
        """Replaced tables still mapped for their in-flight users."""
        return len(self._retired)

    def acquire(self) -> GuestMemory:
        mem = self.mem
        self._users[id(mem)] = self._users.get(id(mem), 0) + 1
        return mem

    def release(self, mem: GuestMemory) -> None:
        key = id(mem)
        count = self._users.get(key, 0)
        if count <= 0:
            raise RuntimeError("MemoryTable.release() without acquire()")
        if count > 1:
            self._users[key] = count - 1
            return
        del self._users[key]
        old = self._retired.pop(key, None)
        if old is not None:
            old.close()

    @contextmanager
    def chain(self) -> Iterator[GuestMemory]:
        mem = self.acquire()
        try:
            yield mem
        finally:
            self.release(mem)

    def replace(self, new: GuestMemory | None) -> None:
        """Install ``new`` (None: drop the table); close the old one now, or
        when its last in-flight user releases it."""
        old, self._mem = self._mem, new
        if old is None or old is new:
            return
        if self._users.get(id(old)):
            self._retired[id(old)] = old
        else:
            old.close()

    def close(self) -> None:
        """Drop the table. Retired tables close as their users release them."""
        self.replace(None)
