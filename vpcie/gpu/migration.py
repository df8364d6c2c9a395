"""Live migration: a bound vGPU's contexts move to another agent with their
device state, while the guest keeps submitting (GpuDevice.migrate).

1. open    one session on the target per context with a live session, with
           that context's handle epoch and the target's lease token; a
           failure changes nothing.
2. precopy the guest keeps running (its batches go the Python way: the lane
           gives every session back and lends none until the end). Per
           context: STATE_EXPORT on the source, MODULE_LOAD_AT and ALLOC_AT
           on the target, every buffer's contents COPY_D2H source ->
           COPY_H2D target: ordinary batches on the same sessions as the
           guest's (stream 0). Another round recopies the buffers whose
           write generation moved meanwhile, while that set at least halves
           (at most ``PRECOPY_ROUNDS`` rounds; bounded by ``drain_timeout``).
3. hold    new batches queue in the backend (the guest still gets its virtio
           answers).
4. drain   wait until the source sessions have nothing in flight (bounded:
           over ``drain_timeout`` -> abort, work resumes on the source).
5. final   per context: STATE_EXPORT again; only what changed since its copy
           moves: buffers whose gen differs from the one recorded at the
           export their copy followed, buffers new since (ALLOC_AT), freed
           ones (MEM_FREE on the target), resized ones (free + ALLOC_AT),
           modules new or gone since; then SESSION_RESTORE.
6. switch  each context takes its new session (same handles), the binding
           names the target, the source sessions close, the hold ends: the
           queued batches go to the target in order.

Why the final round may skip a buffer (the gens, docs/PROTOCOL.md "Session
state"): the agent adds 1 to a buffer's gen when a command that may write it
has run (its write done, or queued on the device), and STATE_EXPORT reads
the gens first, then waits for all the session's device work, then answers.
Take a buffer copied after export E, where it had gen g, and showing g again
at the final export F. A write counted in g was done or queued before E's
wait, so it was complete before the copy read the buffer. A write not
counted in g, whether it was running during E on another stream or came
later, adds to the gen when it has run, which is before F (F comes after
the hold and the drain, when nothing runs): F would not show g. So no write
but those in g touched the buffer, and the copy holds the bytes it has at F.
A buffer whose gen moved, or that is new, is copied under the hold, when
nothing runs. (Gens start at the allocation's serial << 32, so a handle
freed and made again never repeats a gen; a buffer the guest freed between
an export and its copy is marked unknown and settled by the next round.)

A source that fails (its agent died, a session was lost) means its state is
gone: the contexts end with DEVICE_LOST as on any loss, and the vGPU is
bound to the target empty (``state_lost``). A target that fails aborts: the
target sessions close and the work resumes on the source, unchanged. A
workload that rewrites all its memory all the time leaves everything dirty:
the pre-copy stops after a round that did not halve the dirty set and the
hold copies it all (the stop-and-copy stun).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, NoReturn, Protocol

from vpcie.errors import ErrorCode, VgpuError
from vpcie.gpu.binding import AgentTarget, Binding, Session, info_bytes
from vpcie.gpu.context import Context
from vpcie.gpu.forwarding import Forwarding
from vpcie.gpu.lanes import Lanes
from vpcie.gpu.migration_calls import (
    Abort,
    SourceLost,
    call,
    copy_pieces,
    side_by_side,
)
from vpcie.gpu.migration_plan import (
    Copied,
    MigrationReport,
    SessionState,
    copy_chunks,
    plan_round,
    restore_record,
    target_batches,
)
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import Opcode

log = logging.getLogger("vpcie.gpu.device")

DRAIN_TIMEOUT_S = 30.0  # vpcie-backend --migrate-drain-timeout
# While the guest runs, its completions come from the source behind the
# copies' data on the same connection: fewer, smaller pieces in flight keep
# that queue short (about 4 MiB), for a somewhat slower pre-copy.
PRECOPY_DEPTH = 4
PRECOPY_CHUNK = 1 << 20
OPEN_TIMEOUT_S = 10.0  # opening the target sessions (as a bind's probe)
DRAIN_POLL_S = 0.0005
PRECOPY_ROUNDS = 3  # most rounds copied while the guest runs
# A round that copied at most this much leaves too little for another.
PRECOPY_SMALL = 4 << 20


class MigratingDevice(Protocol):
    """What the engine needs of GpuDevice."""

    binding: Binding
    contexts: dict[int, Context]
    forwarding: Forwarding
    lanes: Lanes
    bound_info: bytes

    def background(self, coro: Any) -> None: ...


async def migrate(
    device: MigratingDevice,
    target: AgentTarget,
    drain_timeout: float = DRAIN_TIMEOUT_S,
    precopy_rounds: int | None = None,  # None: PRECOPY_ROUNDS
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

    moves: dict[int, _Move] = {}
    rounds, precopy_bytes, lost_why = 0, 0, ""
    t_pre = time.monotonic()
    _pause_lanes(device)
    try:
        rounds, precopy_bytes = await asyncio.wait_for(
            _precopy(device, movers, opened, moves, precopy_rounds or PRECOPY_ROUNDS),
            drain_timeout,
        )
    except TimeoutError:
        # A guest batch ahead of the copies on stream 0 that does not end
        # (a wait on an event never recorded) would hold the pre-copy.
        why = f"the pre-copy did not finish in {drain_timeout:g} s (--migrate-drain-timeout)"
        _abort(device, target, opened, Abort(why, ErrorCode.TIMEOUT))
    except SourceLost as exc:
        lost_why = str(exc)
    except BaseException as exc:
        _abort(device, target, opened, exc)
    precopy_ms = (time.monotonic() - t_pre) * 1e3

    t_hold = time.monotonic()
    _hold(device)
    state_bytes, stun_bytes, copy_ms = 0, 0, 0.0
    if not lost_why:
        try:
            await _drain(device, movers, t_hold + drain_timeout, drain_timeout)
            # A context whose first session opened meanwhile moves too.
            late = [c for c in device.contexts.values() if c.has_session and c.ctx_id not in movers]
            if late:
                opened.update(await _open_targets(device, target, late))
                movers.update({c.ctx_id: c for c in late})
            t_copy = time.monotonic()
            live = [c for c in movers.values() if device.contexts.get(c.ctx_id) is c]
            # Contexts move side by side: each has its own pair of sessions.
            done = await side_by_side(
                [_final(c, opened[c.ctx_id], moves.get(c.ctx_id)) for c in live]
            )
            state_bytes = sum(total for total, _stun in done)
            stun_bytes = sum(stun for _total, stun in done)
            copy_ms = (time.monotonic() - t_copy) * 1e3
        except SourceLost as exc:
            lost_why = str(exc)
        except BaseException as exc:
            _abort(device, target, opened, exc)
    if lost_why:
        # The state is gone with the source: the vGPU goes to the target
        # empty, exactly a rebind (every context's work ends DEVICE_LOST).
        _close_all(device, opened.values())
        binding.bind(target)
        device.bound_info = info
        _release(device)
        stun = (time.monotonic() - t_hold) * 1e3
        log.warning("migration to %s: source lost (%s), bound empty", target.describe(), lost_why)
        return MigrationReport(
            source.describe(), target.describe(), 0, 0, stun, 0.0, True,
            precopy_bytes, 0, rounds, precopy_ms,
        )  # fmt: skip
    moved = _switch(device, movers, opened, target, info)
    _release(device)
    stun = (time.monotonic() - t_hold) * 1e3
    report = MigrationReport(
        source.describe(), target.describe(), moved, state_bytes, stun, copy_ms, was_lost,
        precopy_bytes, stun_bytes, rounds, precopy_ms,
    )  # fmt: skip
    log.info(
        "migrated %s -> %s: %d contexts, %d bytes (%d copied before the hold in %d rounds, "
        "%.1f ms), stun %.1f ms (%d bytes copied in %.1f ms)",
        report.source, report.target, moved, state_bytes, precopy_bytes, rounds, precopy_ms,
        stun, stun_bytes, copy_ms,
    )  # fmt: skip
    return report


def _abort(
    device: MigratingDevice, target: AgentTarget, opened: dict[int, Session], exc: BaseException
) -> NoReturn:
    """Back to the source as it was: the target sessions close, the hold
    (if any) ends; an Abort becomes the one-line VgpuError."""
    _close_all(device, opened.values())
    _release(device)
    if isinstance(exc, Abort):
        log.warning("migration to %s aborted: %s", target.describe(), exc)
        raise VgpuError(exc.code, f"migration aborted, still on the source: {exc}") from None
    raise exc


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


# -- 2. pre-copy ---------------------------------------------------------------------
class _Move:
    """One context's pre-copy: the source session it read and what the
    target holds of it."""

    def __init__(self, src: Session) -> None:
        self.src = src
        self.copied = Copied()


def _pause_lanes(device: MigratingDevice) -> None:
    """The lane gives every session back and lends none until the end: the
    migration's batches go on the same sessions as the guest's."""
    device.lanes.paused = True
    device.lanes.take_back_all()  # their batches in flight become ctx.inflight


async def _precopy(
    device: MigratingDevice,
    movers: dict[int, Context],
    opened: dict[int, Session],
    moves: dict[int, _Move],
    max_rounds: int,
) -> tuple[int, int]:
    """Rounds of copies while the guest runs; (rounds, bytes copied)."""
    rounds = copied = 0
    last = -1
    while rounds < max_rounds:
        live = [c for c in movers.values() if device.contexts.get(c.ctx_id) is c]
        if not live:
            break
        moved = sum(await side_by_side([_round(device, c, opened[c.ctx_id], moves) for c in live]))
        rounds += 1
        copied += moved
        # Another round only while the dirty set at least halves each round
        # and is worth it: a workload rewriting most of its memory as fast
        # as it is copied gains nothing from more rounds.
        if moved <= PRECOPY_SMALL or (last >= 0 and 2 * moved > last):
            break
        last = moved
    return rounds, copied


async def _round(
    device: MigratingDevice, ctx: Context, dst: Session, moves: dict[int, _Move]
) -> int:
    """One pre-copy round of ``ctx``; the bytes it copied. A context
    destroyed meanwhile (its session closed by the guest) is left out."""
    src = ctx.session
    if src is None or ctx.lost:
        raise SourceLost(ctx.lost_reason or "the source session was lost")
    move = moves.get(ctx.ctx_id)
    if move is None:
        move = moves[ctx.ctx_id] = _Move(src)
    elif move.src is not src:
        raise Abort(f"context {ctx.ctx_id} got a new session during the migration")
    try:
        _state, moved = await _bring(src, dst, move.copied, running=True)
    except (SourceLost, Abort):
        if device.contexts.get(ctx.ctx_id) is not ctx:
            moves.pop(ctx.ctx_id, None)
            return 0
        raise
    return moved


async def _bring(
    src: Session, dst: Session, copied: Copied, *, running: bool
) -> tuple[SessionState, int]:
    """Export the source, make the target match it as ``copied`` says it is
    (frees, modules, allocations, contents) and record that in ``copied``;
    the state and the bytes copied.
    ``running``: the guest runs meanwhile, so a buffer may go between the
    export and its copy; it is marked unknown (the next round frees it on
    the target, or copies it if it is there again)."""
    comp = await call(src, [rec(Opcode.STATE_EXPORT)], source=True)
    try:
        state = SessionState.parse(comp.blob)
    except ValueError as exc:
        raise Abort(f"source agent: {exc}") from None
    plan = plan_round(state, copied)
    codes: dict[int, bytes] = {}
    for m in plan.module_load:
        done = await call(src, [rec(Opcode.MODULE_EXPORT, m.handle)], source=True)
        codes[m.handle] = bytes(done.blob)
    for batch in target_batches(plan, codes):
        await call(dst, batch, source=False)
    gone: set[int] | None = set() if running else None
    if running:
        await copy_pieces(src, dst, copy_chunks(plan.copy, PRECOPY_CHUNK), gone, PRECOPY_DEPTH)
    else:
        await copy_pieces(src, dst, copy_chunks(plan.copy))
    copied.update(state)
    for h in gone or ():
        copied.forget(h)
    sizes = dict(state.buffers)
    return state, plan.copy_bytes - sum(sizes[h] for h in gone or ())


# -- 3. hold, 4. drain ------------------------------------------------------------
def _hold(device: MigratingDevice) -> None:
    fwd = device.forwarding
    fwd.holding = True
    fwd.released.clear()
    _pause_lanes(device)


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


async def _final(ctx: Context, dst: Session, move: _Move | None) -> tuple[int, int]:
    """Under the hold: what changed since the pre-copy moves, then
    SESSION_RESTORE; (the state's bytes, the bytes copied now)."""
    src = ctx.session
    if src is None or ctx.lost:
        raise SourceLost(ctx.lost_reason or "the source session was lost")
    if move is not None and move.src is not src:
        raise Abort(f"context {ctx.ctx_id} got a new session during the migration")
    copied = move.copied if move is not None else Copied()  # none yet: all of it
    state, moved = await _bring(src, dst, copied, running=False)
    await call(dst, [restore_record(state)], source=False)
    modules = sum(m.code_size for m in state.modules)
    return state.buffer_bytes + modules, moved


# -- 6. switch --------------------------------------------------------------------
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
