"""What the pool raises: one line each, for an operator to read."""

from __future__ import annotations

from vpcie.errors import VpcieError


class PoolError(VpcieError):
    """A pool operation failed; ``str(err)`` is one line saying why."""


class NoCapacity(PoolError):
    """Nothing in the pool fits the request (the message says what was asked
    and why each device was passed over)."""


class NotFound(PoolError):
    """No such agent, GPU, vGPU or lease."""


class Conflict(PoolError):
    """The pool changed under us more often than we retry, or the request
    contradicts what is there (an agent that still holds leases...)."""


class StoreUnavailable(PoolError):
    """The store (the SQLite file, the etcd cluster) cannot be reached."""
