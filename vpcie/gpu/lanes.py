"""Lending a vGPU's agent sessions to the lane (vpcie/_native/lane.c).

The lane is a C thread that serves a context's copy-free SUBMIT_3D batches
from the control queue to its agent session and publishes their completions,
with no Python per batch (docs/ARCHITECTURE.md "The lane"). ``Lanes`` decides
what it gets and takes it back:

- **Lend.** A context whose session is idle (nothing in flight or queued, a
  frame boundary, plain TCP) is lent: TunnelClient stops reading and pinging,
  the lane gets its socket and next sequence number, the context's fence page
  and the resources it may write SIGNAL replies into. While any context is
  lent, the lane owns the control queue's kick eventfd.
- **Python's turns.** Every chain the lane does not serve it puts back and
  hands over (TURN); Python serves exactly that chain with the ordinary path
  (``GpuDevice.handle``), refreshes what the lane knows, and resumes it.
- **Take back.** A batch Python must send for a lent context (copies, a
  FENCE_PAGE_SET, anything the lane declined) takes the session back at once:
  the lane stops serving and reading it, Python publishes the completions the
  lane held for it, adopts the batches the lane sent (they complete through
  TunnelClient like its own) and TunnelClient reads on from the bytes the
  lane left. Submission order is the ring's order; nothing waits for the
  agent.
- **Failure.** A LOST event (EOF, reset, silence, a protocol error) takes the
  session back and fails it: every batch ends with DEVICE_LOST through the
  Python path. Unbind, context destroy and reset take it back first, then
  do what they do to any session.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

from vpcie._native import native_available
from vpcie.backend.device import DeviceHost
from vpcie.errors import ErrorCode, GuestError, ProtocolError
from vpcie.gpu.binding import Binding
from vpcie.gpu.context import Context, ContextState
from vpcie.gpu.native_lane import FRAME, LOST, TURN, BatchParts, LaneEvent, LaneResource, NativeLane
from vpcie.gpu.resources import ResourceTable
from vpcie.gpu.submit import completion_reply
from vpcie.memory import GuestMemory
from vpcie.protocol.codes import FrameType
from vpcie.protocol.frames import decode_payload
from vpcie.tunnel.results import error_code
from vpcie.virtqueue.device import VirtQueue

log = logging.getLogger(__name__)

CONTROL_QUEUE = 0
_ERROR = int(FrameType.ERROR)
_UNLOCKED = nullcontext()  # reusable: enters and exits with no state


class LaneOwner(Protocol):
    """What the lane needs of the device it serves (GpuDevice implements it)."""

    host: DeviceHost | None
    binding: Binding
    contexts: dict[int, Context]
    resources: ResourceTable

    def serve_control(self, request: bytes, read_len: int) -> bytes: ...

    def lane_adopt(
        self, ctx: Context, batches: list[BatchParts]
    ) -> list[tuple[int, Callable[[Any], None]]]: ...


@dataclass(eq=False)
class Lease:
    """A context's session while the lane has it."""

    ctx: Context
    session: Any  # TunnelClient


class Lanes:
    """The lane of one GpuDevice and the contexts lent to it."""

    def __init__(self, device: LaneOwner, max_request: int, *, enabled: bool = True) -> None:
        self.device = device
        self.max_request = max_request  # the device's cap on a control request
        self.enabled = enabled and native_available()
        self.lane: NativeLane | None = None
        self.leases: dict[int, Lease] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mem: GuestMemory | None = None  # the table the lane's regions map (acquired)
        self._attached = False
        self._scheduled: set[int] = set()
        # Set by GpuDevice when a resource, its backing, an attachment or a
        # fence page changed: what the lane knows is refreshed after the turn.
        self.dirty = False
        # A live migration holds every session in Python (migration.py).
        self.paused = False

    # -- lending -------------------------------------------------------------------
    def leased(self, ctx: Context) -> bool:
        return ctx.ctx_id in self.leases

    def schedule_lend(self, ctx: Context) -> None:
        """Lend ``ctx`` at the next loop turn if it is idle then (not from
        inside the session's own callbacks)."""
        if (
            not self.enabled
            or self.paused
            or ctx.ctx_id in self._scheduled
            or ctx.ctx_id in self.leases
        ):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._scheduled.add(ctx.ctx_id)
        loop.call_soon(self._lend, ctx)

    def _lend(self, ctx: Context) -> None:
        self._scheduled.discard(ctx.ctx_id)
        dev = self.device
        host = dev.host
        session: Any = ctx.session  # a TunnelClient (lend / take_back), or another Session
        if (
            host is None
            or self.paused
            or dev.contexts.get(ctx.ctx_id) is not ctx
            or ctx.state is not ContextState.OPEN
            or session is None
            or not ctx.idle()
            or not hasattr(session, "lend")
            or not session.lendable()
        ):
            return
        vq = host.queue(CONTROL_QUEUE)
        if vq is None or vq.native_state() is None or not hasattr(host, "claim_kicks"):
            return  # no native ring to hand over
        lane = self._start(vq)
        if lane is None:
            return
        if self._mem is None:
            self._set_memory(host.memory.acquire())
        fd, sid, seq = session.lend()
        info = session.info
        window = max(1, int(getattr(info, "max_inflight", 0) or 1))
        live = getattr(session, "liveness", None)  # the session's own liveness knobs
        if not lane.add(ctx.ctx_id, fd, sid, seq, window, int(info.max_batch_bytes or 0), live):
            session.take_back(seq)
            return
        self.leases[ctx.ctx_id] = Lease(ctx, session)
        ctx.lent()
        self.refresh(ctx)
        self._attach()

    def refresh(self, ctx: Context) -> None:
        """Tell the lane ``ctx``'s fence page and the resources its SIGNALs may
        write replies into (attached to it, with backing)."""
        lane = self.lane
        if lane is None or ctx.ctx_id not in self.leases:
            return
        table = self.device.resources
        items: list[LaneResource] = []
        for rid in sorted(ctx.resources):
            if rid not in table:
                continue
            res = table.get(rid)
            if res.backing is not None:
                items.append((rid, min(res.size, res.backing_bytes), list(res.backing)))
        lane.set_fence(ctx.ctx_id, ctx.fence_gpa if ctx.fence is not None else None)
        lane.set_resources(ctx.ctx_id, items)

    def refresh_all(self) -> None:
        for lease in self.leases.values():
            self.refresh(lease.ctx)

    def ring_locked(self) -> AbstractContextManager[None]:
        """Python's own pushes onto the control ring while the lane serves it."""
        lane = self.lane
        return lane.locked() if lane is not None and self._attached else _UNLOCKED

    # -- taking back ---------------------------------------------------------------
    def take_back_all(self) -> None:
        for lease in list(self.leases.values()):
            self.take_back(lease.ctx)

    def take_back(self, ctx: Context) -> bool:
        """``ctx``'s session is TunnelClient's again, now, with the lane's
        batches in flight adopted into ``ctx.inflight``. False if not lent."""
        lease = self.leases.pop(ctx.ctx_id, None)
        lane = self.lane
        if lease is None or lane is None:
            return False
        ctx.returned()  # before the session fails below: that may mark it lost
        lane.kill(ctx.ctx_id)
        # Completions the lane read and left to Python come first (fence order).
        lost, protocol = "", False
        while (ev := lane.take_frame(ctx.ctx_id)) is not None:
            why, broke = self._frame(ev, ctx)
            if why and not lost:
                lost, protocol = why, broke
        adopted = []
        while (parts := lane.take_batch(ctx.ctx_id)) is not None:
            adopted.append(parts)
        back = lane.release(ctx.ctx_id)
        assert back is not None, "lane slot still busy after its work was taken"
        if back.lost and not lost:
            lost, protocol = back.lost, back.lost.startswith("agent broke the protocol")
        session = lease.session
        adopt = self.device.lane_adopt(ctx, adopted)
        if lost:
            session.take_back(back.seq, adopt)
            session.fail(lost, protocol=protocol)
        else:
            session.take_back(back.seq, adopt, back.leftover, back.unsent)
        if not self.leases:
            self._detach()
            self._set_memory(None)
        return True

    def locked(self, ctx: Context) -> AbstractContextManager[None]:
        """Python's fence-page writes for a lent context: under the lane lock
        (nothing to take for any other: no generator on the Python path)."""
        lane = self.lane
        if lane is not None and ctx.ctx_id in self.leases:
            return lane.locked()
        return _UNLOCKED

    # -- the ring ------------------------------------------------------------------
    def _start(self, vq: VirtQueue) -> NativeLane | None:
        if self.lane is None:
            try:
                self.lane = NativeLane(vq.max_segments, self.max_request)
            except (OSError, RuntimeError) as exc:
                log.warning("lane unavailable, every batch takes the Python path: %s", exc)
                self.enabled = False
                return None
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self.lane.event_fd, self._on_events)
            # A process that exits without closing the device: the thread
            # stops before the interpreter unmaps guest memory.
            atexit.register(self.lane.close)
        return self.lane

    def _attach(self) -> None:
        """The lane takes the control queue's kicks (while anything is lent)."""
        host, lane = self.device.host, self.lane
        if self._attached or lane is None or host is None or not self.leases:
            return
        claimed = host.claim_kicks(CONTROL_QUEUE)
        if claimed is None:
            return
        vq, kick_fd, call_fd = claimed
        if self.dirty:  # Python served commands meanwhile
            self.dirty = False
            self.refresh_all()
        if host.memory.mem is not self._mem:  # a new table since the lane last served
            self._set_memory(host.memory.acquire())
        ring = vq.native_state()
        assert ring is not None
        if not lane.attach_ring(ring, kick_fd, call_fd):
            host.unclaim_kicks(CONTROL_QUEUE)
            return
        self._attached = True

    def _detach(self) -> None:
        host, lane = self.device.host, self.lane
        if self._attached and lane is not None:
            lane.detach_ring()
            self._attached = False
            if host is not None:
                host.unclaim_kicks(CONTROL_QUEUE)

    def _set_memory(self, mem: GuestMemory | None) -> None:
        """Point the lane at ``mem`` (acquired by the caller) and let go of the
        table it used before."""
        from vpcie.virtqueue.native_walker import native_regions

        lane, host = self.lane, self.device.host
        assert lane is not None
        if mem is not None:
            regs = native_regions(mem)
            lane.set_regions(regs.table, regs.n)
        else:
            lane.set_regions(None, 0)
        old, self._mem = self._mem, mem
        if old is not None and host is not None:
            host.memory.release(old)

    def queue_started(self, index: int) -> None:
        if index == CONTROL_QUEUE and self.leases:
            self._attach()

    def queue_stopped(self, index: int) -> None:
        # The core stops watching the queue; the lane lets go of it before the
        # core reads last_avail (GET_VRING_BASE) or maps a new table.
        if index == CONTROL_QUEUE and self._attached and self.lane is not None:
            self.lane.detach_ring()
            self._attached = False

    def call_fd(self, index: int, fd: int | None) -> None:
        if index == CONTROL_QUEUE and self._attached and self.lane is not None:
            self.lane.set_call_fd(fd)

    def owns_ring(self) -> bool:
        return self._attached

    def poke(self) -> None:
        """The core looked at the ring (a kick it saw before the lane took
        over): the lane looks too."""
        if self.lane is not None:
            self.lane.poke()

    # -- events --------------------------------------------------------------------
    def _on_events(self) -> None:
        lane = self.lane
        while lane is not None and not lane.closed and (ev := lane.next_event()) is not None:
            try:
                self._event(ev)
            except Exception:  # one bad event must not stop the others
                log.exception("lane event %d for context %d failed", ev.kind, ev.ctx_id)

    def _event(self, ev: LaneEvent) -> None:
        if ev.kind == TURN:
            self._turn(ev.token)
            return
        lease = self.leases.get(ev.ctx_id)
        if lease is None:  # taken back meanwhile (its FRAMEs were taken with it)
            return
        if ev.kind == LOST:
            self.take_back(lease.ctx)  # fails the session: its batches end with DEVICE_LOST
        elif ev.kind == FRAME:
            why, _broke = self._frame(ev, lease.ctx)
            if why:
                self.take_back(lease.ctx)

    def _turn(self, token: int) -> None:
        """Serve the one chain the lane handed over, then let it go on."""
        lane, host = self.lane, self.device.host
        assert lane is not None
        vq = host.queue(CONTROL_QUEUE) if host is not None else None
        if vq is None or not lane.turn_valid(token):
            return
        repop = True
        try:
            vq.serve(self.device.serve_control, 1, self.max_request)
        except GuestError as exc:  # avail.idx too far ahead: wait for the next kick
            log.warning("queue %d: guest error: %s", CONTROL_QUEUE, exc)
            repop = False
        finally:
            if self.dirty:
                self.dirty = False
                self.refresh_all()
            if host is not None:
                host.notify(CONTROL_QUEUE)
            if not lane.closed:
                lane.resume(token, repop)

    def _frame(self, ev: LaneEvent, ctx: Context) -> tuple[str, bool]:
        """An agent frame the lane left to Python, by TunnelClient's rules. A
        COMPLETION's outcome is published; returns why the session is lost
        ("" if it is not) and whether the agent broke the protocol (the lane
        has stopped reading it either way once this is called)."""
        data = ev.data
        ftype, payload = data[5], data[24:]
        if ev.batch is not None:  # a COMPLETION other than the plain OK
            try:
                status, failed, message, _n, results, blob = decode_payload("COMPLETION", payload)
            except ProtocolError as exc:
                self._publish(
                    ev.batch, ctx, ErrorCode.DEVICE_LOST, 0, f"malformed COMPLETION: {exc}"
                )
                return f"agent broke the protocol: {exc}", True
            code = ErrorCode.OK if status == 0 else error_code(status)
            self._publish(ev.batch, ctx, code, failed, message, dict(results), blob)
            return "", False
        try:
            if ftype != _ERROR:
                decode_payload(FrameType(ftype).name, payload)  # a malformed PING/PONG raises
                raise ProtocolError(f"unexpected {FrameType(ftype).name} frame")
            code_v, fatal, message = decode_payload("ERROR", payload)
        except ProtocolError as exc:
            return f"agent broke the protocol: {exc}", True
        if fatal:
            return f"agent closed the session: {error_code(code_v).name} {message}", False
        log.warning("agent of context %d: %s %s", ctx.ctx_id, error_code(code_v).name, message)
        return "", False

    def _publish(
        self,
        batch: Any,
        ctx: Context,
        code: ErrorCode,
        failed_index: int,
        message: str,
        results: dict[int, int] | None = None,
        blob: bytes = b"",
    ) -> None:
        lane = self.lane
        assert lane is not None
        fwd_index, want_reply = lane.batch_info(batch)
        reply, orig_failed = completion_reply(
            fwd_index, want_reply, code, failed_index, message, results or {}, blob
        )
        fence = ctx.fence_gpa if ctx.fence is not None else None
        lane.publish(batch, reply, int(code), orig_failed, fence)

    # -- the end -------------------------------------------------------------------
    def close(self) -> None:
        """Stop the thread (the device has taken every session back)."""
        lane = self.lane
        if lane is None:
            return
        self.take_back_all()
        self._on_events()
        self._detach()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(lane.event_fd)
        lane.close()
        atexit.unregister(lane.close)
        self.lane = None
        if self._mem is not None and self.device.host is not None:
            self.device.host.memory.release(self._mem)
        self._mem = None

    def stats(self) -> dict[str, int]:
        if self.lane is None:
            return {}
        return {f"lane_{k}": v for k, v in self.lane.stats().items()}
