"""The lane (lane.c): a C thread per vGPU serving latency-bound SUBMIT_3D
batches with no Python per batch. ``NativeLane`` is the thin, typed face of
its C API; what to lend it and when is vpcie.gpu.lanes' business.

Events come back to Python through ``event_fd`` (an eventfd the event loop
watches): TURN (a chain the lane put back for Python, ``token`` names it),
FRAME (an agent frame for Python; a COMPLETION's ``batch`` is then Python's to
publish) and LOST (``data`` the reason).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

from vpcie._native import native
from vpcie.protocol.virtq import MAX_CHAIN_BYTES, MAX_INDIRECT_ENTRIES
from vpcie.tunnel.liveness import PING_INTERVAL_NS, LivenessConfig

TURN, FRAME, LOST = 1, 2, 3
_STATS = (
    "submits", "completed", "handed", "python_frames", "kicks", "notifies", "pings", "lost",
    "backlogged",
)  # fmt: skip


class LaneEvent(NamedTuple):
    kind: int
    ctx_id: int
    token: int
    batch: Any  # struct vl_batch * (FRAME of a COMPLETION), else None
    data: bytes


class Handback(NamedTuple):
    fd: int
    seq: int  # the last COMMAND seq the lane sent
    leftover: bytes  # bytes read past the last whole frame
    lost: str  # why the lane found the session broken ("": it did not)
    unsent: bytes = b""  # the backlog: bytes of frames the kernel had not taken yet


class BatchParts(NamedTuple):
    """A batch the lane sent, as Python takes it over."""

    seq: int  # its COMMAND's seq on the session
    fwd_index: list[int]  # forwarded record i was record fwd_index[i] of the guest's batch
    signals: list[
        tuple[int, int, int, list[tuple[int, int]], int]
    ]  # stream, seq, reply size, reply GPAs, reply resource (0: none)


# A resource the lane may write SIGNAL replies into: id, addressable bytes
# (min(size, backing)), its backing entries (gpa, length) in order.
LaneResource = tuple[int, int, Sequence[tuple[int, int]]]


def live_cfg(ffi: Any, cfg: LivenessConfig) -> Any:
    """A ``struct vl_live_cfg *`` holding ``cfg``: the lane's only source of
    the rule's constants."""
    c = ffi.new("struct vl_live_cfg *")
    c.hang_ns, c.unreach_ns = cfg.hang_after_ns, cfg.unreachable_after_ns
    c.stall_ns, c.allowance = cfg.stall_ns, cfg.ack_allowance
    return c


class NativeLane:
    """One ``struct vl_lane`` and its thread (started here, joined by close)."""

    def __init__(self, max_segments: int, max_request: int) -> None:
        ffi, lib = native()
        self._ffi, self._lib = ffi, lib
        p = lib.vl_new(
            max_segments, MAX_CHAIN_BYTES, MAX_INDIRECT_ENTRIES, max_request, PING_INTERVAL_NS
        )
        if p == ffi.NULL:
            raise OSError("cannot start the lane thread")
        self._p: Any = p
        self.event_fd: int = lib.vl_event_fd(p)
        self._rx_cap = lib.VPCIE_MAX_PAYLOAD_COMPLETION + lib.VPCIE_FRAME_HEADER_SIZE
        self._rx = ffi.new("uint8_t[]", self._rx_cap)
        self._hb = ffi.new("struct vl_handback *")
        self._st = ffi.new("struct vl_stats *")

    @property
    def closed(self) -> bool:
        return self._p is None

    def close(self) -> None:
        """Join the thread and free the lane (sockets stay Python's)."""
        p, self._p = self._p, None
        if p is not None:
            self._lib.vl_free(p)

    def _lane(self) -> Any:
        if self._p is None:
            raise RuntimeError("lane closed")
        return self._p

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lane mutex (Python's own writes to a lent context's fence page)."""
        p = self._lane()
        self._lib.vl_lock(p)
        try:
            yield
        finally:
            self._lib.vl_unlock(p)

    # -- memory and ring ----------------------------------------------------------
    def set_regions(self, table: Any, n: int) -> None:
        """The C region table of the guest memory (``NativeRegions``), copied."""
        if self._lib.vl_set_regions(self._lane(), table if n else self._ffi.NULL, n):
            raise MemoryError("lane: cannot copy the region table")

    def attach_ring(self, ring: Any, kick_fd: int, call_fd: int | None) -> bool:
        """Serve ``ring`` (a NativeRing's ``struct vq_ring *``) from its kick eventfd."""
        fd = -1 if call_fd is None else call_fd
        return bool(self._lib.vl_attach_ring(self._lane(), ring, kick_fd, fd) == 0)

    def detach_ring(self) -> None:
        self._lib.vl_detach_ring(self._lane())

    def set_call_fd(self, call_fd: int | None) -> None:
        self._lib.vl_set_call_fd(self._lane(), -1 if call_fd is None else call_fd)

    def turn_valid(self, token: int) -> bool:
        return bool(self._lib.vl_turn_valid(self._lane(), token))

    def resume(self, token: int, repop: bool) -> None:
        self._lib.vl_resume(self._lane(), token, int(repop))

    def poke(self) -> None:
        """Have the thread look at the ring (a kick someone else saw)."""
        self._lib.vl_poke(self._lane())

    # -- contexts -------------------------------------------------------------------
    def add(
        self,
        ctx_id: int,
        fd: int,
        session: int,
        seq: int,
        window: int,
        max_batch: int,
        liveness: LivenessConfig | None = None,
    ) -> bool:
        """Lend ``ctx_id``'s session socket, watched by the liveness rule with
        ``liveness`` (the session's own: TunnelClient.liveness); False: no
        room, or already lent."""
        lib = self._lib
        cfg = live_cfg(self._ffi, liveness or LivenessConfig())
        lane = self._lane()
        return bool(lib.vl_add_ctx(lane, ctx_id, fd, session, seq, window, max_batch, cfg) == 0)

    def set_fence(self, ctx_id: int, gpa: int | None) -> None:
        self._lib.vl_set_fence(self._lane(), ctx_id, gpa or 0, int(gpa is not None))

    def set_resources(self, ctx_id: int, resources: Sequence[LaneResource]) -> None:
        ffi = self._ffi
        nsegs = sum(len(segs) for _rid, _limit, segs in resources)
        res = ffi.new("struct vl_res[]", max(len(resources), 1))
        segs_c = ffi.new("struct vl_gseg[]", max(nsegs, 1))
        at = 0
        for i, (rid, limit, segs) in enumerate(resources):
            r = res[i]
            r.rid, r.first, r.nsegs, r.limit = rid, at, len(segs), limit
            for gpa, length in segs:
                segs_c[at].gpa, segs_c[at].len = gpa, length
                at += 1
        self._lib.vl_set_resources(self._lane(), ctx_id, res, len(resources), segs_c, nsegs)

    def kill(self, ctx_id: int) -> None:
        """Stop serving and reading ``ctx_id``'s session at once."""
        self._lib.vl_kill(self._lane(), ctx_id)

    def take_frame(self, ctx_id: int) -> LaneEvent | None:
        """The oldest FRAME event of a killed context still queued."""
        return self._event(self._lib.vl_take_frame(self._lane(), ctx_id))

    def take_batch(self, ctx_id: int) -> BatchParts | None:
        """The oldest batch in flight of a killed context, taken over (freed here)."""
        ffi, lib = self._ffi, self._lib
        b = lib.vl_take_batch(self._lane(), ctx_id)
        if b == ffi.NULL:
            return None
        try:
            signals = []
            for i in range(b.nsigs):
                sig = b.sigs[i]
                segs = [(int(sig.segs[k].addr), int(sig.segs[k].len)) for k in range(sig.nsegs)]
                signals.append(
                    (int(sig.stream), int(sig.seq), int(sig.reply_size), segs, int(sig.rid))
                )
            return BatchParts(int(b.seq), ffi.unpack(b.fwd_index, b.nfwd), signals)
        finally:
            lib.vl_batch_free(b)

    def batch_info(self, batch: Any) -> tuple[list[int], bool]:
        """A batch's forwarded records' indices in the guest's batch, and
        whether a SIGNAL of it carries a reply."""
        return self._ffi.unpack(batch.fwd_index, batch.nfwd), bool(self._lib.vl_reply_needed(batch))

    def publish(self, batch: Any, reply: bytes, code: int, failed: int, fence: int | None) -> None:
        """Write the outcome of a completion the lane held back (replies, then
        fence slots on the page at ``fence``) and free its batch."""
        has = fence is not None
        lib = self._lib
        lib.vl_publish(self._lane(), batch, reply, len(reply), code, failed, fence or 0, int(has))

    def release(self, ctx_id: int) -> Handback | None:
        """Free a killed context's slot; its socket's state comes back."""
        if self._lib.vl_release(self._lane(), ctx_id, self._hb, self._rx, self._rx_cap):
            return None
        hb, ffi = self._hb, self._ffi
        why = ffi.string(hb.why).decode("utf-8", "replace")
        unsent = b""
        if hb.tx != ffi.NULL:
            unsent = ffi.buffer(hb.tx, hb.tx_len)[:]
            self._lib.vl_tx_free(hb.tx)
        leftover = ffi.buffer(self._rx, hb.rx_len)[:]
        return Handback(int(hb.fd), int(hb.seq), leftover, why, unsent)

    # -- events and figures ---------------------------------------------------------
    def next_event(self) -> LaneEvent | None:
        """The oldest event (one at a time: a take-back may pull a context's
        FRAME events out of the queue while others wait)."""
        return self._event(self._lib.vl_next_event(self._lane()))

    def _event(self, ev: Any) -> LaneEvent | None:
        ffi = self._ffi
        if ev == ffi.NULL:
            return None
        batch = None if ev.batch == ffi.NULL else ev.batch
        data = ffi.buffer(ev.data, ev.len)[:] if ev.len else b""
        out = LaneEvent(int(ev.kind), int(ev.ctx_id), int(ev.token), batch, data)
        self._lib.vl_event_free(ev)
        return out

    def stats(self) -> dict[str, int]:
        self._lib.vl_stats(self._lane(), self._st)
        return {name: int(getattr(self._st, name)) for name in _STATS}
