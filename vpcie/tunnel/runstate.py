"""Runstate of a tunnel connection (STYLE.md habit 9: runstates, not flags).

::

    CONNECTING --HELLO/AUTH/OPEN ok--> READY --close()--> CLOSING --> CLOSED
        |                              |  ^                  |
        |                      lend()  v  | take_back()      |
        |                             LENT                   |
        |                               |                    |
        +--------- failure -------------+----> LOST <--------+

LENT: the socket is with the vGPU lane (vpcie/gpu/lanes.py), which reads and
writes it itself; the client neither sends, reads nor pings until
take_back(). LOST is terminal like CLOSED, but says the agent or the network
failed (docs/PROTOCOL.md "Liveness"): every in-flight command completed with
DEVICE_LOST and every later call fails with DEVICE_LOST at once.
"""

from __future__ import annotations

from enum import Enum

from vpcie.errors import VpcieError


class Runstate(Enum):
    CONNECTING = "connecting"
    READY = "ready"
    LENT = "lent"
    CLOSING = "closing"
    CLOSED = "closed"
    LOST = "lost"


# Allowed transitions; anything else is our bug.
TRANSITIONS: dict[Runstate, frozenset[Runstate]] = {
    Runstate.CONNECTING: frozenset({Runstate.READY, Runstate.LOST, Runstate.CLOSED}),
    Runstate.READY: frozenset({Runstate.LENT, Runstate.CLOSING, Runstate.LOST}),
    Runstate.LENT: frozenset({Runstate.READY, Runstate.LOST, Runstate.CLOSED}),
    Runstate.CLOSING: frozenset({Runstate.CLOSED, Runstate.LOST}),
    Runstate.CLOSED: frozenset(),
    Runstate.LOST: frozenset(),
}


_HINTS = {
    Runstate.CONNECTING: " (call connect() first)",
    Runstate.LENT: ": its socket is lent to the vGPU lane (take_back() first)",
}


class RunstateError(VpcieError, RuntimeError):
    """A tunnel method was called in a state that does not allow it (a
    RuntimeError too: calling it then is the caller's bug, not the peer's)."""

    def __init__(self, what: str, state: Runstate, allowed: Runstate = Runstate.READY) -> None:
        self.state = state
        hint = _HINTS.get(state, "")
        if allowed is Runstate.LENT and state is not Runstate.LENT:
            hint = ": it was not lent"
        super().__init__(f"{what} needs a {allowed.name} tunnel, but it is {state.name}{hint}")
