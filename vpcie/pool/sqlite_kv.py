"""The KV interface on one SQLite file: the single-host store (the default).

WAL, so readers never wait for the writer; every write transaction starts
with ``BEGIN IMMEDIATE``, taking the write lock up front, so two processes
never both read-then-write on a stale view (a deferred transaction would
fail on upgrade instead of waiting). The global revision is a row bumped in
the same transaction as the writes it counts.

TTL leases are rows with an ``expires_at`` (wall clock, shared by every
process on the host); a key that belongs to an expired lease is invisible at
once and deleted by the next write transaction. ``synchronous=FULL``: a lease
that was answered survives a power cut, so fencing tokens never go back.

There is no index on mod_revision: it cost more than a third of every
write (each put moves its row's index entry), and only the pool's
catch-up after a failed compare reads by revision (a scan; rare).

sqlite3 blocks, so every call runs on one thread of this store's own (the
connection lives there); the event loop never waits on the file lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from vpcie.pool.errors import PoolError, StoreUnavailable
from vpcie.pool.kv_types import Compare, Item, LeaseId, TxnResult, prefix_end

T = TypeVar("T")

DEFAULT_PATH = "/var/lib/vpcie/pool.db"
BUSY_TIMEOUT_MS = 10_000  # how long a writer waits for another process's transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL, create_revision INTEGER NOT NULL,
    lease INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS ttl (
    id INTEGER PRIMARY KEY AUTOINCREMENT, seconds REAL NOT NULL, expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ttl_expiry ON ttl (expires_at);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 0);
"""

_LIVE = "(lease = 0 OR lease IN (SELECT id FROM ttl WHERE expires_at > ?))"
_COLS = "key, value, version, mod_revision, create_revision"


class SqliteKV:
    def __init__(self, path: str = DEFAULT_PATH) -> None:
        self.path = path
        self._ex = ThreadPoolExecutor(1, thread_name_prefix="pool-sqlite")
        self._db: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"SqliteKV({self.path!r})"

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._ex, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._conn())
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"pool database {self.path}: {e}") from None
        except sqlite3.DatabaseError as e:
            raise StoreUnavailable(f"pool database {self.path} is unusable: {e}") from None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreUnavailable(f"pool database {self.path}: {e.strerror}") from None
            db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
            self._db = db
        return self._db

    # reads -------------------------------------------------------------

    async def get(self, key: str) -> Item | None:
        def op(db: sqlite3.Connection) -> Item | None:
            row = db.execute(
                f"SELECT {_COLS} FROM kv WHERE key = ? AND {_LIVE}", (key, time.time())
            ).fetchone()
            return Item(*row) if row else None

        return await self._run(op)

    async def range(self, prefix: str, min_mod_revision: int = 0) -> list[Item]:
        def op(db: sqlite3.Connection) -> list[Item]:
            rows = db.execute(
                f"SELECT {_COLS} FROM kv WHERE key >= ? AND key < ? AND mod_revision >= ?"
                f" AND {_LIVE} ORDER BY key",
                (prefix, prefix_end(prefix), min_mod_revision, time.time()),
            ).fetchall()
            return [Item(*r) for r in rows]

        return await self._run(op)

    # writes ------------------------------------------------------------

    async def txn(
        self,
        compares: list[Compare],
        puts: list[tuple[str, bytes]],
        deletes: list[str],
        ttl_puts: list[tuple[str, bytes, LeaseId]] = [],  # noqa: B006
    ) -> TxnResult:
        def op(db: sqlite3.Connection) -> TxnResult:
            with _Write(db) as now:
                rev = _revision(db)
                if compares:  # one statement for all of them: a reserve has five
                    keys = [c.key for c in compares]
                    marks = ",".join("?" * len(keys))
                    got = dict(
                        db.execute(f"SELECT key, version FROM kv WHERE key IN ({marks})", keys)
                    )
                    if any(got.get(c.key, 0) != c.version for c in compares):
                        return TxnResult(False, rev)
                if not (puts or deletes or ttl_puts):
                    return TxnResult(True, rev)
                rev += 1
                for lease_id in {lid for _, _, lid in ttl_puts}:
                    live = db.execute(
                        "SELECT 1 FROM ttl WHERE id = ? AND expires_at > ?", (lease_id, now)
                    ).fetchone()
                    if not live:
                        raise PoolError(f"TTL lease {lease_id} has expired or was revoked")
                rows = [(k, v, rev, 0) for k, v in puts]
                rows += [(k, v, rev, lid) for k, v, lid in ttl_puts]
                db.executemany(
                    "INSERT INTO kv VALUES (?1, ?2, 1, ?3, ?3, ?4) ON CONFLICT (key) DO UPDATE"
                    " SET value = ?2, version = version + 1, mod_revision = ?3, lease = ?4",
                    rows,
                )
                db.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in deletes])
                db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (rev,))
                return TxnResult(True, rev)

        return await self._run(op)

    async def grant_ttl(self, seconds: float) -> LeaseId:
        if seconds <= 0:
            raise PoolError(f"a TTL must be positive, not {seconds}")

        def op(db: sqlite3.Connection) -> LeaseId:
            with _Write(db) as now:
                cur = db.execute(
                    "INSERT INTO ttl (seconds, expires_at) VALUES (?, ?)", (seconds, now + seconds)
                )
                return LeaseId(int(cur.lastrowid or 0))

        return await self._run(op)

    async def keepalive(self, lease: LeaseId) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            now = time.time()
            cur = db.execute(
                "UPDATE ttl SET expires_at = ? + seconds WHERE id = ? AND expires_at > ?",
                (now, lease, now),
            )
            return cur.rowcount == 1

        return await self._run(op)

    async def revoke(self, lease: LeaseId) -> None:
        def op(db: sqlite3.Connection) -> None:
            with _Write(db):
                gone = db.execute("DELETE FROM kv WHERE lease = ?", (lease,)).rowcount
                db.execute("DELETE FROM ttl WHERE id = ?", (lease,))
                if gone:
                    db.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")

        await self._run(op)

    async def close(self) -> None:
        def op() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._ex, op)
        self._ex.shutdown(wait=True)


def _revision(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])


class _Write:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception), after
    deleting the keys of expired TTL leases; yields the transaction's clock."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> float:
        self.db.execute("BEGIN IMMEDIATE")
        now = time.time()
        expired = self.db.execute("SELECT 1 FROM ttl WHERE expires_at <= ? LIMIT 1", (now,))
        if expired.fetchone():
            self.db.execute(
                "DELETE FROM kv WHERE lease IN (SELECT id FROM ttl WHERE expires_at <= ?)", (now,)
            )
            self.db.execute("DELETE FROM ttl WHERE expires_at <= ?", (now,))
        return now

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
