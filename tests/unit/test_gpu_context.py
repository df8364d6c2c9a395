"""A context's session states: only the transitions move them, and a
transition from the wrong state is refused loudly (context.py)."""

from __future__ import annotations

import pytest

from vpcie.gpu.context import Context, ContextState, ContextStateError


class _Session:
    closed = False


def test_session_lifecycle() -> None:
    ctx = Context(3, "python3.11")
    assert ctx.state is ContextState.DETACHED and not ctx.has_session
    s = _Session()
    ctx.opened(s)  # type: ignore[arg-type]
    assert ctx.state is ContextState.OPEN and ctx.session is s and ctx.sessions == 1
    ctx.lent()
    assert ctx.has_session and ctx.describe()["lent"]
    ctx.returned()
    assert ctx.mark_lost("agent 10.0.0.1:7000: reset") is s
    assert ctx.lost and ctx.session is None
    assert ctx.mark_lost("later reason") is None  # the first reason stays
    assert ctx.describe()["lost_reason"] == "agent 10.0.0.1:7000: reset"
    assert ctx.detached() is None  # rebind: a new binding, no session yet
    assert ctx.state is ContextState.DETACHED and not ctx.describe()["lost"]
    ctx.opened(_Session())  # type: ignore[arg-type]
    assert ctx.describe()["handle_epoch"] == 1  # the second session's epoch
    ctx.destroyed()
    assert ctx.state is ContextState.DESTROYED and ctx.session is None


def test_moved_keeps_the_handle_epoch() -> None:
    """A live migration gives an OPEN context a new session with the same
    handles: the epoch counter does not move, the old session comes back."""
    ctx = Context(4, "m")
    first, second = _Session(), _Session()
    ctx.opened(first)  # type: ignore[arg-type]
    assert ctx.moved(second) is first  # type: ignore[arg-type]
    assert ctx.session is second and ctx.state is ContextState.OPEN
    assert ctx.sessions == 1 and ctx.describe()["handle_epoch"] == 0
    ctx.lent()
    with pytest.raises(ContextStateError):
        ctx.moved(first)  # type: ignore[arg-type]  # the lane must give it back first


def test_lost_needs_a_session_of_this_binding() -> None:
    ctx = Context(1, "x")
    assert ctx.mark_lost("cannot open agent session") is None  # retried by the next batch
    assert ctx.state is ContextState.DETACHED


@pytest.mark.parametrize(
    ("setup", "bad"),
    [
        ([], "lent"),  # nothing to lend
        ([], "returned"),
        (["opened"], "opened"),  # a second session over the first
        (["opened"], "returned"),  # not lent
        (["opened", "lent"], "mark_lost"),  # the lane must give it back first
        (["opened", "destroyed"], "detached"),
    ],
)
def test_wrong_state_raises(setup: list[str], bad: str) -> None:
    ctx = Context(2, "y")
    for step in setup:
        getattr(ctx, step)(*([_Session()] if step == "opened" else []))
    before = ctx.state
    args: list[object] = (
        [_Session()] if bad == "opened" else (["why"] if bad == "mark_lost" else [])
    )
    with pytest.raises(ContextStateError, match="context 2: cannot go from"):
        getattr(ctx, bad)(*args)
    assert ctx.state is before
