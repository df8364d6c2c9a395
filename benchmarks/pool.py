"""Pool benchmark: reserve+release on a simulated fleet, on each store.

A fleet of 1,000 agents x 8 GPUs, half of them in MIG mode (7 x 1g.10gb
slices each: 4 whole GPUs + 28 slices servable per agent), registered
through the real Pool API (add_agent + register_alive). Per store (SQLite in
a temp file, a real etcd on loopback), in one run:

* reserve+release p50/p99 (one vGPU, requests cycling memory / whole GPU /
  MIG profile, pack) against the store's own raw create-if-absent
  transaction (Compare(version=0) + put of a lease-sized value, through the
  same KV object), measured in alternating blocks so drift hits both;
* 16 processes reserving concurrently (mixed requests, leases kept), then
  ``double_booked``: devices whose leases sum past their memory, or an
  exclusive lease sharing its device, or usage records that disagree with
  the leases, all read back from the store afterwards.

    .venv/bin/python benchmarks/pool.py [--quick] [--json] [--stores sqlite,etcd]

--quick: 100 agents instead of 1,000 and fewer samples (it says so).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import _common as common

from vpcie.pool import Agent, Gpu, NoCapacity, Pool, Request
from vpcie.pool.kv import Compare
from vpcie.testing.etcd import EtcdServer

GiB = 1 << 30
PROCS = 16
TARGET_RATIO = 3.0


def fleet_of(name: str) -> list[Gpu]:
    model = "NVIDIA H100 80GB HBM3"
    out = [Gpu(f"GPU-{name}-{i}", name, "gpu", model=model, memory_total=80 * GiB, cc_major=9)
           for i in range(4)]  # fmt: skip
    for i in range(4, 8):
        parent = f"GPU-{name}-{i}"
        out.append(Gpu(parent, name, "gpu", model=model, memory_total=80 * GiB, servable=False))
        out += [Gpu(f"MIG-{name}-{i}-{s}", name, "mig", parent, model, 10 * GiB, "1g.10gb", 9)
                for s in range(7)]  # fmt: skip
    return out


REQUESTS = [Request(memory=8 * GiB), Request(whole=True), Request(profile="1g.10gb"),
            Request(memory=30 * GiB)]  # fmt: skip


async def setup(url: str, agents: int) -> float:
    t0 = time.perf_counter()
    async with await Pool.open(url) as pool:
        for i in range(agents):
            name = f"agent{i:04d}"
            await pool.add_agent(Agent(name, f"10.{i // 250}.{i % 250}.1:7000",
                                       {"psk_file": "/etc/vpcie/psk"}), fleet_of(name))  # fmt: skip
            await pool.register_alive(name, 3600)
    return time.perf_counter() - t0


async def measure(url: str, samples: int, prefill: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    async with await Pool.open(url) as pool:
        t0 = time.perf_counter()
        await pool.refresh()
        res["cache_load_s"] = time.perf_counter() - t0
        rnd = random.Random(13)
        for i in range(prefill):  # a fleet in use, not an empty one
            await pool.reserve(f"pre{i}", rnd.choice(REQUESTS))
        kv = pool.kv
        value = b"x" * 220  # about a stored lease
        reserve: list[float] = []
        raw: list[float] = []
        block = 50
        n = 0
        while len(reserve) < samples:
            for _ in range(block):
                req = REQUESTS[n % len(REQUESTS)]
                t = time.perf_counter()
                lease = await pool.reserve("bench", req)
                await pool.release(lease.id)
                reserve.append(time.perf_counter() - t)
                n += 1
            for _ in range(block):
                key = f"/bench/raw/{n}-{len(raw)}"
                t = time.perf_counter()
                ok = await kv.txn([Compare(key, 0)], [(key, value)], [])
                raw.append(time.perf_counter() - t)
                assert ok.succeeded
    ms = 1000.0
    res["reserve_p50_ms"] = common.percentile(reserve, 50) * ms
    res["reserve_p99_ms"] = common.percentile(reserve, 99) * ms
    res["raw_txn_p50_ms"] = common.percentile(raw, 50) * ms
    res["raw_txn_p99_ms"] = common.percentile(raw, 99) * ms
    res["reserve_ratio_p50"] = res["reserve_p50_ms"] / res["raw_txn_p50_ms"]
    res["reserve_ratio_p99"] = res["reserve_p99_ms"] / res["raw_txn_p99_ms"]
    res["samples"] = len(reserve)
    return res


def racer(url: str, me: int, reserves: int, barrier: Any, out: Any) -> None:
    rnd = random.Random(1000 + me)

    async def run() -> tuple[int, int, float]:
        ok = nocap = 0
        async with await Pool.open(url) as pool:
            await pool.refresh()
            barrier.wait(600)
            t0 = time.perf_counter()
            for i in range(reserves):
                try:
                    await pool.reserve(f"race{me}-{i}", rnd.choice(REQUESTS))
                    ok += 1
                except NoCapacity:
                    nocap += 1
            return ok, nocap, time.perf_counter() - t0

    try:
        out.put((me, asyncio.run(run())))
    except BaseException as e:
        out.put((me, f"{type(e).__name__}: {e}"))


def race(url: str, reserves: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(PROCS), ctx.Queue()
    procs = [ctx.Process(target=racer, args=(url, i, reserves, barrier, out))
             for i in range(PROCS)]  # fmt: skip
    for p in procs:
        p.start()
    got = dict(out.get(timeout=900) for _ in procs)
    for p in procs:
        p.join(30)
    errors = [v for v in got.values() if isinstance(v, str)]
    if errors:
        raise RuntimeError(f"racers failed: {errors[:3]}")
    ok = sum(v[0] for v in got.values())
    wall = max(v[2] for v in got.values())
    return {"race_reserved": ok, "race_nocap": sum(v[1] for v in got.values()),
            "race_reserves_per_s": ok / wall if wall else 0.0}  # fmt: skip


async def double_booked(url: str) -> int:
    """Devices booked past what they hold, read back from the store."""
    async with await Pool.open(url) as pool:
        gpus = {g.key: g for g in await pool.gpus()}
        usage = await pool.usage()
        on: dict[str, list[Any]] = defaultdict(list)
        for ls in await pool.leases():
            on[ls.device].append(ls)
    bad = 0
    for dev, held in on.items():
        u = usage.get(dev)
        if (
            sum(ls.memory for ls in held) > gpus[dev].memory_total
            or (any(ls.exclusive for ls in held) and len(held) > 1)
            or u is None
            or u.leases != {ls.id: ls.memory for ls in held}
        ):
            bad += 1
    return bad


def run_store(store: str, agents: int, samples: int, prefill: int, reserves: int,
              tmp: Path) -> dict[str, Any]:  # fmt: skip
    etcd = None
    if store == "sqlite":
        url = f"sqlite://{tmp}/pool.db"
    else:
        etcd = EtcdServer()
        etcd.start()
        url = etcd.url + "/bench"
    try:
        res = {"setup_s": asyncio.run(setup(url, agents))}
        res.update(asyncio.run(measure(url, samples, prefill)))
        res.update(race(url, reserves))
        res["double_booked"] = asyncio.run(double_booked(url))
    finally:
        if etcd is not None:
            etcd.stop()
    return res


def main() -> int:
    ap = common.parser((__doc__ or "").split("\n")[0])
    ap.add_argument("--stores", default="sqlite,etcd", help="comma-separated: sqlite, etcd")
    args = ap.parse_args()
    agents = 100 if args.quick else 1000
    samples, prefill, reserves = (200, 100, 10) if args.quick else (1000, 1000, 40)
    stores = [s for s in args.stores.split(",") if s]
    out: dict[str, Any] = {"quick": args.quick, "agents": agents, "gpus_per_agent": 8,
                           "servable_devices": agents * 32, "procs": PROCS}  # fmt: skip
    common.say("pool benchmark: reserve+release vs the store's raw create-if-absent txn")
    if args.quick:
        common.say(f"--quick: {agents} agents (not 1,000), {samples} samples per measure")
    m = common.machine()
    common.say(f"machine: {m['nproc']} x {m['cpu']}, kernel {m['kernel']}, Python {m['python']}")
    rows = []
    booked = 0
    with tempfile.TemporaryDirectory(prefix="vpcie-poolbench-") as tmp:
        for store in stores:
            d = Path(tmp) / store
            d.mkdir()
            r = run_store(store, agents, samples, prefill, reserves, d)
            for k, v in r.items():
                out[f"{store}_{k}"] = v
            booked += r["double_booked"]
            rows += [
                [f"{store} reserve+release p50 (ms)", r["reserve_p50_ms"], r["raw_txn_p50_ms"],
                 r["reserve_ratio_p50"], f"<= {TARGET_RATIO:g}x"],
                [f"{store} reserve+release p99 (ms)", r["reserve_p99_ms"], r["raw_txn_p99_ms"],
                 r["reserve_ratio_p99"], ""],
                [f"{store} {PROCS} procs: reserves/s", r["race_reserves_per_s"], "-", "-", ""],
                [f"{store} double-booked devices", r["double_booked"], "-", "-", "0"],
            ]  # fmt: skip
            common.say(f"{store}: fleet registered in {r['setup_s']:.1f} s, cache loaded in "
                       f"{r['cache_load_s']:.2f} s; race: {r['race_reserved']} reserved, "
                       f"{r['race_nocap']} no capacity")  # fmt: skip
    out["double_booked"] = booked
    out["machine"] = m
    out["ratio_target_met"] = all(out[f"{s}_reserve_ratio_p50"] <= TARGET_RATIO for s in stores)
    common.table(rows, ["measure", "pool", "raw txn", "ratio", "target"])
    common.say(f"targets met: ratio={out['ratio_target_met']}, double_booked={booked == 0}")
    if args.json:
        common.emit_json(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
