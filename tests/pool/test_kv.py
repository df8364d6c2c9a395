"""The KV contract, on both stores (``pool_url``: SQLite and a real etcd)."""

from __future__ import annotations

import asyncio
import time

import pytest

from vpcie.pool.errors import PoolError
from vpcie.pool.kv import KV, Compare, open_kv


@pytest.fixture
async def kv(pool_url: str):  # type: ignore[no-untyped-def]
    store = open_kv(pool_url)
    yield store
    await store.close()


async def test_create_if_absent_has_one_winner(kv: KV) -> None:
    first = await kv.txn([Compare("/k", 0)], [("/k", b"one")], [])
    second = await kv.txn([Compare("/k", 0)], [("/k", b"two")], [])
    assert first.succeeded and not second.succeeded
    item = await kv.get("/k")
    assert item is not None and item.value == b"one"
    assert (item.version, item.create_revision, item.mod_revision) == (
        1,
        first.revision,
        first.revision,
    )


async def test_version_compare_and_revisions(kv: KV) -> None:
    r1 = await kv.txn([], [("/a", b"1")], [])
    r2 = await kv.txn([Compare("/a", 1)], [("/a", b"2"), ("/b", b"x")], [])
    assert r2.succeeded and r2.revision == r1.revision + 1
    stale = await kv.txn([Compare("/a", 1)], [("/a", b"3")], [])
    assert not stale.succeeded and stale.revision == r2.revision  # nothing written
    a = await kv.get("/a")
    assert a is not None and (a.value, a.version) == (b"2", 2)
    assert (a.create_revision, a.mod_revision) == (r1.revision, r2.revision)
    r3 = await kv.txn([Compare("/a", 2), Compare("/b", 1)], [], ["/a"])
    assert r3.succeeded and r3.revision > r2.revision
    assert await kv.get("/a") is None
    # gone means version 0 again; a re-created key starts a new life
    r4 = await kv.txn([Compare("/a", 0)], [("/a", b"new")], [])
    a = await kv.get("/a")
    assert r4.succeeded and a is not None and (a.version, a.create_revision) == (1, r4.revision)


async def test_revision_only_grows(kv: KV) -> None:
    seen = []
    for i in range(20):
        res = await kv.txn([], [(f"/r/{i % 3}", b"%d" % i)], [f"/r/{(i + 1) % 3}"])
        seen.append(res.revision)
    assert seen == sorted(set(seen))


async def test_range_prefix_and_min_mod_revision(kv: KV) -> None:
    await kv.txn([], [("/p/a", b"1"), ("/p/b", b"2"), ("/pz", b"x"), ("/q", b"y")], [])
    mark = await kv.txn([], [("/p/c", b"3")], [])
    assert [i.key for i in await kv.range("/p/")] == ["/p/a", "/p/b", "/p/c"]
    assert [i.key for i in await kv.range("/p/", min_mod_revision=mark.revision)] == ["/p/c"]
    assert await kv.range("/nothing/") == []


async def test_ttl_keys_expire_and_keepalive_renews(kv: KV) -> None:
    lease = await kv.grant_ttl(2)
    res = await kv.txn([], [], [], [("/alive/x", b"1", lease)])
    assert res.succeeded and await kv.get("/alive/x") is not None
    # kept alive past its TTL, it stays
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:
        assert await kv.keepalive(lease)
        assert await kv.get("/alive/x") is not None
        await asyncio.sleep(0.5)
    # left alone, it goes (etcd checks expiry every 500 ms: allow a margin)
    await _until_gone(kv, "/alive/x", 6.0)
    assert not await kv.keepalive(lease)
    assert (await kv.txn([Compare("/alive/x", 0)], [], [])).succeeded


async def test_revoke_removes_keys_and_expired_lease_refuses_puts(kv: KV) -> None:
    lease = await kv.grant_ttl(30)
    await kv.txn([], [], [], [("/t/a", b"1", lease), ("/t/b", b"2", lease)])
    assert len(await kv.range("/t/")) == 2
    await kv.revoke(lease)
    assert await kv.range("/t/") == []
    assert not await kv.keepalive(lease)
    with pytest.raises(PoolError):
        await kv.txn([], [], [], [("/t/c", b"3", lease)])


async def _until_gone(kv: KV, key: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while await kv.get(key) is not None:
        assert time.monotonic() < deadline, f"{key} still there after {timeout} s"
        await asyncio.sleep(0.1)


def test_open_kv_urls(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for bad in ("sqlite://relative.db", "http://x", "", "etcd://host", "etcd://h:99999"):
        with pytest.raises(PoolError) as err:
            open_kv(bad)
        assert "\n" not in str(err.value)
    assert "SqliteKV" in repr(open_kv(str(tmp_path / "a.db")))
    assert "EtcdKV(etcd://127.0.0.1:1,127.0.0.2:2/pre)" == repr(
        open_kv("etcd://127.0.0.1:1,127.0.0.2:2/pre")
    )


async def test_range_pages_are_one_snapshot(kv: KV, monkeypatch: pytest.MonkeyPatch) -> None:
    from vpcie.pool import etcd_kv

    monkeypatch.setattr(etcd_kv, "RANGE_PAGE", 3)  # etcd reads 10 keys in 4 pages
    await kv.txn([], [(f"/pg/{i:02d}", b"%d" % i) for i in range(10)], [])
    mark = await kv.txn([], [("/pg/05", b"new"), ("/pg/09", b"new")], [])
    assert [i.key for i in await kv.range("/pg/")] == [f"/pg/{i:02d}" for i in range(10)]
    changed = await kv.range("/pg/", min_mod_revision=mark.revision)
    assert [(i.key, i.value) for i in changed] == [("/pg/05", b"new"), ("/pg/09", b"new")]


async def test_range_past_grpc_message_cap(kv: KV) -> None:
    """A 1,000-agent fleet is ~12 MB of records; gRPC refuses replies over
    4 MiB: the etcd store must read it in pages."""
    value = b"v" * 1024
    for chunk in range(60):
        await kv.txn([], [(f"/big/{chunk:02d}/{i:03d}", value) for i in range(90)], [])
    items = await kv.range("/big/")
    assert len(items) == 60 * 90 and sum(len(i.value) for i in items) > (5 << 20)
