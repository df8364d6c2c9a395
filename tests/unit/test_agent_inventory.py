"""Inventory over a fake NVML: MIG enumeration, health, CPU fallback, grants."""

from __future__ import annotations

from host_agent.config import AgentConfig
from host_agent.handshake import OpenRequest
from host_agent.inventory import CPU_DEVICE, discover
from host_agent.nvml import FakeNvml
from host_agent.server import Agent, WorkerInfo
from host_agent.worker import Grant
from vpcie.errors import ErrorCode

SPEC = {
    "gpus": [
        {
            "uuid": "GPU-a",
            "name": "NVIDIA H200",
            "memory": 100,
            "mig": [
                {"uuid": "MIG-1", "name": "NVIDIA H200 MIG 2g.35gb", "memory": 35},
                {"uuid": "MIG-2", "name": "NVIDIA H200 MIG 1g.18gb+me", "memory": 18},
            ],
        },
        {"uuid": "GPU-b", "name": "NVIDIA H100", "memory": 80, "health": {"ecc_uncorrected": 3}},
        {"uuid": "GPU-c", "name": "NVIDIA H100", "memory": 80},
    ]
}


def test_mig_enumeration() -> None:
    inv = discover(FakeNvml(SPEC), "fake")
    ids = [d.id for d in inv.devices]
    assert ids == ["GPU-a", "MIG-1", "MIG-2", "GPU-b", "GPU-c"]
    assert [d.id for d in inv.servable] == ["MIG-1", "MIG-2", "GPU-b", "GPU-c"]
    mig2 = inv.find("MIG-2")
    assert mig2 is not None and mig2.profile == "1g.18gb+me" and mig2.parent == "GPU-a"
    assert inv.find("GPU-a") is None  # MIG mode: not usable whole
    assert inv.has_gpu


def test_health_marks_device() -> None:
    inv = discover(FakeNvml(SPEC), "fake")
    b = inv.find("GPU-b")
    assert b is not None and not b.healthy and b.to_json()["healthy"] is False


def test_no_nvml_offers_cpu0() -> None:
    inv = discover(None, "NVML unavailable (test)")
    assert [d.id for d in inv.servable] == [CPU_DEVICE] and not inv.has_gpu
    assert "not a GPU" in inv.devices[0].name
    assert discover(FakeNvml({"gpus": []}), "fake").servable[0].id == CPU_DEVICE


def test_grants_skip_unhealthy_and_cap_quota() -> None:
    cfg = AgentConfig(auth="psk", agent_name="t", psk_hex="00" * 16, max_sessions=1,
                      mem_quota=30, max_inflight=5)  # fmt: skip
    agent = Agent(cfg, discover(FakeNvml(SPEC), "fake"), ("127.0.0.1", 0))
    grants = [agent.grant(OpenRequest("", 0, 0, "vm")) for i in range(4)]
    ok = [g for g in grants if isinstance(g, Grant)]
    assert {g.device["id"] for g in ok} == {"MIG-1", "MIG-2", "GPU-c"}  # GPU-b unhealthy
    assert grants[3] == (ErrorCode.QUOTA_EXCEEDED, "every device has 1 sessions")
    assert all(g.mem_quota == min(30, g.device["memory_total"]) for g in ok)
    g = agent.grant(OpenRequest("GPU-b", 10, 99, "vm"))
    assert isinstance(g, Grant)
    assert g.mem_quota == 10 and g.max_inflight == 5  # by UUID: allowed
    w = WorkerInfo(9, "p", session=g.session, device=g.device["id"])
    agent.release(w)
    agent.release(w)  # once only
    assert agent.sessions_per_device["GPU-b"] == 0
    assert len({g.session for g in ok}) == 3
