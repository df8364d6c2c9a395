"""The values the KV interface (``vpcie.pool.kv``) speaks in, apart from it
so that the stores import these without importing the module that opens them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NewType

LeaseId = NewType("LeaseId", int)


@dataclass(frozen=True, slots=True)
class Item:
    key: str
    value: bytes
    version: int
    mod_revision: int
    create_revision: int


@dataclass(frozen=True, slots=True)
class Compare:
    """Holds when ``key``'s version is ``version`` (0: the key is absent)."""

    key: str
    version: int


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int  # the store's revision after the transaction (its own if it wrote)


# etcd's default --max-txn-ops is 128: bulk writes are cut into transactions of
# at most this many operations (compares included).
MAX_TXN_OPS = 100


def prefix_end(prefix: str) -> str:
    """The first key after every key that starts with ``prefix``."""
    if not prefix:
        return "\U0010ffff"
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)
