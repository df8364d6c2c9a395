"""The Pool API on both stores: agents, vGPUs, reserve/release, health."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.pool.fleet_data import GiB, agent, h100, mig_gpu
from vpcie.pool import Conflict, NoCapacity, NotFound, Pool, PoolError, Request, Vgpu


@pytest.fixture
async def pool(pool_url: str):  # type: ignore[no-untyped-def]
    p = await Pool.open(pool_url)
    yield p
    await p.close()


async def test_agents_and_devices(pool: Pool) -> None:
    await pool.add_agent(agent("a1"), [h100("a1", 0), *mig_gpu("a1", 1, slices=2)])
    with pytest.raises(Conflict):
        await pool.add_agent(agent("a1"), [])
    assert [a.name for a in await pool.agents()] == ["a1"]
    assert sorted(g.id for g in await pool.gpus("a1")) == [
        "GPU-a1-0", "GPU-a1-1", "MIG-a1-1-0", "MIG-a1-1-1"
    ]  # fmt: skip
    await pool.cordon_gpu("MIG-a1-1-0")
    await pool.update_inventory("a1", [h100("a1", 0), *mig_gpu("a1", 1, slices=1)])
    gpus = {g.id: g for g in await pool.gpus()}
    assert "MIG-a1-1-1" not in gpus and gpus["MIG-a1-1-0"].cordoned  # the cordon survives
    with pytest.raises(NotFound):
        await pool.update_inventory("nope", [])
    st = await pool.status()
    assert st["agents"]["total"] == 1 and st["gpus"]["total"] == 2 and st["gpus"]["cordoned"] == 1


async def test_reserve_release_round_trip(pool: Pool) -> None:
    await pool.add_agent(agent("a1"), [h100("a1", 0)])
    await pool.add_vgpu(Vgpu("v1", "/run/v1.sock", "dom1"))
    lease = await pool.reserve("v1", Request(memory=30 * GiB), owner="test")
    assert (lease.agent, lease.gpu, lease.memory, lease.exclusive) == (
        "a1",
        "GPU-a1-0",
        30 * GiB,
        False,
    )
    assert lease.token > 0
    stored = await pool.lease(lease.id)
    assert stored.token == lease.token and stored.owner == "test" and stored.state == "reserved"
    assert (await pool.vgpus())[0] == Vgpu("v1", "/run/v1.sock", "dom1", lease.id)
    assert (await pool.usage())["a1/GPU-a1-0"].memory == 30 * GiB
    bound = await pool.set_lease_state(lease.id, "bound")
    assert bound.state == "bound" and (await pool.lease(lease.id)).state == "bound"
    released = await pool.release(lease.id)
    assert released.state == "released"
    assert await pool.leases() == []
    assert (await pool.usage())["a1/GPU-a1-0"].memory == 0
    assert (await pool.vgpus())[0].lease == ""
    with pytest.raises(NotFound):
        await pool.release(lease.id)


async def test_release_frees_for_the_next(pool_url: str, pool: Pool) -> None:
    await pool.add_agent(agent("a1"), [h100("a1", 0)])
    first = await pool.reserve("v1", Request(whole=True))
    with pytest.raises(NoCapacity):
        await pool.reserve("v2", Request(whole=True))
    # released through ANOTHER Pool (another process's view): this one's cache
    # still says "full"; its NoCapacity path rereads the store before answering
    async with await Pool.open(pool_url) as other:
        await other.release(first.id)
    second = await pool.reserve("v2", Request(whole=True))
    assert second.gpu == first.gpu and second.token > first.token


async def test_tokens_grow_across_leases_of_one_device(pool: Pool) -> None:
    await pool.add_agent(agent("a1"), [h100("a1", 0)])
    tokens = []
    for i in range(5):
        lease = await pool.reserve(f"v{i % 2}", Request(whole=True))
        tokens.append(lease.token)
        await pool.cordon_agent("a1", False)  # other writes in between
        await pool.release(lease.id)
    assert tokens == sorted(set(tokens)) and tokens[0] > 0


async def test_a_lease_knows_the_device_leases_live_with_it(pool_url: str, pool: Pool) -> None:
    """The agent's fencing keeps sessions of leases in the newest lease's live
    set and ends the others (docs/SECURITY.md "Lease fencing"): A live; B made
    and released; C made while A lives -> C's set holds A and C, never B.
    Leases are made through two Pools (two processes' caches)."""
    await pool.add_agent(agent("a1"), [h100("a1", 0)])
    a = await pool.reserve("va", Request(memory=GiB))
    assert a.live == (a.token,) and (await pool.lease(a.id)).live == (a.token,)
    async with await Pool.open(pool_url) as other:
        b = await other.reserve("vb", Request(memory=GiB))
        assert b.live == (a.token, b.token)
        await other.cordon_agent("a1", False)  # an unrelated write in between
    await pool.release(b.id)
    c = await pool.reserve("vc", Request(memory=GiB))
    assert c.live == (a.token, c.token) and b.token not in c.live
    assert (await pool.lease(c.id)).live == c.live
    await pool.add_agent(agent("a2"), [h100("a2", 0)])
    w = await pool.reserve("vw", Request(whole=True, agent="a2"))
    assert w.live == (w.token,)  # exclusive: alone on its device


async def test_remove_agent_refuses_with_leases(pool: Pool) -> None:
    await pool.add_agent(agent("a1"), [h100("a1", 0)])
    lease = await pool.reserve("v1", Request(memory=GiB))
    with pytest.raises(Conflict) as err:
        await pool.remove_agent("a1")
    assert "v1" in str(err.value) and "\n" not in str(err.value)
    assert not (await pool.agents())[0].cordoned  # the refusal undoes its cordon
    with pytest.raises(Conflict):
        await pool.remove_vgpu("v1")
    await pool.release(lease.id)
    await pool.remove_agent("a1")
    assert await pool.agents() == [] and await pool.gpus() == [] and await pool.usage() == {}
    with pytest.raises(NotFound):
        await pool.remove_agent("a1")
    await pool.remove_vgpu("v1")
    assert await pool.vgpus() == []


async def test_remove_agent_force_drops_its_leases(pool: Pool) -> None:
    await pool.add_agent(agent("a1"), [h100("a1", 0)])
    await pool.reserve("v1", Request(memory=GiB))
    await pool.remove_agent("a1", force=True)
    assert await pool.leases() == [] and (await pool.vgpus())[0].lease == ""


async def test_cordoned_agent_gets_nothing(pool: Pool) -> None:
    await pool.add_agent(agent("a1"), [h100("a1", 0)])
    await pool.reserve("v0", Request(memory=GiB))  # loads the cache before the cordon
    await pool.cordon_agent("a1", True)
    with pytest.raises(NoCapacity) as err:
        await pool.reserve("v1", Request(memory=GiB))
    assert "1 cordoned" in str(err.value)
    await pool.cordon_agent("a1", False)
    await pool.reserve("v1", Request(memory=GiB))


async def test_registered_agent_whose_ttl_key_expires_is_down(pool: Pool) -> None:
    await pool.add_agent(agent("a1", ttl=2.0), [h100("a1", 0)])
    await pool.add_agent(agent("a2", ttl=2.0), [h100("a2", 0), h100("a2", 1)])
    ttl_a1 = await pool.register_alive("a1", 2)
    ttl_a2 = await pool.register_alive("a2", 2)
    assert (await pool.agent_health()) == {"a1": "up", "a2": "up"}
    # this Pool's cache now holds a1 as alive (pack would pick a1 first: by name)
    await pool.release((await pool.reserve("v0", Request(memory=GiB))).id)
    # a2 stays alive; a1's registrar is gone: its key expires, a1 is down at once
    deadline = time.monotonic() + 8
    while (await pool.agent_health())["a1"] != "down":
        assert time.monotonic() < deadline, "a1's TTL key did not expire"
        assert await pool.keepalive(ttl_a2)
        await asyncio.sleep(0.25)
    assert not await pool.keepalive(ttl_a1)
    got = [(await pool.reserve(f"v{i}", Request(whole=True))).agent for i in (1, 2)]
    assert got == ["a2", "a2"]
    with pytest.raises(NoCapacity) as err:
        await pool.reserve("v3", Request(whole=True))
    assert "1 down" in str(err.value)


async def test_bad_requests_are_one_line(pool: Pool) -> None:
    for req in (
        Request(policy="random"),
        Request(memory=-1),
        Request(whole=True, profile="1g.10gb"),
    ):
        with pytest.raises(PoolError) as err:
            await pool.reserve("v1", req)
        assert "\n" not in str(err.value)
    with pytest.raises(PoolError):
        await pool.reserve("bad/name", Request())
    with pytest.raises(NoCapacity) as err:
        await pool.reserve("v1", Request(memory=GiB))
    assert "no servable devices" in str(err.value)


async def test_unreachable_stores_say_so_in_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import free_port
    from vpcie.pool import StoreUnavailable

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for url in (f"etcd://127.0.0.1:{free_port()}", f"sqlite://{blocker}/pool.db"):
        async with await Pool.open(url) as pool:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable) as err:
                await pool.agents()
            assert "\n" not in str(err.value) and time.monotonic() - t0 < 15
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not sqlite" * 100)
    async with await Pool.open(str(corrupt)) as pool:
        with pytest.raises(StoreUnavailable) as err:
            await pool.agents()
        assert str(corrupt) in str(err.value) and "\n" not in str(err.value)


async def test_a_vgpu_holds_two_leases_while_it_migrates(pool: Pool) -> None:
    await pool.add_agent(agent("a1"), [h100("a1", 0)])
    await pool.add_agent(agent("a2"), [h100("a2", 0)])
    src = await pool.reserve("v1", Request(whole=True))
    # the move: a lease on another agent, the old one marked, then released
    dst = await pool.reserve("v1", Request(whole=True, exclude_agents=(src.agent,)))
    assert dst.agent != src.agent and dst.previous == src.id and dst.token > src.token
    assert (await pool.vgpus())[0].lease == dst.id
    await pool.set_lease_state(src.id, "migrating")
    await pool.release(src.id)
    assert (await pool.vgpus())[0].lease == dst.id  # the source's release leaves it alone
    # a failed move releases the target: the vGPU names its source lease again
    back = await pool.reserve("v1", Request(whole=True, exclude_agents=(dst.agent,)))
    await pool.release(back.id)
    assert (await pool.vgpus())[0].lease == dst.id
    await pool.release(dst.id)
    assert (await pool.vgpus())[0].lease == ""
