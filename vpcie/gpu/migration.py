"""Live migration: a bound vGPU's contexts move to another agent with their
device state, while the guest keeps submitting (GpuDevice.migrate).

1. open   one session on the target per context with a live session, with
          that context's handle epoch and the target's lease token; a
          failure changes nothing.
2. hold   new batches queue in the backend (the guest still gets its virtio
          answers); the lane gives every session back and lends none.
3. drain  wait until the source sessions have nothing in flight (bounded:
          over ``drain_timeout`` -> abort, work resumes on the source).
4. move   per context: STATE_EXPORT (+ MODULE_EXPORT) on the source;
          MODULE_LOAD_AT, ALLOC_AT, SESSION_RESTORE on the target; the
          contents COPY_D2H source -> COPY_H2D target in pieces, a few in
          flight (the next read overlaps the previous write).
5. switch each context takes its new session (same handles), the binding
          names the target, the source sessions close, the hold ends: the
          queued batches go to the target in order.

A source that fails (its agent died, a session was lost) means its state is
gone: the contexts end with DEVICE_LOST as on any loss, and the vGPU is
bound to the target empty (``state_lost``). A target that fails aborts: the
target sessions close and the work resumes on the source, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from vpcie.errors import ErrorCode, VgpuError
from vpcie.gpu.binding import AgentTarget, Binding, Session, info_bytes
from vpcie.gpu.context import Context
from vpcie.gpu.forwarding import Forwarding
from vpcie.gpu.lanes import Lanes
from vpcie.gpu.migration_plan import (
    MigrationReport,
    SessionState,
    copy_chunks,
    restore_batches,
)
from vpcie.protocol.batch import Record, encode_batch, rec
from vpcie.protocol.codes import Opcode
from vpcie.tunnel import commands as cmds

log = logging.getLogger("vpcie.gpu.device")
T = TypeVar("T")

DRAIN_TIMEOUT_S = 30.0  # vpcie-backend --migrate-drain-timeout
COPY_DEPTH = 8  # copy pieces in flight (each one D2H then one H2D)
OPEN_TIMEOUT_S = 10.0  # opening the target sessions (as a bind's probe)
DRAIN_POLL_S = 0.0005


class MigratingDevice(Protocol):
    """What the engine needs of GpuDevice."""

    binding: Binding
    contexts: dict[int, Context]
    forwarding: Forwarding
    lanes: Lanes
    bound_info: bytes

    def background(self, coro: Any) -> None: ...


class SourceLost(Exception):
    """The source cannot give its state: it is gone."""


class Abort(Exception):
    """The migration stops; the vGPU stays on the source (one-line reason)."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.DEVICE_LOST) -> None:
        super().__init__(message)
        self.code = code


async def migrate(
    device: MigratingDevice, target: AgentTarget, drain_timeout: float = DRAIN_TIMEOUT_S
) -> MigrationReport:
    binding, fwd = device.binding, device.forwarding
    source = binding.target
    if source is None:
        raise VgpuError(ErrorCode.NO_DEVICE, "no GPU is bound to this vGPU: nothing to migrate")
    for ctx in device.contexts.values():
        fwd.notice_lost(ctx)
    movers = {c.ctx_id: c for c in device.contexts.values() if c.has_session}
    was_lost = any(c.lost for c in device.contexts.values())
    opened = await _open_targets(device, target, list(movers.values()))
    info = await _target_info(binding, target, opened)

    t_hold = time.monotonic()
    _hold(device)
    state_bytes, copy_ms, lost_why = 0, 0.0, ""
    try:
        await _drain(device, movers, t_hold + drain_timeout, drain_timeout)
        # A context whose first session opened while the hold began moves too.
        late = [c for c in device.contexts.values() if c.has_session and c.ctx_id not in movers]
        if late:
            opened.update(await _open_targets(device, target, late))
            movers.update({c.ctx_id: c for c in late})
        t_copy = time.monotonic()
        live = [c for c in movers.values() if device.contexts.get(c.ctx_id) is c]
        # Contexts move side by side: each has its own pair of sessions.
        state_bytes = sum(await _all([_move_state(c, opened[c.ctx_id]) for c in live]))
        copy_ms = (time.monotonic() - t_copy) * 1e3
    except SourceLost as exc:
        lost_why = str(exc)
    except Abort as exc:
        _close_all(device, opened.values())
        _release(device)
        log.warning("migration to %s aborted: %s", target.describe(), exc)
        raise VgpuError(exc.code, f"migration aborted, still on the source: {exc}") from None
    except BaseException:
        _close_all(device, opened.values())
        _release(device)
        raise
    if lost_why:
        # The state is gone with the source: the vGPU goes to the target
        # empty, exactly a rebind (every context's work ends DEVICE_LOST).
        _close_all(device, opened.values())
        binding.bind(target)
        device.bound_info = info
        _release(device)
        stun = (time.monotonic() - t_hold) * 1e3
        log.warning("migration to %s: source lost (%s), bound empty", target.describe(), lost_why)
        return MigrationReport(source.describe(), target.describe(), 0, 0, stun, 0.0, True)
    moved = _switch(device, movers, opened, target, info)
    _release(device)
    stun = (time.monotonic() - t_hold) * 1e3
    report = MigrationReport(
        source.describe(), target.describe(), moved, state_bytes, stun, copy_ms, was_lost
    )
    log.info(
        "migrated %s -> %s: %d contexts, %d bytes, stun %.1f ms (copy %.1f ms)",
        report.source, report.target, moved, state_bytes, stun, copy_ms,
    )  # fmt: skip
    return report


# -- 1. open -----------------------------------------------------------------------
async def _open_targets(
    device: MigratingDevice, target: AgentTarget, ctxs: Sequence[Context]
) -> dict[int, Session]:
    """A target session per context, with its current handle epoch; any
    failure closes those opened and raises VgpuError (nothing changed)."""
    factory = device.binding.factory
    opened: dict[int, Session] = {}
    try:
        for ctx in ctxs:
            epoch = ctx.sessions - 1  # the epoch of the session it has now
            name = f"{ctx.name}#{ctx.ctx_id}"
            opened[ctx.ctx_id] = await asyncio.wait_for(
                factory(target, name, epoch), OPEN_TIMEOUT_S
            )
    except BaseException as exc:
        _close_all(device, opened.values())
        if isinstance(exc, TimeoutError):
            raise VgpuError(
                ErrorCode.TIMEOUT,
                f"target {target.describe()} did not answer in {OPEN_TIMEOUT_S} s",
            ) from None
        if isinstance(exc, VgpuError):
            raise VgpuError(exc.code, f"target {target.describe()}: {exc.message}") from None
        if isinstance(exc, (OSError, ConnectionError)):
            raise VgpuError(
                ErrorCode.DEVICE_LOST, f"cannot reach target {target.describe()}: {exc}"
            ) from None
        raise
    return opened


async def _target_info(binding: Binding, target: AgentTarget, opened: dict[int, Session]) -> bytes:
    """QUERY_INFO bytes of the target for the capset: from a session opened
    for a context, else a probe session (which also proves it reachable)."""
    for session in opened.values():
        return info_bytes(session.info)
    probe = Binding(binding.factory)
    probe.target = target
    try:
        session, _gen = await asyncio.wait_for(probe.open("migrate-probe"), OPEN_TIMEOUT_S)
    except TimeoutError:
        raise VgpuError(
            ErrorCode.TIMEOUT, f"target {target.describe()} did not answer in {OPEN_TIMEOUT_S} s"
        ) from None
    except VgpuError as exc:
        raise VgpuError(exc.code, f"target {target.describe()}: {exc.message}") from None
    info = info_bytes(session.info)
    await session.close()
    return info


# -- 2. hold, 3. drain ------------------------------------------------------------
def _hold(device: MigratingDevice) -> None:
    fwd = device.forwarding
    fwd.holding = True
    fwd.released.clear()
    device.lanes.paused = True
    device.lanes.take_back_all()  # their batches in flight become ctx.inflight


def _release(device: MigratingDevice) -> None:
    fwd = device.forwarding
    fwd.holding = False
    fwd.released.set()
    device.lanes.paused = False
    for ctx in device.contexts.values():
        if ctx.idle():
            device.lanes.schedule_lend(ctx)


async def _drain(
    device: MigratingDevice, movers: dict[int, Context], deadline: float, limit: float
) -> None:
    """Until no source session has a batch in flight and none is opening."""
    fwd = device.forwarding
    while True:
        busy = 0
        for ctx in device.contexts.values():
            if ctx.ctx_id in movers and ctx.lost:
                raise SourceLost(ctx.lost_reason or "a source session was lost")
            session = ctx.session
            if session is not None and ctx.has_session:
                busy += session.inflight
        if not busy and not fwd.opening:
            return
        if time.monotonic() > deadline:
            raise Abort(
                f"{busy} batches still running on the source after {limit:g} s "
                "(--migrate-drain-timeout)",
                ErrorCode.TIMEOUT,
            )
        await asyncio.sleep(DRAIN_POLL_S)


# -- 4. move ----------------------------------------------------------------------
async def _call(
    session: Session,
    records: list[Record],
    *,
    source: bool,
    h2d: Sequence[Any] = (),
    d2h: Sequence[Any] = (),
) -> Any:
    """One batch on a session, its Completion; a failure raises SourceLost
    (the source is gone) or Abort (anything else)."""
    side = "source" if source else "target"
    try:
        data = encode_batch(records)
        h2d_n, d2h_n = cmds.copy_stream_sizes(records)
        comp = await session.send_encoded(data, h2d_n, d2h_n, h2d=h2d, d2h=d2h)
        code = ErrorCode(int(comp.status))
        message = comp.message
    except VgpuError as exc:
        code, message = exc.code, exc.message
    if code == ErrorCode.OK:
        return comp
    if source and code == ErrorCode.DEVICE_LOST:
        raise SourceLost(message or "the source session was lost")
    op = Opcode(records[0].opcode).name if records else "?"
    raise Abort(f"{side} agent refused {op}: {code.name} {message}".rstrip(), code)


async def _move_state(ctx: Context, dst: Session) -> int:
    """The state of ``ctx``'s source session recreated on ``dst``; bytes moved."""
    src = ctx.session
    if src is None or ctx.lost:
        raise SourceLost(ctx.lost_reason or "the source session was lost")
    comp = await _call(src, [rec(Opcode.STATE_EXPORT)], source=True)
    try:
        state = SessionState.parse(comp.blob)
    except ValueError as exc:
        raise Abort(f"source agent: {exc}") from None
    codes: dict[int, bytes] = {}
    for m in state.modules:
        done = await _call(src, [rec(Opcode.MODULE_EXPORT, m.handle)], source=True)
        codes[m.handle] = bytes(done.blob)
    for batch in restore_batches(state, codes):
        await _call(dst, batch, source=False)
    await _copy(src, dst, copy_chunks(state.buffers))
    return state.buffer_bytes + sum(len(c) for c in codes.values())


async def _copy(src: Session, dst: Session, chunks: list[tuple[int, int, int]]) -> None:
    """Every piece read from ``src`` and written to ``dst``, COPY_DEPTH in
    flight, so reading piece n+1 overlaps writing piece n."""
    if not chunks:
        return
    depth = max(1, min(COPY_DEPTH, _window(src), _window(dst)))
    gate = asyncio.Semaphore(depth)
    # One buffer per piece in flight, reused: no 4 MiB allocation per piece.
    spare = [
        bytearray(max(size for _h, _o, size in chunks)) for _ in range(min(depth, len(chunks)))
    ]

    async def one(handle: int, off: int, size: int) -> None:
        async with gate:
            buf = spare.pop()
            try:
                view = memoryview(buf)[:size]
                await _call(src, [cmds.copy_d2h(handle, off, size)], source=True, d2h=[view])
                await _call(dst, [cmds.copy_h2d(handle, off, size)], source=False, h2d=[view])
            finally:
                spare.append(buf)

    await _all([one(*c) for c in chunks])


async def _all(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coros`` together; the first to fail cancels the rest and its
    exception is raised (not an ExceptionGroup: the callers tell SourceLost
    from Abort)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _window(session: Session) -> int:
    return max(1, int(getattr(session.info, "max_inflight", 0) or 1))


# -- 5. switch --------------------------------------------------------------------
def _switch(
    device: MigratingDevice,
    movers: dict[int, Context],
    opened: dict[int, Session],
    target: AgentTarget,
    info: bytes,
) -> int:
    """Every moved context on its target session, the binding on the target;
    returns how many contexts moved."""
    moved = 0
    for ctx_id, session in opened.items():
        ctx = movers[ctx_id]
        if device.contexts.get(ctx_id) is not ctx or not ctx.has_session:
            device.background(session.close())
            continue
        old = ctx.moved(session)
        if old is not None:
            device.background(old.close())
        moved += 1
    for ctx in device.contexts.values():
        if ctx.lost:  # lost before: starts afresh on the target, like a rebind
            ctx.detached()
    device.binding.move(target)
    device.bound_info = info
    return moved


def _close_all(device: MigratingDevice, sessions: Any) -> None:
    for s in list(sessions):
        device.background(s.close())
