"""Worker processes for the double-booking races (spawned: a real process
each, with its own Pool and its own store connection)."""

from __future__ import annotations

import asyncio
import random
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

from vpcie.pool import NoCapacity, Pool, Request

GiB = 1 << 30


def race_last_gpu(url: str, me: int, barrier: Barrier, out: Queue) -> None:  # type: ignore[type-arg]
    async def run() -> str:
        async with await Pool.open(url) as pool:
            await pool.refresh()  # every racer places on the same view...
            barrier.wait(60)  # ...and they commit together
            try:
                lease = await pool.reserve(f"v{me}", Request(whole=True), owner=f"proc{me}")
            except NoCapacity as e:
                return f"nocap {e}"
            return f"won {lease.id}"

    out.put((me, asyncio.run(run())))


def race_many(url: str, me: int, reserves: int, barrier: Barrier, out: Queue) -> None:  # type: ignore[type-arg]
    rnd = random.Random(me)

    async def run() -> list[str]:
        got = []
        async with await Pool.open(url) as pool:
            await pool.refresh()
            barrier.wait(60)
            for i in range(reserves):
                req = rnd.choice([
                    Request(memory=rnd.randint(5, 40) * GiB),
                    Request(whole=True),
                    Request(profile="1g.10gb"),
                    Request(memory=rnd.randint(5, 40) * GiB, policy="spread"),
                ])  # fmt: skip
                try:
                    lease = await pool.reserve(f"v{me}-{i}", req)
                    got.append(lease.id)
                    if rnd.random() < 0.3:
                        await pool.release(lease.id)
                        got.append("released")
                except NoCapacity as e:
                    assert "\n" not in str(e)
                    got.append("nocap")
        return got

    try:
        out.put((me, asyncio.run(run())))
    except BaseException as e:  # report, so the test fails with the reason
        out.put((me, f"error {type(e).__name__}: {e}"))
