"""Device inventory, selection by UUID and CUDA_VISIBLE_DEVICES pinning, with
a fake NVML (the hardware boundary) describing a GPU in MIG mode and a whole GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_agent.testclient import AgentProcess, RawClient
from vpcie.errors import ErrorCode

MIG_GPU = "GPU-11111111-0000-0000-0000-000000000000"
MIG_A = "MIG-aaaaaaaa-0000-0000-0000-000000000000"
MIG_B = "MIG-bbbbbbbb-0000-0000-0000-000000000000"
WHOLE = "GPU-22222222-0000-0000-0000-000000000000"
HOST = {
    "gpus": [
        {
            "uuid": MIG_GPU,
            "name": "NVIDIA H200",
            "memory": 140 << 30,
            "mig": [
                {"uuid": MIG_A, "name": "NVIDIA H200 MIG 1g.18gb", "memory": 18 << 30},
                {"uuid": MIG_B, "name": "NVIDIA H200 MIG 3g.71gb", "memory": 71 << 30},
            ],
        },
        {
            "uuid": WHOLE,
            "name": "NVIDIA H100 80GB HBM3",
            "memory": 80 << 30,
            "health": {"ecc_uncorrected": 0, "retired_pages": 0},
        },
    ]
}


@pytest.fixture(scope="module")
def fake_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("nvml")
    (d / "host.json").write_text(json.dumps(HOST))
    return {"VPCIE_AGENT_FAKE_NVML": str(d / "host.json")}


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory, fake_env: dict[str, str]
) -> Iterator[tuple[AgentProcess, bytes]]:
    d = tmp_path_factory.mktemp("devagent")
    psk = os.urandom(16).hex().encode()
    (d / "psk").write_bytes(psk)
    os.chmod(d / "psk", 0o600)
    a = AgentProcess(
        d, "--psk-file", str(d / "psk"), "--executor", "cpu", "--max-sessions", "1", env=fake_env
    )
    yield a, psk
    a.stop()


def test_inventory_cli_lists_mig(fake_env: dict[str, str]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "host_agent.main", "inventory", "--json", "--executor", "cpu"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **fake_env},
    )
    assert r.returncode == 0, r.stderr
    devs = {d["id"]: d for d in json.loads(r.stdout)["devices"]}
    assert devs[MIG_GPU]["servable"] is False
    assert devs[MIG_A]["kind"] == "mig" and devs[MIG_A]["profile"] == "1g.18gb"
    assert devs[MIG_B]["parent"] == MIG_GPU and devs[MIG_B]["memory_total"] == 71 << 30
    assert devs[WHOLE]["servable"] and "cpu0" not in devs


def test_open_by_uuid_pins_cuda_visible_devices(agent: tuple[AgentProcess, bytes]) -> None:
    a, psk = agent
    c = RawClient(a.port, psk=psk)
    info = c.connect(device=MIG_B)
    assert info["uuid"] == MIG_B and info["mem_quota"] == 71 << 30
    (sess,) = a.wait_sessions()
    assert sess["device"] == MIG_B and sess["env"] == {"CUDA_VISIBLE_DEVICES": MIG_B}
    # --max-sessions 1: the slice is full now.
    c2 = RawClient(a.port, psk=psk)
    c2.hello(), c2.auth()
    assert c2.open(device=MIG_B)[0] == ErrorCode.QUOTA_EXCEEDED
    c.close()
    a.wait_sessions(lambda ss: not ss)
    c3 = RawClient(a.port, psk=psk)
    assert c3.connect(device=MIG_B)["uuid"] == MIG_B  # freed on close
    c3.close()


@pytest.mark.parametrize("device", [MIG_GPU, "GPU-nope", "cpu0"])
def test_open_unknown_or_unservable_device(agent: tuple[AgentProcess, bytes], device: str) -> None:
    a, psk = agent
    c = RawClient(a.port, psk=psk)
    c.hello(), c.auth()
    status, _sid, message, _info = c.open(device=device)
    assert status == ErrorCode.NO_DEVICE and device in message


def test_open_any_spreads_over_devices(agent: tuple[AgentProcess, bytes]) -> None:
    a, psk = agent
    clients = [RawClient(a.port, psk=psk) for _ in range(3)]
    got = {c.connect()["uuid"] for c in clients}
    assert got == {MIG_A, MIG_B, WHOLE}
    extra = RawClient(a.port, psk=psk)
    extra.hello(), extra.auth()
    assert extra.open()[0] == ErrorCode.QUOTA_EXCEEDED  # agent full
    sessions = a.wait_sessions(lambda ss: len(ss) == 3 and all(s.get("env") for s in ss))
    assert {s["env"]["CUDA_VISIBLE_DEVICES"] for s in sessions} == got
    for c in clients:
        c.close()


def test_no_nvml_serves_cpu0(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VPCIE_AGENT_FAKE_NVML"}
    r = subprocess.run(
        [sys.executable, "-m", "host_agent.main", "inventory"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 0
    if "cpu0" in r.stdout:  # a machine without the NVIDIA driver
        assert "not a GPU" in r.stdout
