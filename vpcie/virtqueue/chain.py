"""Descriptor chains: the pure-Python walker and the DescChain it returns.

virtio 1.2 §2.7.5 (descriptor table), §2.7.5.3 (indirect descriptors),
§2.7.4.2 (device-readable before device-writable). The walk is an iterator
with a hop limit: in a table of n entries a chain that takes more than n hops
must revisit one, so the limit is also the loop detector. ``vq.c`` implements
the very same checks in the very same order (the differential test holds both
to it); change one, change the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from vpcie.errors import GuestError
from vpcie.memory import GuestMemory
from vpcie.protocol.virtq import (
    DESC,
    DESC_SIZE,
    MAX_CHAIN_BYTES,
    MAX_CHAIN_SEGMENTS,
    MAX_INDIRECT_ENTRIES,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from vpcie.virtqueue.faults import ChainError, ChainFault

Segment = tuple[int, int]  # (gpa, length)
_U64_MASK = (1 << 64) - 1


class DescChain:
    """One chain popped from the avail ring: where the request is, where the reply goes.

    ``readable`` and ``writable`` are (gpa, len) segments, already checked
    against guest memory. ``write()`` scatters into the writable ones.
    """

    __slots__ = ("_readable", "_writable", "head", "mem", "read_len", "write_len")

    def __init__(
        self,
        mem: GuestMemory,
        head: int,
        readable: list[Segment] | None,
        writable: list[Segment] | None,
        read_len: int,
        write_len: int,
    ) -> None:
        self.mem = mem
        self.head = head
        self._readable = readable
        self._writable = writable
        self.read_len = read_len
        self.write_len = write_len

    @property
    def readable(self) -> list[Segment]:
        assert self._readable is not None
        return self._readable

    @property
    def writable(self) -> list[Segment]:
        assert self._writable is not None
        return self._writable

    def __repr__(self) -> str:
        return (
            f"DescChain(head={self.head}, readable={self.readable!r}, writable={self.writable!r})"
        )

    def read_all(self) -> bytes:
        """Every device-readable byte, in chain order."""
        mem = self.mem
        return b"".join(mem.read(gpa, n) for gpa, n in self.readable)

    def read_into(self, buf: bytearray | memoryview, offset: int = 0) -> int:
        """Copy readable bytes starting at ``offset`` into ``buf``; returns the count."""
        dst = memoryview(buf).cast("B")
        pos = 0
        for gpa, pos, take in _spans(self.readable, self.read_len, len(dst), offset):
            self.mem.read_into(gpa, dst[pos : pos + take])
            pos += take
        return pos

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` into the writable segments from byte ``offset`` on.

        Returns how many bytes fitted (the rest is dropped: the guest's buffer
        is too small, which the caller reports).
        """
        src = memoryview(data).cast("B")
        pos = 0
        for gpa, pos, take in _spans(self.writable, self.write_len, len(src), offset):
            self.mem.write(gpa, src[pos : pos + take])
            pos += take
        return pos


def _spans(
    segments: list[Segment], total: int, size: int, offset: int
) -> Iterator[tuple[int, int, int]]:
    """(gpa, position in the caller's buffer, length) for the chain bytes
    [offset, offset + size) that exist (at most ``total - offset``)."""
    if offset < 0:
        raise ValueError(f"negative offset {offset}")
    want = max(0, min(size, total - offset))
    pos, skip = 0, offset
    for gpa, n in segments:
        if pos >= want:
            break
        if skip >= n:
            skip -= n
            continue
        take = min(n - skip, want - pos)
        yield gpa + skip, pos, take
        pos += take
        skip = 0


def _table_view(mem: GuestMemory, gpa: int, entries: int) -> memoryview | None:
    """The whole table as one view when it lies in one region, else None."""
    try:
        return mem.view(gpa, entries * DESC_SIZE)
    except GuestError:
        return None


def walk_chain(
    mem: GuestMemory,
    desc_gpa: int,
    num: int,
    head: int,
    max_segments: int = MAX_CHAIN_SEGMENTS,
    desc_view: memoryview | None = None,
) -> DescChain:
    """Walk the chain starting at ``head`` of the ``num``-entry table at ``desc_gpa``.

    Raises ChainError (a GuestError) for every malformed chain. ``desc_view``
    is the main table already checked by the caller (a speed-up only).
    """
    if head >= num:
        raise ChainError(ChainFault.HEAD_OUT_OF_RANGE, head, num, False)
    readable: list[Segment] = []
    writable: list[Segment] = []
    read_len = write_len = nsegs = 0
    table, table_len, indirect = desc_gpa, num, False
    tview = desc_view if desc_view is not None else _table_view(mem, desc_gpa, num)
    idx, hops = head, 0
    while True:
        # §2.7.5.2 hop limit; a chain longer than its table loops.
        if hops >= table_len:
            raise ChainError(ChainFault.LOOP, idx, table_len, indirect)
        if tview is not None:
            addr, length, flags, nxt = DESC.unpack_from(tview, idx * DESC_SIZE)
        else:
            gpa = table + idx * DESC_SIZE
            if not mem.contains(gpa, DESC_SIZE):
                # the reported GPA wraps at 2**64, as the C walker's u64 does
                raise ChainError(ChainFault.DESC_OUT_OF_RANGE, idx, gpa & _U64_MASK, indirect)
            addr, length, flags, nxt = DESC.unpack(mem.read(gpa, DESC_SIZE))
        if flags & VIRTQ_DESC_F_INDIRECT:
            # §2.7.5.3.1: no INDIRECT inside an indirect table, never with NEXT,
            # table length a non-zero multiple of 16 (the WRITE flag is ignored).
            if indirect:
                raise ChainError(ChainFault.NESTED_INDIRECT, idx, 0, indirect)
            if flags & VIRTQ_DESC_F_NEXT:
                raise ChainError(ChainFault.INDIRECT_WITH_NEXT, idx, 0, indirect)
            if length == 0 or length % DESC_SIZE:
                raise ChainError(ChainFault.INDIRECT_BAD_LEN, idx, length, indirect)
            entries = length // DESC_SIZE
            if entries > MAX_INDIRECT_ENTRIES:
                raise ChainError(ChainFault.INDIRECT_TOO_LARGE, idx, entries, indirect)
            if not mem.contains(addr, length):
                raise ChainError(ChainFault.INDIRECT_OUT_OF_RANGE, idx, addr, indirect)
            table, table_len, indirect = addr, entries, True
            tview = _table_view(mem, addr, entries)
            idx = hops = 0
            continue
        is_write = flags & VIRTQ_DESC_F_WRITE
        if not is_write and writable:
            # §2.7.4.2: device-readable descriptors come before device-writable ones.
            raise ChainError(ChainFault.READABLE_AFTER_WRITABLE, idx, 0, indirect)
        if length and not mem.contains(addr, length):
            raise ChainError(ChainFault.BUFFER_OUT_OF_RANGE, idx, addr, indirect)
        nsegs += 1
        if nsegs > max_segments:
            raise ChainError(ChainFault.TOO_MANY_SEGMENTS, idx, max_segments, indirect)
        if read_len + write_len + length > MAX_CHAIN_BYTES:
            raise ChainError(ChainFault.CHAIN_TOO_BIG, idx, MAX_CHAIN_BYTES, indirect)
        if is_write:
            writable.append((addr, length))
            write_len += length
        else:
            readable.append((addr, length))
            read_len += length
        if not flags & VIRTQ_DESC_F_NEXT:
            break
        if nxt >= table_len:
            raise ChainError(ChainFault.NEXT_OUT_OF_RANGE, idx, nxt, indirect)
        idx = nxt
        hops += 1
    return DescChain(mem, head, readable, writable, read_len, write_len)


class ChainWalker(Protocol):
    """Walks one chain; the Python and the native walker both implement it."""

    name: str
    max_segments: int

    def walk(
        self,
        mem: GuestMemory,
        desc_gpa: int,
        num: int,
        head: int,
        desc_view: memoryview | None = None,
    ) -> DescChain: ...


class PythonWalker:
    """The pure-Python walker (reference behaviour; fallback without the C module)."""

    name = "python"

    def __init__(self, max_segments: int = MAX_CHAIN_SEGMENTS) -> None:
        self.max_segments = max_segments

    def walk(
        self,
        mem: GuestMemory,
        desc_gpa: int,
        num: int,
        head: int,
        desc_view: memoryview | None = None,
    ) -> DescChain:
        return walk_chain(mem, desc_gpa, num, head, self.max_segments, desc_view)
