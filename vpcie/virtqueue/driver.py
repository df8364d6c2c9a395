"""Driver side of a split virtqueue: what a guest kernel does, for tests and for
the vhost-user frontend harness that plays QEMU and the guest.

It lays the rings out in a GuestMemory with a bump allocator, adds chains
(direct or through an indirect table, §2.7.5.3), publishes avail.idx on kick
and collects used entries. All access goes through GuestMemory.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from vpcie.errors import GuestError, ProtocolError
from vpcie.memory import GuestMemory, word_view
from vpcie.protocol.virtq import (
    AVAIL_ALIGN,
    AVAIL_FLAGS,
    AVAIL_IDX,
    AVAIL_RING,
    DESC,
    DESC_ALIGN,
    DESC_SIZE,
    USED_ALIGN,
    USED_ELEM,
    USED_ELEM_SIZE,
    USED_FLAGS,
    USED_IDX,
    USED_RING,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    used_event_offset,
    used_ring_size,
    vring_need_event,
)
from vpcie.virtqueue.device import check_queue_size, full_fence

_U16 = struct.Struct("<H")


class QueueFull(RuntimeError):
    """Not enough free descriptors for the chain (the guest would wait)."""


class GuestAllocator:
    """A bump allocator over ``[start, start+size)`` of guest RAM."""

    def __init__(self, mem: GuestMemory, start: int, size: int) -> None:
        if not mem.contains(start, size):
            raise ValueError(f"allocator range {start:#x}+{size:#x} is not guest memory")
        self.mem = mem
        self.start = start
        self.end = start + size
        self._next = start

    def alloc(self, size: int, align: int = 16) -> int:
        if size < 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation size {size} / alignment {align}")
        gpa = (self._next + align - 1) & ~(align - 1)
        if gpa + size > self.end:
            raise MemoryError(f"guest allocator exhausted ({size} bytes wanted)")
        self._next = gpa + size
        return gpa

    def alloc_bytes(self, data: bytes, align: int = 16) -> int:
        gpa = self.alloc(len(data), align)
        self.mem.write(gpa, data)
        return gpa

    def mark(self) -> int:
        return self._next

    def reset(self, mark: int | None = None) -> None:
        """Free everything allocated after ``mark`` (everything when None)."""
        self._next = self.start if mark is None else mark


Buffer = bytes | tuple[int, int]


class DriverQueue:
    """The driver's half of one split virtqueue."""

    def __init__(
        self,
        mem: GuestMemory,
        num: int,
        alloc: GuestAllocator,
        *,
        event_idx: bool = False,
        hold_completed: bool = False,
    ) -> None:
        """``hold_completed``: descriptors of a returned chain stay taken until
        ``release(head)``, so a head cannot be reused before whoever waits for
        it has seen its completion (needed with several chains in flight)."""
        check_queue_size(num)
        self.mem = mem
        self.num = num
        self.alloc = alloc
        self.event_idx = event_idx
        # §2.7 alignment: desc 16, avail 2, used 4.
        self.desc_gpa = alloc.alloc(desc_table_size(num), DESC_ALIGN)
        self.avail_gpa = alloc.alloc(avail_ring_size(num), AVAIL_ALIGN)
        self.used_gpa = alloc.alloc(used_ring_size(num), USED_ALIGN)
        for gpa, size in (
            (self.desc_gpa, desc_table_size(num)),
            (self.avail_gpa, avail_ring_size(num)),
            (self.used_gpa, used_ring_size(num)),
        ):
            mem.write(gpa, bytes(size))
        # The device reads these while we write them: single stores (word_view).
        self._avail16 = word_view(mem.view(self.avail_gpa, avail_ring_size(num)), "H")
        self._used16 = word_view(mem.view(self.used_gpa, used_ring_size(num)), "H")
        self._free: list[int] = list(range(num - 1, -1, -1))
        self._chains: dict[int, list[int]] = {}
        # head -> (gpa, entries, view or None), reused: the indirect table of
        # that head, written in one pack_into when it lies in one region
        self._tables: dict[int, tuple[int, int, memoryview | None]] = {}
        self._desc_view = _one_region(mem, self.desc_gpa, desc_table_size(num))
        self._avail_idx = 0  # shadow; published by kick()
        self._published = 0
        self._last_used = 0
        self.hold_completed = hold_completed
        self._held: dict[int, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._chains)

    def write_desc(self, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        """Raw descriptor store (tests use it to build hostile rings)."""
        self.mem.write(self.desc_gpa + DESC_SIZE * index, DESC.pack(addr, length, flags, next_))

    def add_raw_head(self, head: int) -> None:
        """Put any head in the avail ring (hostile tests); publish with kick()."""
        self._avail16[(AVAIL_RING >> 1) + self._avail_idx % self.num] = head
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF

    def add(
        self,
        readable: Sequence[Buffer],
        writable: Sequence[tuple[int, int]],
        indirect: bool = False,
    ) -> int:
        """Make a chain available (not yet published: call kick()). ``bytes`` in
        ``readable`` are copied into freshly allocated guest RAM. Returns the head."""
        segs: list[tuple[int, int, int]] = []
        for item in readable:
            if isinstance(item, bytes):
                segs.append((self.alloc.alloc_bytes(item), len(item), 0))
            else:
                segs.append((item[0], item[1], 0))
        segs.extend((gpa, n, VIRTQ_DESC_F_WRITE) for gpa, n in writable)
        if not segs:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            if not self._free:
                raise QueueFull("no free descriptor for the indirect table")
            head = self._free.pop()
            n = len(segs)
            table, cap, view = self._tables.get(head, (0, 0, None))
            if cap < n:
                cap = max(n, 16)
                table = self.alloc.alloc(DESC_SIZE * cap, DESC_ALIGN)
                view = _one_region(self.mem, table, DESC_SIZE * cap)
                self._tables[head] = (table, cap, view)
            flat: list[int] = []
            for i, (gpa, length, flags) in enumerate(segs, 1):
                if i < n:
                    flat += (gpa, length, flags | VIRTQ_DESC_F_NEXT, i)
                else:
                    flat += (gpa, length, flags, 0)
            st = _DESCS.get(n) or _descs(n)
            if view is not None:
                st.pack_into(view, 0, *flat)
            else:
                self.mem.write(table, st.pack(*flat))
            if self._desc_view is not None:
                at, size = DESC_SIZE * head, DESC_SIZE * n
                DESC.pack_into(self._desc_view, at, table, size, VIRTQ_DESC_F_INDIRECT, 0)
            else:
                self.write_desc(head, table, DESC_SIZE * n, VIRTQ_DESC_F_INDIRECT, 0)
            self._chains[head] = [head]
        else:
            if len(segs) > len(self._free):
                raise QueueFull(f"{len(segs)} descriptors wanted, {len(self._free)} free")
            ids = [self._free.pop() for _ in segs]
            for i, (gpa, n, flags) in enumerate(segs):
                more = i + 1 < len(segs)
                self.write_desc(
                    ids[i],
                    gpa,
                    n,
                    flags | (VIRTQ_DESC_F_NEXT if more else 0),
                    ids[i + 1] if more else 0,
                )
            head = ids[0]
            self._chains[head] = ids
        self.add_raw_head(head)
        return head

    def kick(self) -> bool:
        """Publish avail.idx (§2.7.13.3); True when the device wants a notification
        (avail_event with EVENT_IDX §2.7.10, else no VIRTQ_USED_F_NO_NOTIFY)."""
        old, new = self._published, self._avail_idx
        self._avail16[AVAIL_IDX >> 1] = new
        self._published = new
        full_fence()
        if self.event_idx:
            event = self._used16[avail_event_offset(self.num) >> 1]
            return vring_need_event(event, new, old)
        return not self._used16[USED_FLAGS >> 1] & VIRTQ_USED_F_NO_NOTIFY

    def set_interrupts(self, enabled: bool) -> None:
        """Without EVENT_IDX: VIRTQ_AVAIL_F_NO_INTERRUPT (§2.7.7.1)."""
        self._avail16[AVAIL_FLAGS >> 1] = 0 if enabled else VIRTQ_AVAIL_F_NO_INTERRUPT

    def set_used_event(self, idx: int) -> None:
        """EVENT_IDX: interrupt me when used.idx passes ``idx`` (§2.7.10)."""
        self._avail16[used_event_offset(self.num) >> 1] = idx & 0xFFFF

    def release(self, head: int) -> None:
        """Free a returned chain held by ``hold_completed``."""
        ids = self._held.pop(head, None)
        if ids is None:
            raise ValueError(f"head {head} is not a held, returned chain")
        self._free.extend(reversed(ids))

    def get_used(self) -> list[tuple[int, int]]:
        """Collect (head, written_len) of every chain the device has returned."""
        used_idx = self._used16[USED_IDX >> 1]
        count = (used_idx - self._last_used) & 0xFFFF
        if count > len(self._chains):
            raise ProtocolError(
                f"device moved used.idx {count} ahead with {len(self._chains)} chains in flight"
            )
        out = []
        for i in range(count):
            slot = (self._last_used + i) % self.num
            head, length = USED_ELEM.unpack(
                self.mem.read(self.used_gpa + USED_RING + USED_ELEM_SIZE * slot, USED_ELEM_SIZE)
            )
            ids = self._chains.pop(head, None)
            if ids is None:
                raise ProtocolError(f"device returned head {head}, which is not in flight")
            if self.hold_completed:
                self._held[head] = ids
            else:
                self._free.extend(reversed(ids))
            out.append((head, length))
        self._last_used = used_idx
        if self.event_idx:
            self.set_used_event(used_idx)
        return out


_DESCS: dict[int, struct.Struct] = {}


def _descs(n: int) -> struct.Struct:
    """A struct of ``n`` descriptors (an indirect table written in one call)."""
    st = _DESCS[n] = struct.Struct("<" + "QIHH" * n)
    return st


def _one_region(mem: GuestMemory, gpa: int, size: int) -> memoryview | None:
    """A view of [gpa, gpa+size) when it lies in one region, else None."""
    try:
        return mem.view(gpa, size)
    except (GuestError, ValueError):
        return None
