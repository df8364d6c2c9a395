"""Placement, pure: no store, no sockets (vpcie/pool/scheduler.py)."""

from __future__ import annotations

import random

import pytest

from tests.pool.fleet_data import GiB, agent, h100, mig_gpu
from vpcie.pool.errors import NoCapacity
from vpcie.pool.model import Agent, Gpu, Request, Usage
from vpcie.pool.scheduler import Fleet, place


def agents(*names: str, **kw: object) -> dict[str, Agent]:
    return {n: agent(n, **kw) for n in names}


def mig3(agent_name: str, n: int, profile: str = "3g.40gb") -> Gpu:
    return Gpu(f"MIG3-{agent_name}-{n}", agent_name, "mig", f"GPU-{agent_name}-9",
               "NVIDIA H100 80GB HBM3", 40 * GiB, profile)  # fmt: skip


def test_memory_fit_shares_a_device_and_respects_its_total() -> None:
    gpus = [h100("a", 0)]
    used = {"a/GPU-a-0": Usage(60 * GiB, False, {"x": 60 * GiB})}
    assert place(gpus, used, agents("a"), Request(memory=20 * GiB)).id == "GPU-a-0"
    with pytest.raises(NoCapacity) as err:
        place(gpus, used, agents("a"), Request(memory=21 * GiB))
    assert str(err.value) == "no capacity: 0 of 1 devices fit memory=21 GiB (1 full)"


def test_whole_gpu_needs_an_untouched_device_and_takes_it() -> None:
    gpus = [h100("a", 0), h100("a", 1)]
    used = {"a/GPU-a-0": Usage(GiB, False, {"x": GiB})}
    assert place(gpus, used, agents("a"), Request(whole=True)).id == "GPU-a-1"
    used["a/GPU-a-1"] = Usage(80 * GiB, True, {"y": 80 * GiB})
    with pytest.raises(NoCapacity) as err:
        place(gpus, used, agents("a"), Request(whole=True))
    assert "(2 in use)" in str(err.value)
    # an exclusively held device takes no shared lease either
    with pytest.raises(NoCapacity):
        place([h100("a", 1)], used, agents("a"), Request(memory=GiB))


def test_mig_profile_and_mig_mode_parents_are_not_servable() -> None:
    gpus = [*mig_gpu("a", 0, slices=2), mig3("a", 0), h100("a", 1)]
    got = place(gpus, {}, agents("a"), Request(profile="3g.40gb"))
    assert got.id == "MIG3-a-0"
    got = place(gpus, {}, agents("a"), Request(profile="1g.10gb"))
    assert got.kind == "mig" and got.profile == "1g.10gb"
    with pytest.raises(NoCapacity) as err:
        place(gpus, {}, agents("a"), Request(profile="7g.80gb"))
    assert "0 of 4 devices" in str(err.value)  # the MIG-mode parent is not counted
    assert "(4 other profile)" in str(err.value)  # the GPU too
    whole = place(gpus, {}, agents("a"), Request(whole=True))
    assert whole.id == "GPU-a-1"  # never the parent in MIG mode


def test_pack_keeps_whole_gpus_free_and_takes_the_smallest_slice() -> None:
    gpus = [h100("a", 0), *mig_gpu("a", 1, slices=1), mig3("a", 0)]
    # 5 GiB fits all three: the smallest slice that fits, not the GPU
    assert place(gpus, {}, agents("a"), Request(memory=5 * GiB)).id == "MIG-a-1-0"
    # 20 GiB: the 3g slice, still not the whole GPU
    assert place(gpus, {}, agents("a"), Request(memory=20 * GiB)).id == "MIG3-a-0"
    # 50 GiB: only the GPU fits
    assert place(gpus, {}, agents("a"), Request(memory=50 * GiB)).id == "GPU-a-0"
    # a GPU that is already shared is packed before a fresh slice
    used = {"a/GPU-a-0": Usage(75 * GiB, False, {"x": 75 * GiB})}
    assert place(gpus, used, agents("a"), Request(memory=5 * GiB)).id == "GPU-a-0"


def test_pack_fills_the_fullest_device_and_one_agent_at_a_time() -> None:
    gpus = [h100("a", 0), h100("b", 0)]
    used = {"b/GPU-b-0": Usage(40 * GiB, False, {"x": 40 * GiB})}
    assert place(gpus, used, agents("a", "b"), Request(memory=10 * GiB)).agent == "b"
    # exclusive: slices of one parent GPU before another's
    gpus = [*mig_gpu("a", 0, slices=3), *mig_gpu("a", 1, slices=3)]
    used = {"a/MIG-a-0-0": Usage(10 * GiB, True, {"x": 10 * GiB})}
    got = place(gpus, used, agents("a"), Request(profile="1g.10gb"))
    assert got.parent == "GPU-a-0"


def test_spread_takes_the_emptiest_agent_and_device() -> None:
    gpus = [h100("a", 0), h100("a", 1), h100("b", 0)]
    used = {"a/GPU-a-0": Usage(10 * GiB, False, {"x": 10 * GiB})}
    got = place(gpus, used, agents("a", "b"), Request(memory=GiB, policy="spread"))
    assert got.agent == "b"
    got = place(gpus, used, agents("a", "b"), Request(memory=GiB, policy="pack"))
    assert got.id == "GPU-a-0"


def test_cordoned_unhealthy_down_are_passed_over_with_reasons() -> None:
    gpus = [h100("a", 0), h100("b", 0), h100("c", 0), h100("d", 0)]
    gpus[1].cordoned = True
    gpus[2].healthy = False
    ags = agents("a", "b", "c", "d")
    ags["a"].cordoned = True
    health = {"d": "down"}
    with pytest.raises(NoCapacity) as err:
        place(gpus, {}, ags, Request(memory=GiB), health=health)
    msg = str(err.value)
    assert msg.startswith("no capacity: 0 of 4 devices fit memory=1 GiB (")
    assert "2 cordoned" in msg and "1 unhealthy" in msg and "1 down" in msg
    assert "\n" not in msg
    # stale still serves; only down does not
    assert place(gpus, {}, ags, Request(memory=GiB), health={"d": "stale"}).agent == "d"
    # a device whose agent is not in the pool counts as down
    with pytest.raises(NoCapacity, match="1 down"):
        place([h100("zz", 0)], {}, {}, Request(memory=GiB))


def test_model_labels_agent_gpu_exclude() -> None:
    gpus = [h100("a", 0), h100("b", 0, model="NVIDIA A100-SXM4-40GB")]
    ags = agents("a", "b")
    ags["b"].labels = {"rack": "r2"}
    gpus[0].labels = {"rack": "r1"}
    assert place(gpus, {}, ags, Request(memory=GiB, model="a100")).agent == "b"
    assert place(gpus, {}, ags, Request(memory=GiB, labels={"rack": "r2"})).agent == "b"
    assert place(gpus, {}, ags, Request(memory=GiB, agent="b")).agent == "b"
    assert place(gpus, {}, ags, Request(memory=GiB, gpu="GPU-b-0")).agent == "b"
    assert place(gpus, {}, ags, Request(memory=GiB, gpu="b/GPU-b-0")).agent == "b"
    assert place(gpus, {}, ags, Request(memory=GiB, exclude_agents=("a",))).agent == "b"
    with pytest.raises(NoCapacity) as err:
        place(gpus, {}, ags, Request(memory=80 * GiB, model="H100", labels={"rack": "r9"}))
    assert str(err.value) == (
        "no capacity: 0 of 2 devices fit memory=80 GiB model=H100 labels=rack=r9 (2 other labels)"
    )


def test_no_capacity_line_names_request_and_reasons() -> None:
    gpus = [h100("a", i) for i in range(12)]
    for g in gpus[:4]:
        g.cordoned = True
    for g in gpus[4:10]:
        g.memory_total = 40 * GiB
    assert place(gpus, {}, agents("a"), Request(memory=80 * GiB, model="H100")).id == "GPU-a-10"
    gpus[10].cordoned = gpus[11].cordoned = True
    with pytest.raises(NoCapacity) as err:
        place(gpus, {}, agents("a"), Request(memory=80 * GiB, model="H100"))
    assert str(err.value) == (
        "no capacity: 0 of 12 devices fit memory=80 GiB model=H100 (6 cordoned, 6 too small)"
    )


def test_indexed_pack_takes_what_a_scan_with_the_same_order_takes() -> None:
    """The Fleet's bisect path against a plain scan over Fleet.rank, on random
    fleets and usage (the index is the fast path of the same decision)."""
    rnd = random.Random(1313)
    for _ in range(300):
        fleet = Fleet()
        names = [f"a{i}" for i in range(rnd.randint(1, 4))]
        for n in names:
            fleet.set_agent(agent(n, cordoned=rnd.random() < 0.1))
        for n in names:
            for i in range(rnd.randint(0, 3)):
                model = rnd.choice(["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"])
                whole = [h100(n, i, model)]
                for g in whole if rnd.random() < 0.5 else mig_gpu(n, i, rnd.randint(1, 3)):
                    g.cordoned = rnd.random() < 0.1
                    g.memory_total = rnd.choice([g.memory_total, g.memory_total // 2])
                    fleet.set_gpu(g)
        for key, g in list(fleet.gpus.items()):
            r = rnd.random()
            if r < 0.2:
                fleet.set_usage(key, Usage(g.memory_total, True, {"x": g.memory_total}))
            elif r < 0.5:
                m = rnd.randint(0, g.memory_total // GiB) * GiB
                fleet.set_usage(key, Usage(m, False, {"y": m}))
        health = {n: rnd.choice(["up", "up", "stale", "down"]) for n in names}
        req = rnd.choice([
            Request(memory=rnd.randint(0, 80) * GiB),
            Request(memory=rnd.randint(0, 40) * GiB, model="A100"),
            Request(whole=True),
            Request(profile="1g.10gb"),
            Request(memory=rnd.randint(1, 10) * GiB, profile="1g.10gb"),
        ])  # fmt: skip
        fits = [k for k in fleet.gpus if k in fleet._entries
                and fleet.reason(k, req, health) is None]  # fmt: skip
        want = min(fits, key=lambda k: fleet.rank(k, req)) if fits else None
        try:
            got: str | None = fleet.place(req, health).key
        except NoCapacity:
            got = None
        assert got == want, (req, health)
        # the k best (a reserve that lost a race picks among them)
        k = rnd.randint(2, 6)
        assert fleet.best(req, health, k) == sorted(fits, key=lambda g: fleet.rank(g, req))[:k]
        if fits:
            assert fleet.place(req, health, choices=k).key in fits
