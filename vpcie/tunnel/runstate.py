"""Runstate of a tunnel connection (STYLE.md habit 9: runstates, not flags).

::

    CONNECTING --HELLO/AUTH/OPEN ok--> READY --close()--> CLOSING --> CLOSED
        |                                |                   |
        +--------- failure --------------+---> LOST <--------+

LOST is terminal like CLOSED, but says the agent or the network failed
(docs/PROTOCOL.md "Liveness"): every in-flight command completed with
DEVICE_LOST and every later call fails with DEVICE_LOST at once.
"""

from __future__ import annotations

from enum import Enum

from vpcie.errors import VpcieError


class Runstate(Enum):
    CONNECTING = "connecting"
    READY = "ready"
    CLOSING = "closing"
    CLOSED = "closed"
    LOST = "lost"


# Allowed transitions; anything else is our bug.
TRANSITIONS: dict[Runstate, frozenset[Runstate]] = {
    Runstate.CONNECTING: frozenset({Runstate.READY, Runstate.LOST, Runstate.CLOSED}),
    Runstate.READY: frozenset({Runstate.CLOSING, Runstate.LOST}),
    Runstate.CLOSING: frozenset({Runstate.CLOSED, Runstate.LOST}),
    Runstate.CLOSED: frozenset(),
    Runstate.LOST: frozenset(),
}


class RunstateError(VpcieError):
    """A tunnel method was called in a state that does not allow it."""

    def __init__(self, what: str, state: Runstate, allowed: Runstate = Runstate.READY) -> None:
        self.state = state
        super().__init__(
            f"{what} needs a {allowed.name} tunnel, but it is {state.name}"
            + (" (call connect() first)" if state is Runstate.CONNECTING else "")
        )
