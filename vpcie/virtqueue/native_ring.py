"""The native ring: a VirtQueue's device-side state and its hot steps in C.

``struct vq_ring`` holds last_avail, used_idx and the notification state, and
points at the avail and used rings in guest RAM (views that ``VirtQueue``
checked against the memory table and for alignment). Each step is one C call:
pop (avail.idx, ring entry, avail_event, chain walk and gather), push,
reply (scatter a response into the chain, then push) and needs_notify.
``serve`` runs a whole kick with two C calls per request and no Python object
per chain. ``VirtQueue`` uses this when the native walker is in use and keeps
the same state in Python otherwise; the tests run both.
"""

from __future__ import annotations

import logging
from typing import Any

from vpcie._native import native
from vpcie.errors import GuestError
from vpcie.memory import GuestMemory
from vpcie.protocol.virtq import MAX_CHAIN_BYTES, MAX_INDIRECT_ENTRIES, REQUEST_PREFIX
from vpcie.virtqueue.chain import DescChain
from vpcie.virtqueue.native_walker import NativeWalker
from vpcie.virtqueue.reply import RequestHandler, Withheld

log = logging.getLogger("vpcie.virtqueue")


class NativeRing:
    """One queue's ``struct vq_ring`` and the C steps over it."""

    def __init__(self, walker: NativeWalker, num: int, desc_gpa: int, event_idx: bool) -> None:
        ffi, lib = native()
        self._ffi, self._lib = ffi, lib
        self._walker = walker
        self.r: Any = ffi.new("struct vq_ring *")
        self.r.num = num
        self.r.desc_gpa = desc_gpa
        self.r.event_idx = int(event_idx)
        self._head: Any = ffi.new("uint32_t *")
        wb = walker.buffers
        self._w_segs, self._w_gather, self._w_gather_max, self._w_out = wb
        self._segs_raw: Any = ffi.cast("char *", wb.segs)
        self._bufs: list[Any] = []
        self._big: tuple[Any, int] = (wb.gather, wb.gather_max)

    def map(self, avail: memoryview, used: memoryview) -> None:
        """Point at the rings (views checked by the caller); the views stay
        exported, so their mapping cannot go away under the C pointers."""
        ffi = self._ffi
        bufs = [ffi.from_buffer(v, require_writable=True) for v in (avail, used)]
        self.r.avail = ffi.cast("uint8_t *", bufs[0])
        self.r.used = ffi.cast("uint8_t *", bufs[1])
        old, self._bufs = self._bufs, bufs
        for buf in old:
            ffi.release(buf)

    # --------------------------------------------------------------- steps
    def pop(self, mem: GuestMemory) -> DescChain | None:
        w = self._walker
        regs = w.regions(mem)
        rc = self._lib.vq_ring_pop(
            self.r, regs.table, regs.n, w.max_segments, MAX_CHAIN_BYTES, MAX_INDIRECT_ENTRIES,
            self._w_segs, self._w_gather, self._w_gather_max, self._w_out, self._head,
        )  # fmt: skip
        if rc == 1:
            return w.chain(mem, int(self._head[0]), regs)
        if rc == 0:
            return None
        raise self._fault(rc)

    def push(self, head: int, written_len: int) -> None:
        self._lib.vq_ring_push(self.r, head, written_len)

    def needs_notify(self) -> bool:
        return bool(self._lib.vq_ring_needs_notify(self.r))

    def serve(self, mem: GuestMemory, handle: RequestHandler, limit: int, max_request: int) -> int:
        """Up to ``limit`` requests: pop, ``handle``, reply. Returns how many."""
        ffi, lib, w = self._ffi, self._lib, self._walker
        regs = w.regions(mem)
        gather, cap = self._gather_buffer(max_request)
        r, segs, out, headp = self.r, self._w_segs, self._w_out, self._head
        table, nregs = regs.table, regs.n
        max_segs = w.max_segments
        for n in range(limit):
            rc = lib.vq_ring_pop(
                r, table, nregs, max_segs, MAX_CHAIN_BYTES, MAX_INDIRECT_ENTRIES,
                segs, gather, cap, out, headp,
            )  # fmt: skip
            if rc != 1:
                if rc == 0:
                    return n
                exc = self._fault(rc)
                if rc == -2:
                    raise exc
                log.warning("bad descriptor chain (head %d): %s", headp[0], exc)
                if headp[0] < r.num:  # else no id to return
                    lib.vq_ring_push(r, headp[0], 0)
                continue
            read_len = out.read_len
            if out.gathered:
                request = ffi.unpack(gather, read_len)
            else:  # over max_request: the device answers from the header alone
                k = min(read_len, REQUEST_PREFIX, len(gather))
                lib.vq_gather(table, nregs, self._segs_raw, out.nsegs, 0, gather, k)
                request = ffi.unpack(gather, k)
            try:
                response = handle(request, read_len)
            except BaseException:
                lib.vq_ring_push(r, headp[0], 0)  # never leave a popped chain behind
                raise
            if type(response) is Withheld:  # the walk's state is still this chain's
                response.keep(w.chain(mem, int(headp[0]), regs))
                continue
            lib.vq_ring_reply(r, table, nregs, segs, out.nsegs, headp[0], response, len(response))
        return limit

    # ------------------------------------------------------------- helpers
    def _gather_buffer(self, size: int) -> tuple[Any, int]:
        """A buffer for requests up to ``size`` bytes (the walk gathers those)
        that also holds the REQUEST_PREFIX of a longer one."""
        buf, cap = self._big
        if cap != size or len(buf) < REQUEST_PREFIX:
            buf, cap = self._ffi.new("char[]", max(size, REQUEST_PREFIX)), size
            self._big = (buf, cap)
        return buf, cap

    def _fault(self, rc: int) -> GuestError:
        if rc == -2:
            r, ahead = self.r, int(self._w_out.value)
            return GuestError(
                f"avail.idx {(r.last_avail + ahead) & 0xFFFF} is {ahead} entries ahead of "
                f"last_avail_idx {r.last_avail}, more than queue size {r.num}"
            )
        exc = self._walker.fault()
        exc.head = int(self._head[0])
        return exc
