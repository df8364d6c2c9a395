"""Pool records survive their JSON round trip, and tolerate other versions."""

from __future__ import annotations

import json

from vpcie.pool.model import Agent, Gpu, Lease, Request, Usage, Vgpu

GiB = 1 << 30

SAMPLES = [
    Agent("a1", "10.0.0.1:7000", {"tls_dir": "/etc/vpcie/pki", "tls_name": "a1"},
          {"rack": "r1"}, cordoned=True, registered=True, heartbeat=1.5, version=2, ttl=7.0),
    Agent("a2", "[::1]:7000", {"psk_file": "/etc/vpcie/psk"}),
    Gpu("MIG-1", "a1", "mig", "GPU-9", "NVIDIA H100 80GB HBM3", 10 * GiB, "1g.10gb", 9, 0,
        healthy=False, servable=True, cordoned=True, labels={"x": "y"}),
    Gpu("cpu0", "a2", "cpu", memory_total=64 * GiB),
    Vgpu("vm1-gpu", "/run/vpcie/vm1-gpu.sock", "vm1", "abc123"),
    Lease("abc123", "vm1-gpu", "a1", "MIG-1", 10 * GiB, True, "bound", "vpcie-cli", 42, 1.0, 2.0),
    Usage(3 * GiB, False, {"l1": GiB, "l2": 2 * GiB}),
    Request(memory=GiB, profile="", whole=False, model="H100", labels={"rack": "r1"},
            agent="a1", gpu="", policy="spread", exclude_agents=("a2", "a3")),
]  # fmt: skip


def test_round_trips() -> None:
    for rec in SAMPLES:
        again = type(rec).from_json(json.loads(json.dumps(rec.to_json())))
        assert again == rec
        assert type(rec).loads(rec.dumps()) == rec


def test_unknown_fields_ignored_missing_fields_default() -> None:
    data = {**SAMPLES[1].to_json(), "from_the_future": 1}
    assert Agent.from_json(data) == SAMPLES[1]
    assert Gpu.from_json({"id": "GPU-1", "agent": "a"}) == Gpu("GPU-1", "a")


def test_agent_health() -> None:
    registered = Agent("a", "h:1", registered=True, heartbeat=100.0, ttl=10)
    assert registered.health(now=100.0, alive=True) == "up"
    assert registered.health(now=100.0, alive=False) == "down"  # TTL key gone: down at once
    manual = Agent("b", "h:1", heartbeat=100.0, ttl=10)
    assert [manual.health(now=100 + age, alive=False) for age in (5, 10, 20, 30, 31)] == [
        "up", "up", "stale", "stale", "down"
    ]  # fmt: skip
    assert Agent("c", "h:1", heartbeat=0.0, ttl=0).health(now=1e9, alive=False) == "up"


def test_usage_free() -> None:
    assert Usage(3 * GiB, False, {"l": 3 * GiB}).free(10 * GiB) == 7 * GiB
    assert Usage(10 * GiB, True, {"l": 10 * GiB}).free(10 * GiB) == -1
