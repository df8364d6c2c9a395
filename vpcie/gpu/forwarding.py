"""SUBMIT_3D forwarding: a context's prepared batches to its agent session.

A batch the device accepted (``prepare`` in submit.py) goes to the context's
agent session in submission order, inside the window of batches the agent
grants; its outcome comes back as a Completion and is published: SIGNAL
replies into guest buffers first, then the fence page. A virtio fence means
"accepted", never "finished", so everything here runs after the guest has
its answer. Batches ended here (refused, over a cap, no GPU bound) publish
only once the batches ahead of them have finished.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from vpcie.backend.device import DeviceHost
from vpcie.errors import ErrorCode, GuestError, ProtocolError, VgpuError
from vpcie.gpu.binding import Binding, Session, info_bytes
from vpcie.gpu.context import Context, ContextState, Deferred, Pending
from vpcie.gpu.lanes import Lanes
from vpcie.gpu.native_lane import BatchParts
from vpcie.gpu.submit import Prepared, Signal, completion_reply
from vpcie.memory import GuestMemory
from vpcie.protocol.batch import Record
from vpcie.protocol.codes import MAX_HANDLE_EPOCH, MAX_STREAMS, NO_INDEX, Opcode
from vpcie.tunnel.runstate import Runstate

# The device's logger: its records are under the guest log budget (logbudget.py).
log = logging.getLogger("vpcie.gpu.device")

MAX_CTX_INFLIGHT = 1024  # forwarded batches per context not yet completed
# Outcomes of batches ended here (refused, over a cap) that wait for earlier
# work of their context before their SIGNALs publish; past this many a
# context's next ones publish at once (a guest that keeps this many failed
# batches outstanding gets no ordering for them, the backend no growth).
MAX_DEFERRED = 1024
# Guest batch bytes this vGPU holds for work not yet completed (queued behind
# the agent's window, or on the wire): a guest resubmitting 1 MiB batches must
# not grow the backend's memory without bound.
MAX_INFLIGHT_BATCH_BYTES = 64 << 20


class ForwardingOwner(Protocol):
    """What forwarding needs of the device it works for (GpuDevice)."""

    host: DeviceHost | None
    binding: Binding
    lanes: Lanes
    contexts: dict[int, Context]
    bound_info: bytes
    stats: dict[str, int]

    def batch_finished(self) -> None: ...

    def background(self, coro: Coroutine[Any, Any, None]) -> None: ...


class Forwarding:
    """The batches of one vGPU's contexts between acceptance and completion."""

    def __init__(self, owner: ForwardingOwner) -> None:
        self.owner = owner
        self.inflight_bytes = 0  # guest batch bytes held for uncompleted work
        # A live migration's hold (migration.py): while ``holding``, accepted
        # batches queue here and nothing is sent; ``released`` wakes the
        # forwarders, which then send on the contexts' new sessions.
        self.holding = False
        self.released = asyncio.Event()
        self.released.set()
        self.opening = 0  # sessions being opened now (a migration waits for them)

    # -- a batch in -----------------------------------------------------------------
    def reject(
        self, ctx: Context, code: ErrorCode, records: list[Any], message: str, index: int = -1
    ) -> None:
        """A batch refused before anything ran: count it now, end its SIGNALs
        after the work submitted before it."""
        self.owner.stats["rejected"] += 1
        log.info("context %d: batch rejected: %s: %s", ctx.ctx_id, code.name, message)
        if ctx.fence is None:
            return
        lanes = self.owner.lanes
        with lanes.locked(ctx):
            ctx.fence.reject(int(code))
        signals = [
            (r.stream, r.body[0])
            for r in records
            if r.opcode == Opcode.SIGNAL and isinstance(r.body, tuple) and r.stream < MAX_STREAMS
        ]
        if not signals:
            return

        def publish() -> None:
            fence = ctx.fence
            if fence is not None:
                with lanes.locked(ctx):
                    for stream, seq in signals:
                        fence.complete(stream, seq, int(code), max(index, 0))

        self._after_earlier(ctx, publish)

    def _after_earlier(
        self, ctx: Context, publish: Callable[[], None], pending: Pending | None = None
    ) -> None:
        """Run ``publish`` (ending ``pending``, if given) once every batch of
        ``ctx`` now in flight has finished (at once when none is)."""
        self.owner.lanes.take_back(ctx)  # the lane's batches become ctx.inflight
        if not ctx.inflight or len(ctx.deferred) >= MAX_DEFERRED:
            publish()
            return
        ctx.deferred.append(Deferred(publish, set(ctx.inflight), pending))

    def dispatch(self, ctx: Context, prepared: Prepared) -> None:
        # A lent session comes back before Python sends on it, with the lane's
        # batches in flight adopted into ctx.inflight (a SIGNAL waits for them).
        owner = self.owner
        owner.lanes.take_back(ctx)
        if not prepared.fwd_index:
            if not (prepared.signals and ctx.inflight):
                self.finish(Pending(prepared, ctx), ErrorCode.OK, NO_INDEX, "", {}, b"")
                return
            # SIGNALs alone while earlier batches are still running: a SIGNAL
            # must not publish before the work queued ahead of it on its
            # stream is done, so a NOP per stream goes to the agent, which
            # orders it behind that work (and completes it after).
            streams = sorted({sig.stream for sig in prepared.signals})
            prepared.forward = [Record(int(Opcode.NOP), 0, s, ()) for s in streams]
            prepared.fwd_index = [0] * len(streams)
        if owner.binding.target is None:
            self._answer_unbound(ctx, prepared)
            return
        if ctx.lost:
            self.finish(
                Pending(prepared, ctx),
                ErrorCode.DEVICE_LOST,
                0,
                "the agent session of this context was lost; recreate the context",
                {},
                b"",
            )
            return
        host = owner.host
        nbytes = len(prepared.raw)
        over = ""
        if len(ctx.inflight) >= MAX_CTX_INFLIGHT:
            over = f"more than {MAX_CTX_INFLIGHT} batches in flight"
        elif self.inflight_bytes + nbytes > MAX_INFLIGHT_BATCH_BYTES:
            over = f"more than {MAX_INFLIGHT_BATCH_BYTES >> 20} MiB of batches in flight"
        if over:
            refused = Pending(prepared, ctx)
            if host is not None:  # its reply views stay mapped until it publishes
                refused.mem = host.memory.acquire()
            self._after_earlier(
                ctx,
                functools.partial(self.finish, refused, ErrorCode.QUOTA_EXCEEDED, 0, over, {}, b""),
                refused,
            )
            return
        pending = Pending(prepared, ctx, nbytes=nbytes)
        self.inflight_bytes += nbytes
        ctx.inflight.append(pending)
        if host is not None:  # its views stay mapped until it completes
            pending.mem = host.memory.acquire()
        session = ctx.session
        if (
            session is not None
            and ctx.has_session
            and not self.holding
            and not ctx.forwarding
            and (ctx.queue is None or ctx.queue.empty())
            and session.inflight < _window(session)
        ):
            # Fast path: nothing queued ahead of it and room in the agent's
            # window, so it goes on the wire now (saves a task hop).
            self._send(ctx, session, pending)
            return
        if ctx.queue is None:
            ctx.queue = asyncio.Queue()
            ctx.forwarder = asyncio.get_running_loop().create_task(self._forward(ctx))
        ctx.queue.put_nowait(pending)

    def _answer_unbound(self, ctx: Context, prepared: Prepared) -> None:
        """No GPU bound: QUERY says so, everything else fails with NO_DEVICE."""
        results: dict[int, int] = {}
        blob = b""
        for i, r in enumerate(prepared.forward):
            if r.opcode == Opcode.QUERY:
                blob = self.owner.bound_info
            elif r.opcode != Opcode.NOP:
                self.finish(
                    Pending(prepared, ctx),
                    ErrorCode.NO_DEVICE,
                    i,
                    "no GPU is bound to this vGPU",
                    results,
                    blob,
                )
                return
        self.finish(Pending(prepared, ctx), ErrorCode.OK, NO_INDEX, "", results, blob)

    # -- to the agent ---------------------------------------------------------------
    async def _forward(self, ctx: Context) -> None:
        """Send this context's queued batches to its agent session, in order,
        keeping at most the agent's granted in-flight window outstanding."""
        assert ctx.queue is not None
        while True:
            pending = await ctx.queue.get()
            if pending.done:
                continue
            ctx.forwarding = True
            try:
                while not pending.done:
                    if self.holding:  # a migration: the session may change meanwhile
                        await self.released.wait()
                        continue
                    session = await self._session(ctx)
                    if self.holding:
                        continue
                    if session.inflight < _window(session):
                        self._send(ctx, session, pending)
                        break
                    ctx.window_open.clear()
                    await ctx.window_open.wait()
            except VgpuError as exc:
                self.finish(pending, exc.code, 0, exc.message, {}, b"")
                if exc.code == ErrorCode.DEVICE_LOST:
                    self.mark_lost(ctx, exc.message)
            finally:
                ctx.forwarding = False

    def _send(self, ctx: Context, session: Session, pending: Pending) -> None:
        p = pending.prepared
        try:
            data = p.encoded()
            p.records, p.spans, p.raw = None, None, b""  # the wire copy is all that is needed
        except ProtocolError as exc:  # over the batch caps once rewritten
            self.finish(pending, ErrorCode.INVALID_ARGUMENT, 0, str(exc), {}, b"")
            return
        h2d_total, d2h_total = p.copy_totals()
        try:
            session.send_encoded(
                data, h2d_total, d2h_total, h2d=p.h2d, d2h=p.d2h,
                on_done=functools.partial(self._done, pending),
            )  # fmt: skip
        except VgpuError as exc:
            self.finish(pending, exc.code, 0, exc.message, {}, b"")
            if exc.code == ErrorCode.DEVICE_LOST:
                self.mark_lost(ctx, exc.message)

    async def _session(self, ctx: Context) -> Session:
        if ctx.has_session and ctx.session is not None:
            return ctx.session
        if ctx.lost:
            raise VgpuError(ErrorCode.DEVICE_LOST, "agent session lost")
        epoch = ctx.sessions
        if epoch > MAX_HANDLE_EPOCH:  # its handles would repeat: refuse, never wrap
            raise VgpuError(
                ErrorCode.DEVICE_LOST,
                f"context {ctx.ctx_id} has had {epoch} agent sessions (one per binding), "
                "the most its handles can tell apart; recreate the context",
            )
        binding = self.owner.binding
        self.opening += 1
        try:
            session, sgen = await binding.open(f"{ctx.name}#{ctx.ctx_id}", epoch)
        except VgpuError:
            raise
        except Exception as exc:  # auth refused, protocol error: the agent is unusable
            raise VgpuError(ErrorCode.DEVICE_LOST, f"cannot open agent session: {exc}") from exc
        finally:
            self.opening -= 1
        if sgen != binding.generation or self.owner.contexts.get(ctx.ctx_id) is not ctx:
            self.owner.background(session.close())
            raise VgpuError(ErrorCode.DEVICE_LOST, "binding changed while connecting")
        ctx.opened(session)  # handles this session issues carry ``epoch``
        self.owner.bound_info = info_bytes(session.info)
        return session

    def mark_lost(self, ctx: Context, reason: str = "") -> None:
        if ctx.state is ContextState.LENT:  # the lane lets go of it first
            self.owner.lanes.take_back(ctx)
        session = ctx.session
        reason = reason or "the agent session was lost"
        endpoint = getattr(session, "endpoint", "")
        if endpoint and endpoint not in reason:
            reason = f"agent {endpoint}: {reason}"
        lost = ctx.mark_lost(reason)
        if lost is not None:
            self.owner.background(lost.close())
        self.fail_inflight(ctx, ErrorCode.DEVICE_LOST, "the agent session was lost")

    def notice_lost(self, ctx: Context) -> None:
        """A session the tunnel declared LOST while nothing of the context
        was in flight (no completion told the device): mark it lost now."""
        session = ctx.session
        if session is not None and getattr(session, "state", None) is Runstate.LOST:
            self.mark_lost(ctx, getattr(session, "lost_reason", ""))

    # -- outcomes -------------------------------------------------------------------
    def _done(self, pending: Pending, comp: Any) -> None:
        """The agent's Completion (or the tunnel's DEVICE_LOST), synchronously."""
        ctx = pending.ctx
        ctx.window_open.set()
        if pending.done:
            return
        code = ErrorCode(int(comp.status))
        self.finish(pending, code, comp.failed_index, comp.message, comp.results, comp.blob)
        if code == ErrorCode.DEVICE_LOST:
            self.mark_lost(ctx, comp.message)

    def finish(
        self,
        pending: Pending,
        code: ErrorCode,
        failed_index: int,
        message: str,
        results: dict[int, int],
        blob: bytes,
    ) -> None:
        """Publish a batch's outcome: replies first, then the fence page."""
        if pending.done:
            return
        pending.done = True
        owner = self.owner
        ctx, p = pending.ctx, pending.prepared
        if pending in ctx.inflight:
            ctx.inflight.remove(pending)
            if not ctx.inflight:
                owner.lanes.schedule_lend(ctx)
        self.inflight_bytes -= pending.nbytes
        pending.nbytes = 0
        if pending.mem is not None and owner.host is not None:
            owner.host.memory.release(pending.mem)
        pending.mem = None
        reply, orig_failed = completion_reply(
            p.fwd_index, any(sig.reply for sig in p.signals), code, failed_index, message,
            results, blob,
        )  # fmt: skip
        with owner.lanes.locked(ctx):
            for sig in p.signals:
                sig_code = int(code)
                if sig.reply:
                    if len(reply) > sig.reply_size:
                        sig_code = int(ErrorCode.OUT_OF_RANGE)
                    else:
                        _scatter(sig.reply, reply)
                if ctx.fence is not None:
                    failed = orig_failed if orig_failed != NO_INDEX else 0
                    ctx.fence.complete(sig.stream, sig.seq, sig_code, failed)
        if ctx.deferred:
            self._release_deferred(ctx, pending)
        owner.batch_finished()

    def _release_deferred(self, ctx: Context, done: Pending) -> None:
        """``done`` has finished: publish, in order, what waited only for it."""
        ready = []
        for d in ctx.deferred:
            d.waiting.discard(done)
            if not d.waiting:
                ready.append(d)
        if ready:
            ctx.deferred = [d for d in ctx.deferred if d.waiting]
            for d in ready:
                d.publish()

    def fail_inflight(self, ctx: Context, code: ErrorCode, message: str) -> None:
        for pending in list(ctx.inflight):
            self.finish(pending, code, 0, message, {}, b"")
        ctx.window_open.set()

    # -- sessions going away --------------------------------------------------------
    def drop_session(self, ctx: Context, why: str) -> None:
        """Unbind, rebind: ``ctx`` has no session any more, its batches in
        flight end with DEVICE_LOST."""
        self.owner.lanes.take_back(ctx)  # the lane's batches join ctx.inflight
        self.fail_inflight(ctx, ErrorCode.DEVICE_LOST, why)
        session = ctx.detached()
        if session is not None:
            self.owner.background(session.close())

    def destroy(self, ctx: Context) -> None:
        """CTX_DESTROY, reset: as ``drop_session``, and the forwarder stops."""
        self.owner.lanes.take_back(ctx)
        self.fail_inflight(ctx, ErrorCode.DEVICE_LOST, "context destroyed")
        session = ctx.destroyed()
        if session is not None:
            self.owner.background(session.close())
        if ctx.forwarder is not None:
            ctx.forwarder.cancel()

    # -- batches the lane sent (lanes.py) ------------------------------------------
    def lane_adopt(
        self, ctx: Context, batches: list[BatchParts]
    ) -> list[tuple[int, Callable[[Any], None]]]:
        """Take over the lane's batches in flight of ``ctx`` (its session is
        coming back): they join ``ctx.inflight`` ahead of Python's own and end
        like them. Returns each one's COMMAND seq and completion callback."""
        host = self.owner.host
        adopted: list[Pending] = []
        out: list[tuple[int, Callable[[Any], None]]] = []
        for parts in batches:
            mem: GuestMemory | None = host.memory.acquire() if host is not None else None
            signals, rids = [], set()
            for stream, seq, size, segs, rid in parts.signals:
                views: list[memoryview] = []
                try:
                    for gpa, length in segs:
                        views += mem.views(gpa, length) if mem is not None else []
                except GuestError:  # checked when sent; gone with a new table since
                    views = []
                signals.append(Signal(stream, seq, views, size))
                if rid:
                    rids.add(rid)
            prepared = Prepared([], parts.fwd_index, signals=signals, rids=rids)
            pending = Pending(prepared, ctx, mem=mem)
            adopted.append(pending)
            out.append((parts.seq, functools.partial(self._done, pending)))
        ctx.inflight[0:0] = adopted
        return out


def _window(session: Session) -> int:
    return max(1, int(getattr(session.info, "max_inflight", 0) or 1))


def _scatter(views: list[memoryview], data: bytes) -> None:
    pos = 0
    for v in views:
        if pos >= len(data):
            break
        k = min(len(v), len(data) - pos)
        v[:k] = data[pos : pos + k]
        pos += k
