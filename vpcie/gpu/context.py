"""A virtio-gpu 3D context: its agent session's state, its batches in flight.

A context (CTX_CREATE .. CTX_DESTROY) owns at most one agent session per
binding generation. Where that session stands is an explicit state, changed
only by the transitions below; a transition from the wrong state is our bug
and raises ``ContextStateError``:

    DETACHED --opened--> OPEN --lent--> LENT --returned--> OPEN
    OPEN --moved--> OPEN                 (live migration: a new session, same handles)
    OPEN --lost--> LOST                  (batches fail DEVICE_LOST until rebind)
    any but DESTROYED --detached--> DETACHED      (unbind, rebind)
    any --destroyed--> DESTROYED                  (CTX_DESTROY, device reset)

A rebind always passes through ``detached`` (GpuDevice drops every session
when the binding changes), so OPEN and LOST always mean "in the binding
generation now current".
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vpcie.errors import GuestError
from vpcie.gpu.binding import Session
from vpcie.gpu.fencepage import FencePage
from vpcie.gpu.submit import Prepared
from vpcie.memory import GuestMemory


class ContextError(GuestError):
    """Unknown context id (ERR_INVALID_CONTEXT_ID)."""


class ContextStateError(RuntimeError):
    """A context transition asked for in a state it does not start from (a
    bug in the device model, never the guest's doing)."""


class ContextState(enum.Enum):
    DETACHED = "detached"  # no agent session in this binding (yet, or any more)
    OPEN = "open"  # a session of the current binding, served by Python
    LENT = "lent"  # that session, lent to the lane (lanes.py)
    LOST = "lost"  # the session of the current binding was lost
    DESTROYED = "destroyed"  # CTX_DESTROY or device reset


_LIVE = tuple(s for s in ContextState if s is not ContextState.DESTROYED)


@dataclass(eq=False)  # identity: a batch is itself, whatever its fields
class Pending:
    prepared: Prepared
    ctx: Context
    done: bool = False
    mem: GuestMemory | None = None  # the table its views point into, held until done
    nbytes: int = 0  # its share of the device's in-flight batch bytes


@dataclass(eq=False)
class Deferred:
    """The SIGNALs of a batch ended here, published once the batches that
    were in flight when it ended have finished (a SIGNAL never overtakes
    earlier work, GUEST_ABI.md)."""

    publish: Callable[[], None]
    waiting: set[Pending]
    pending: Pending | None = None  # a refused batch whose reply views wait with it


@dataclass(eq=False)
class Context:
    ctx_id: int
    name: str
    resources: set[int] = field(default_factory=set)
    # The fence page (FENCE_PAGE_SET): where completions are published.
    fence: FencePage | None = None
    fence_gpa: int = 0
    fence_rid: int = 0
    # The agent session; change ``state`` and ``session`` only by the transitions.
    state: ContextState = ContextState.DETACHED
    session: Session | None = None
    lost_reason: str = ""
    # Sessions this context has had: the handle epoch of its next one, so a
    # handle kept across a rebind is refused as STALE_HANDLE (codes.py).
    sessions: int = 0
    # Forwarding (forwarding.py): batches queued for the session, and sent.
    queue: asyncio.Queue[Pending] | None = None
    forwarder: asyncio.Task[None] | None = None
    inflight: list[Pending] = field(default_factory=list)
    window_open: asyncio.Event = field(default_factory=asyncio.Event)
    forwarding: bool = False  # the forwarder holds a batch (waiting for session/window)
    deferred: list[Deferred] = field(default_factory=list)

    # -- questions ------------------------------------------------------------------
    @property
    def has_session(self) -> bool:
        """A session of the current binding, whoever serves it now."""
        return self.state is ContextState.OPEN or self.state is ContextState.LENT

    @property
    def lost(self) -> bool:
        return self.state is ContextState.LOST

    def idle(self) -> bool:
        """Nothing of this context in flight, queued or being forwarded: its
        session may change hands (lanes.py lends only then)."""
        return (
            not self.inflight and not self.forwarding and (self.queue is None or self.queue.empty())
        )

    def busy_rids(self) -> set[int]:
        """The resources this context's unfinished batches read or write."""
        busy: set[int] = set()
        for p in self.inflight:
            busy |= p.prepared.rids
        for d in self.deferred:
            if d.pending is not None:
                busy |= d.pending.prepared.rids
        return busy

    # -- transitions ----------------------------------------------------------------
    def _move(self, to: ContextState, allowed: tuple[ContextState, ...]) -> None:
        if self.state not in allowed:
            raise ContextStateError(
                f"context {self.ctx_id}: cannot go from {self.state.value} to {to.value}"
            )
        self.state = to

    def opened(self, session: Session) -> None:
        """A session of the current binding (its handles carry epoch ``sessions``)."""
        self._move(ContextState.OPEN, (ContextState.DETACHED,))
        self.session = session
        self.sessions += 1

    def moved(self, session: Session) -> Session | None:
        """A live migration moved this context's state to ``session`` (same
        handle epoch, new binding generation). Returns the old one to close."""
        self._move(ContextState.OPEN, (ContextState.OPEN,))
        old, self.session = self.session, session
        return old

    def lent(self) -> None:
        self._move(ContextState.LENT, (ContextState.OPEN,))

    def returned(self) -> None:
        self._move(ContextState.OPEN, (ContextState.LENT,))

    def mark_lost(self, reason: str) -> Session | None:
        """The session of the current binding is gone; the first reason is the
        one to show. Returns the session to close. Lost again, no session
        opened in this binding yet (a failed open is retried by the next
        batch), or destroyed: nothing changes."""
        if self.state in (ContextState.LOST, ContextState.DETACHED, ContextState.DESTROYED):
            return None
        self._move(ContextState.LOST, (ContextState.OPEN,))
        self.lost_reason = reason
        session, self.session = self.session, None
        return session

    def detached(self) -> Session | None:
        """The binding changed: no session now. Returns the one to close."""
        self._move(ContextState.DETACHED, _LIVE)
        self.lost_reason = ""
        session, self.session = self.session, None
        return session

    def destroyed(self) -> Session | None:
        """CTX_DESTROY or reset. Returns the session to close."""
        self.state = ContextState.DESTROYED
        session, self.session = self.session, None
        return session

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.ctx_id,
            "name": self.name,
            "resources": len(self.resources),
            "inflight": len(self.inflight),
            "session": self.has_session,
            "lent": self.state is ContextState.LENT,
            "lost": self.lost,
            "lost_reason": self.lost_reason if self.lost else "",
            "handle_epoch": self.sessions - 1 if self.sessions else None,
        }
