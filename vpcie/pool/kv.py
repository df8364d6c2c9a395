"""The small transactional key-value interface the pool is written against.

The pool is written once over ``KV``; ``sqlite_kv`` and ``etcd_kv`` implement
only this. The shape is etcd's: every key has a ``version`` (writes since it
was created, 0 = absent), a ``mod_revision`` and a ``create_revision``; a
global revision counts every successful write transaction, and a transaction
is "if every compare holds, apply every put and delete". Fencing tokens are
these revisions, so they only ever grow.

TTL keys (``ttl_puts``) belong to a TTL lease: they vanish when it expires
unless ``keepalive`` renews it, like etcd leases. (Not to be confused with a
pool *lease*, a vGPU's claim on a GPU: that is an ordinary key.)
"""

from __future__ import annotations

from typing import Protocol

from vpcie.pool.kv_types import MAX_TXN_OPS, Compare, Item, LeaseId, TxnResult, prefix_end

__all__ = ["KV", "MAX_TXN_OPS", "Compare", "Item", "LeaseId", "TxnResult", "open_kv", "prefix_end"]


class KV(Protocol):
    async def get(self, key: str) -> Item | None: ...

    async def range(self, prefix: str, min_mod_revision: int = 0) -> list[Item]:
        """Every live key under ``prefix``, in key order; with ``min_mod_revision``
        only those written at or after that revision (deletions are not seen)."""
        ...

    async def txn(
        self,
        compares: list[Compare],
        puts: list[tuple[str, bytes]],
        deletes: list[str],
        ttl_puts: list[tuple[str, bytes, LeaseId]] = [],  # noqa: B006 (never mutated)
    ) -> TxnResult: ...

    async def grant_ttl(self, seconds: float) -> LeaseId: ...

    async def keepalive(self, lease: LeaseId) -> bool:
        """Renew a TTL lease; False if it has already expired (or was revoked)."""
        ...

    async def revoke(self, lease: LeaseId) -> None: ...

    async def close(self) -> None: ...


def open_kv(url: str) -> KV:
    """``sqlite:///abs/path``, a bare path, or ``etcd://host:port[,host:port][/prefix]``.

    Opening never blocks: stores connect on first use. A malformed URL raises
    ``PoolError`` with one line."""
    from vpcie.pool.errors import PoolError

    if url.startswith("etcd://"):
        from vpcie.pool.etcd_kv import EtcdKV

        return EtcdKV.from_url(url)
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
        if not path.startswith("/"):
            raise PoolError(f"pool URL {url!r}: sqlite:// needs an absolute path (sqlite:///abs)")
    elif "://" in url:
        raise PoolError(f"pool URL {url!r}: use sqlite:///PATH, a path, or etcd://HOST:PORT")
    else:
        path = url
    if not path:
        raise PoolError("pool URL is empty: use sqlite:///PATH, a path, or etcd://HOST:PORT")
    from vpcie.pool.sqlite_kv import SqliteKV

    return SqliteKV(path)
