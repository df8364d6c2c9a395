"""Never double-booked: real processes racing on each store."""

from __future__ import annotations

import multiprocessing as mp
import queue
from collections import defaultdict
from typing import Any

import pytest

from tests.pool import race_worker
from tests.pool.fleet_data import agent, h100, mig_gpu
from vpcie.pool import Pool

pytestmark = pytest.mark.slow


def _run(target: Any, args_for: Any, n: int, timeout: float = 90) -> dict[int, Any]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n)
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_for(i), barrier, out)) for i in range(n)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    try:
        while len(got) < n:
            me, res = out.get(timeout=timeout)
            got[me] = res
    except queue.Empty:
        pytest.fail(f"only {len(got)} of {n} racers answered within {timeout} s")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return got


async def test_eight_processes_race_for_the_last_gpu(pool_url: str) -> None:
    async with await Pool.open(pool_url) as pool:
        await pool.add_agent(agent("a1"), [h100("a1", 0)])
    got = _run(race_worker.race_last_gpu, lambda i: (pool_url, i), 8)
    won = [r for r in got.values() if r.startswith("won ")]
    lost = [r for r in got.values() if r.startswith("nocap ")]
    assert len(won) == 1 and len(lost) == 7, got
    for r in lost:
        assert r == "nocap no capacity: 0 of 1 devices fit a whole GPU (1 in use)"
    async with await Pool.open(pool_url) as pool:
        leases = await pool.leases()
        assert [ls.id for ls in leases] == [won[0].split()[1]]


async def test_sixteen_processes_never_overbook(pool_url: str) -> None:
    async with await Pool.open(pool_url) as pool:
        for name in ("a1", "a2"):
            await pool.add_agent(agent(name), [h100(name, 0), h100(name, 1),
                                               *mig_gpu(name, 2, slices=3)])  # fmt: skip
    got = _run(race_worker.race_many, lambda i: (pool_url, i, 6), 16, timeout=150)
    errors = [r for r in got.values() if isinstance(r, str)]
    assert not errors, errors
    reserved = sum(1 for r in got.values() for x in r if x not in ("nocap", "released"))
    assert reserved > 0
    async with await Pool.open(pool_url) as pool:
        gpus = {g.key: g for g in await pool.gpus()}
        usage = await pool.usage()
        leases = await pool.leases()
    on: dict[str, list[Any]] = defaultdict(list)
    for ls in leases:
        on[ls.device].append(ls)
    for dev, held in on.items():
        total = gpus[dev].memory_total
        assert sum(ls.memory for ls in held) <= total, (dev, held)
        if any(ls.exclusive for ls in held):
            assert len(held) == 1, (dev, held)
            assert held[0].memory == total
        assert gpus[dev].servable
        u = usage[dev]
        assert u.leases == {ls.id: ls.memory for ls in held}
        assert u.memory == sum(ls.memory for ls in held)
    kept = 0
    for r in got.values():
        for i, x in enumerate(r):
            if x not in ("nocap", "released") and r[i + 1 : i + 2] != ["released"]:
                kept += 1
    assert len(leases) == kept
