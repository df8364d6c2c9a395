"""Device side of a split virtqueue (virtio 1.2 §2.7): pop chains, push used entries.

The three rings are checked once against guest memory when the queue is set
up (each must lie in one region) and then accessed through those views, so a
ring offset can never leave its ring. Descriptor chains are walked by the
native walker when built (one C call per chain) or by the Python twin.
"""

from __future__ import annotations

import logging
import platform
import threading
from typing import TYPE_CHECKING, Any

from vpcie._native import native, native_available
from vpcie.errors import GuestError, ProtocolError
from vpcie.memory import GuestMemory, word_view
from vpcie.protocol.virtq import (
    AVAIL_ALIGN,
    AVAIL_FLAGS,
    AVAIL_IDX,
    AVAIL_RING,
    DESC_ALIGN,
    MAX_QUEUE_SIZE,
    REQUEST_PREFIX,
    USED_ALIGN,
    USED_ELEM_SIZE,
    USED_FLAGS,
    USED_IDX,
    USED_RING,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    used_event_offset,
    used_ring_size,
    vring_need_event,
)
from vpcie.virtqueue.chain import DescChain
from vpcie.virtqueue.faults import ChainError
from vpcie.virtqueue.impl import Impl, select_walker
from vpcie.virtqueue.reply import RequestHandler, Withheld

if TYPE_CHECKING:
    from vpcie.virtqueue.native_ring import NativeRing

log = logging.getLogger(__name__)
# x86-64 keeps store->store and load->load order; only weakly ordered hosts need
# a fence between the used element and used.idx (§2.7.8).
_WEAK_ORDER = platform.machine() not in ("x86_64", "AMD64", "i686", "i386")
_fence_lock = threading.Lock()
_native_fence = native()[1].vq_fence if native_available() else None


def full_fence() -> None:
    """A full memory barrier (store->load), needed before reading used_event /
    avail flags after publishing used.idx (§2.7.7.2, §2.7.10). C fence when the
    native module is built; otherwise an uncontended lock, whose atomic
    read-modify-write is a full barrier."""
    if _native_fence is not None:
        _native_fence()
    else:
        with _fence_lock:
            pass


def check_queue_size(num: int) -> None:
    # §2.7: Queue Size is a power of 2, at most 32768.
    if not 1 <= num <= MAX_QUEUE_SIZE or num & (num - 1):
        raise GuestError(f"queue size {num} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")


class VirtQueue:
    """The device's view of one split virtqueue."""

    def __init__(
        self,
        mem: GuestMemory,
        num: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        event_idx: bool = False,
        impl: Impl = "auto",
        max_segments: int | None = None,
    ) -> None:
        check_queue_size(num)
        # §2.7 alignment requirements of the three parts.
        for name, gpa, align in (
            ("descriptor table", desc_gpa, DESC_ALIGN),
            ("available ring", avail_gpa, AVAIL_ALIGN),
            ("used ring", used_gpa, USED_ALIGN),
        ):
            if gpa % align:
                raise GuestError(f"{name} GPA {gpa:#x} is not {align}-byte aligned (§2.7)")
        self.num = num
        self.desc_gpa = desc_gpa
        self.avail_gpa = avail_gpa
        self.used_gpa = used_gpa
        self.event_idx = event_idx
        self._avail_event_word = avail_event_offset(num) >> 1
        self._walker = select_walker(impl, max_segments)
        self.impl = self._walker.name
        # Native: the ring state lives in C (struct vq_ring) and every hot step
        # is one C call; Python: the same state and steps here. Same behaviour.
        self._ring: NativeRing | None = None
        if self.impl == "native":
            from vpcie.virtqueue.native_ring import NativeRing  # the C only when in use
            from vpcie.virtqueue.native_walker import NativeWalker

            assert isinstance(self._walker, NativeWalker)
            self._ring = NativeRing(self._walker, num, desc_gpa, event_idx)
        self._map(mem)
        self._last_avail: int = 0
        self._used_idx: int = self._used16[USED_IDX >> 1]
        self._signalled_used = 0
        self._signalled_valid = False
        if self._ring is not None:
            self._ring.r.used_idx = self._used_idx

    @classmethod
    def from_uva(
        cls,
        mem: GuestMemory,
        num: int,
        desc_uva: int,
        avail_uva: int,
        used_uva: int,
        *,
        event_idx: bool = False,
        impl: Impl = "auto",
        max_segments: int | None = None,
    ) -> VirtQueue:
        """From the QEMU virtual addresses of vhost-user SET_VRING_ADDR."""
        check_queue_size(num)
        return cls(
            mem,
            num,
            mem.uva_to_gpa(desc_uva, desc_table_size(num)),
            mem.uva_to_gpa(avail_uva, avail_ring_size(num)),
            mem.uva_to_gpa(used_uva, used_ring_size(num)),
            event_idx=event_idx,
            impl=impl,
            max_segments=max_segments,
        )

    def _map(self, mem: GuestMemory) -> None:
        num = self.num
        views = []
        for name, gpa, size in (
            ("descriptor table", self.desc_gpa, desc_table_size(num)),
            ("available ring", self.avail_gpa, avail_ring_size(num)),
            ("used ring", self.used_gpa, used_ring_size(num)),
        ):
            try:
                views.append(mem.view(gpa, size))
            except GuestError as exc:
                raise GuestError(f"virtqueue {name} unusable: {exc}") from exc
        self.mem = mem
        self._desc, self._avail, self._used = views
        # The driver reads used.idx, used.flags and avail_event while we write
        # them: single stores only (word_view), never struct.pack_into.
        self._used16 = word_view(self._used, "H")
        self._avail16 = word_view(self._avail, "H")
        self._used32 = word_view(self._used[: USED_RING + USED_ELEM_SIZE * num], "I")
        if self._ring is not None:
            self._ring.map(self._avail, self._used)

    def rebind(self, mem: GuestMemory) -> None:
        """Use a new memory table (same ring GPAs, indices kept)."""
        self._map(mem)

    # ------------------------------------------------------------------ indices
    @property
    def last_avail_idx(self) -> int:
        """Next avail entry to consume (GET_VRING_BASE answers this)."""
        if self._ring is not None:
            return int(self._ring.r.last_avail)
        return self._last_avail

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        """SET_VRING_BASE."""
        if not 0 <= value <= 0xFFFF:
            raise ProtocolError(f"vring base {value} is not a 16-bit index")
        self._last_avail = value
        if self._ring is not None:
            self._ring.r.last_avail = value

    @property
    def max_segments(self) -> int:
        """The most segments a chain may have (the walker's cap)."""
        return self._walker.max_segments

    def native_state(self) -> Any | None:
        """The C ``struct vq_ring *`` this queue's state lives in (for the lane
        thread, which serves the ring from C), or None on the Python ring."""
        return self._ring.r if self._ring is not None else None

    @property
    def used_idx(self) -> int:
        if self._ring is not None:
            return int(self._ring.r.used_idx)
        return self._used_idx

    def reset(self) -> None:
        """Ring reset (§2.6.1 / RING_RESET): forget all device-side state."""
        self._last_avail = 0
        self._used_idx = 0
        self._signalled_used = 0
        self._signalled_valid = False
        if self._ring is not None:
            r = self._ring.r
            r.last_avail = r.used_idx = r.signalled_used = r.signalled_valid = 0

    # ------------------------------------------------------------------ avail
    def avail_pending(self) -> int:
        """How many chains the driver has made available and we have not popped."""
        avail_idx = self._avail16[AVAIL_IDX >> 1]
        last = self.last_avail_idx
        pending: int = (avail_idx - last) & 0xFFFF
        if pending > self.num:
            # §2.7.13.1: idx only ever moves ahead by at most the queue size.
            raise GuestError(
                f"avail.idx {avail_idx} is {pending} entries ahead of last_avail_idx "
                f"{last}, more than queue size {self.num}"
            )
        return pending

    def pop(self) -> DescChain | None:
        """The next available chain, or None. A ChainError carries ``.head``:
        the entry is consumed and the head should be returned with push(head, 0)."""
        if self._ring is not None:
            return self._ring.pop(self.mem)
        if not self.avail_pending():
            return None
        # Read avail.idx before the ring entry (§2.7.13.2): program order here,
        # and x86-64 does not reorder loads.
        last = self._last_avail
        head = self._avail16[(AVAIL_RING >> 1) + (last & (self.num - 1))]
        self._last_avail = last = (last + 1) & 0xFFFF
        if self.event_idx:  # set_avail_event(), inlined (hot path)
            self._used16[self._avail_event_word] = last
        try:
            return self._walker.walk(self.mem, self.desc_gpa, self.num, head, self._desc)
        except ChainError as exc:
            exc.head = head
            raise

    def set_avail_event(self) -> None:
        """EVENT_IDX (§2.7.10): ask for a kick once the driver passes last_avail_idx."""
        if self.event_idx:
            self._used16[self._avail_event_word] = self.last_avail_idx

    def set_no_notify(self, suppress: bool) -> None:
        """Without EVENT_IDX: VIRTQ_USED_F_NO_NOTIFY (§2.7.7.1) asks the driver not to kick."""
        flags = self._used16[USED_FLAGS >> 1]
        flags = flags | VIRTQ_USED_F_NO_NOTIFY if suppress else flags & ~VIRTQ_USED_F_NO_NOTIFY
        self._used16[USED_FLAGS >> 1] = flags

    # ------------------------------------------------------------------ used
    def push(self, head: int, written_len: int) -> None:
        """Return a chain: write the used element, then publish used.idx (§2.7.8)."""
        if not 0 <= head < self.num:
            raise ValueError(f"head {head} not below queue size {self.num}")
        if not 0 <= written_len <= 0xFFFF_FFFF:
            raise ValueError(f"written length {written_len} is not a u32")
        if self._ring is not None:
            self._ring.push(head, written_len)
            return
        used_idx = self._used_idx
        word = (USED_RING >> 2) + 2 * (used_idx & (self.num - 1))  # used elem: id, len
        used32 = self._used32
        used32[word] = head
        used32[word + 1] = written_len
        if _WEAK_ORDER:
            full_fence()
        self._used_idx = used_idx = (used_idx + 1) & 0xFFFF
        self._used16[USED_IDX >> 1] = used_idx

    def needs_notify(self) -> bool:
        """Should the device interrupt the driver now? (§2.7.7.2, §2.7.10)

        Call after a batch of push(); mirrors QEMU's virtio_split_should_notify.
        """
        if self._ring is not None:
            return self._ring.needs_notify()
        full_fence()  # used.idx store before the used_event / flags load
        if not self.event_idx:
            flags = self._avail16[AVAIL_FLAGS >> 1]
            return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
        valid, old = self._signalled_valid, self._signalled_used
        new = self._used_idx
        self._signalled_valid, self._signalled_used = True, new
        used_event = self._avail16[used_event_offset(self.num) >> 1]
        return not valid or vring_need_event(used_event, new, old)

    # ------------------------------------------------------------------ serve
    def serve(self, handle: RequestHandler, limit: int, max_request: int) -> int:
        """Serve up to ``limit`` available requests; returns how many.

        ``handle(request, read_len)`` gets each chain's readable bytes (all of
        them when ``read_len <= max_request``, else the first REQUEST_PREFIX)
        and returns the response, which is written into the chain's writable
        buffers before the chain is returned. A malformed chain is logged and
        returned with nothing written (a head past the queue size, which has no
        used entry to go back in, is consumed and dropped); avail.idx running
        too far ahead raises GuestError. Native: two C calls per request, no chain object.
        """
        if self._ring is not None:
            return self._ring.serve(self.mem, handle, limit, max_request)
        for n in range(limit):
            try:
                chain = self.pop()
            except ChainError as exc:
                log.warning("bad descriptor chain (head %s): %s", exc.head, exc)
                if exc.head is not None and exc.head < self.num:  # else no id to return
                    self.push(exc.head, 0)
                continue
            if chain is None:
                return n
            if chain.read_len <= max_request:
                request = chain.read_all()
            else:  # over max_request: the device answers from the header alone
                prefix = bytearray(min(chain.read_len, REQUEST_PREFIX))
                chain.read_into(prefix)
                request = bytes(prefix)
            try:
                response = handle(request, chain.read_len)
            except BaseException:
                self.push(chain.head, 0)  # never leave a popped chain behind
                raise
            if type(response) is Withheld:
                response.keep(chain)
                continue
            self.push(chain.head, chain.write(response) if response else 0)
        return limit

    def answer(self, chain: DescChain, response: bytes) -> None:
        """Return a chain whose response was Withheld."""
        self.push(chain.head, chain.write(response) if response else 0)
