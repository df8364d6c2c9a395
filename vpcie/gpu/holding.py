"""UNREF / DETACH_BACKING answers held while batches still use the backing.

The guest kernel frees a resource's pages when the answer to its
RESOURCE_UNREF (or DETACH_BACKING) comes, so until then they are still the
buffer's: a SIGNAL reply or a copy of a batch in flight may still write them.
A handler that finds its resource busy asks for its answer to be held
(``withhold``); the virtqueue leaves that chain out of the used ring
(``Withheld``) and ``answer_ready`` returns it once no batch uses the
resource any more.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from vpcie.backend.device import DeviceHost
from vpcie.errors import GuestError
from vpcie.gpu.context import Context
from vpcie.gpu.lanes import Lanes
from vpcie.memory import GuestMemory
from vpcie.virtqueue.chain import DescChain
from vpcie.virtqueue.reply import Withheld, withheld

# The device's logger: its records are under the guest log budget (logbudget.py).
log = logging.getLogger("vpcie.gpu.device")


@dataclass(eq=False)
class HeldUnref:
    """An UNREF (or DETACH_BACKING) answered once no batch still reads or
    writes the resource's backing."""

    rids: set[int]
    chain: DescChain
    response: bytes
    mem: GuestMemory | None  # the table ``chain`` points into, held until answered


class HoldingOwner(Protocol):
    """What holding needs of the device it works for (GpuDevice)."""

    host: DeviceHost | None
    lanes: Lanes
    contexts: dict[int, Context]


class UnrefHolds:
    def __init__(self, owner: HoldingOwner, queue_index: int) -> None:
        self.owner = owner
        self.queue_index = queue_index  # the control queue, where the answers go
        self.pending_rids: list[int] = []  # set by a handler: answer this request later
        self.held: list[HeldUnref] = []

    def backing_gone(self, rid: int) -> None:
        """RESOURCE_UNREF / DETACH_BACKING of ``rid``: nothing may touch its
        pages once the guest has the answer (Linux frees them then). A fence
        page on it is dropped now; batches still reading or writing it (SIGNAL
        replies, copies) make the answer wait for them (``hold``)."""
        lanes = self.owner.lanes
        if lanes.leases:  # the lane writes nothing more (its batches join ctx.inflight)
            lanes.take_back_all()
        busy = False
        for ctx in self.owner.contexts.values():
            if ctx.fence_rid == rid and ctx.fence is not None:
                ctx.fence, ctx.fence_gpa, ctx.fence_rid = None, 0, 0
            busy = busy or rid in ctx.busy_rids()
        if busy:
            self.pending_rids.append(rid)

    def hold(self, response: bytes) -> Withheld:
        """The response of the request just served, to be given later."""
        rids = set(self.pending_rids)
        self.pending_rids.clear()  # in place: the device reads this very list
        log.info("resource(s) %s still in use by batches in flight: answer held", sorted(rids))
        return withheld(response, functools.partial(self._keep, rids, response))

    def _keep(self, rids: set[int], response: bytes, chain: DescChain) -> None:
        host = self.owner.host
        mem = host.memory.acquire() if host is not None else None
        self.held.append(HeldUnref(rids, chain, response, mem))

    def answer_ready(self) -> None:
        """Answer the held UNREFs whose resources no batch uses any more."""
        host = self.owner.host
        vq = host.queue(self.queue_index) if host is not None else None
        if vq is None:  # the ring is stopped: answered once it runs again
            return
        busy: set[int] = set()
        for ctx in self.owner.contexts.values():
            busy |= ctx.busy_rids()
        ready = [h for h in self.held if not h.rids & busy]
        if not ready:
            return
        self.held = [h for h in self.held if h.rids & busy]
        assert host is not None
        with self.owner.lanes.ring_locked():  # the lane may be using the ring meanwhile
            for h in ready:
                try:
                    vq.answer(h.chain, h.response)
                except (GuestError, ValueError) as exc:  # a reset ring, a bad chain
                    log.warning("held answer to chain %d dropped: %s", h.chain.head, exc)
                if h.mem is not None:
                    host.memory.release(h.mem)
            host.notify(self.queue_index)

    def drop_all(self) -> None:
        """Reset: the rings are gone, nothing to answer."""
        self.pending_rids.clear()
        held, self.held = self.held, []
        self._release(h.mem for h in held)

    def _release(self, mems: Iterable[GuestMemory | None]) -> None:
        host = self.owner.host
        for mem in mems:
            if mem is not None and host is not None:
                host.memory.release(mem)
