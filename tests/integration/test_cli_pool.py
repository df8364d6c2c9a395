"""The ``vpcie`` pool verbs through the real CLI (subprocesses), on both
stores (``pool_url``: a fresh SQLite file, or a key prefix of the suite's
etcd), with real agents: fake-NVML ones where GPUs and MIG slices are needed,
CPU-executor ones behind real backends for bind, migrate and drain."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from host_agent.nvml import FAKE_NVML_ENV
from tests.conftest import ROOT, AgentProc, start_agent

pytestmark = pytest.mark.timeout(120)

VPCIE = [sys.executable, "-m", "vpcie.cli.main"]
GiB = 1 << 30

# Two GPU hosts: g1 has an H100 split in MIG slices, g2 two whole H100s.
FLEET = {
    "g1": {
        "gpus": [
            {
                "uuid": "GPU-g1a",
                "name": "NVIDIA H100 80GB HBM3",
                "memory": 80 * GiB,
                "mig": [
                    {"uuid": "MIG-g1a-1", "name": "NVIDIA H100 MIG 1g.10gb", "memory": 10 * GiB},
                    {"uuid": "MIG-g1a-2", "name": "NVIDIA H100 MIG 1g.10gb", "memory": 10 * GiB},
                    {"uuid": "MIG-g1a-3", "name": "NVIDIA H100 MIG 3g.40gb", "memory": 40 * GiB},
                ],
            }
        ]
    },
    "g2": {
        "gpus": [
            {"uuid": "GPU-g2a", "name": "NVIDIA H100 80GB HBM3", "memory": 80 * GiB},
            {"uuid": "GPU-g2b", "name": "NVIDIA H100 80GB HBM3", "memory": 80 * GiB},
        ]
    },
}


def cli(
    url: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VPCIE, "--pool", url, *args],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
        env=env,
    )


def ok(url: str, *args: str) -> str:
    r = cli(url, *args)
    assert r.returncode == 0, f"vpcie {' '.join(args)}: {r.stderr or r.stdout}"
    return r.stdout


def js(url: str, *args: str) -> dict[str, Any]:
    out = ok(url, *args, "--json")
    assert out.count("\n") == 1, out  # one object, one line
    doc: dict[str, Any] = json.loads(out)
    assert doc["ok"] is True
    return doc


def one_line_error(r: subprocess.CompletedProcess[str], status: int, *words: str) -> str:
    """A failure for people: exit ``status``, nothing on stdout, one line on stderr."""
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "" and r.stderr.startswith("vpcie: error: "), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
    return r.stderr


async def acli(url: str, *args: str, timeout: float = 90) -> tuple[int, str, str]:
    """The CLI from an asyncio test (the backend under test runs in this loop)."""
    p = await asyncio.create_subprocess_exec(
        *VPCIE, "--pool", url, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(p.communicate(), timeout)
    assert p.returncode is not None
    return p.returncode, out.decode(), err.decode()


def fake_gpu_agent(tmp: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> AgentProc:
    """A real agent whose NVML is the fake (the hardware boundary): GPUs and
    MIG slices in its inventory, the CPU executor behind them."""
    spec = tmp / f"{name}-nvml.json"
    spec.write_text(json.dumps(FLEET[name]))
    with monkeypatch.context() as m:
        m.setenv(FAKE_NVML_ENV, str(spec))
        return start_agent(tmp / name, "--name", name)


@pytest.fixture
def gpu_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    agents = [fake_gpu_agent(tmp_path, n, monkeypatch) for n in ("g1", "g2")]
    yield agents
    for a in agents:
        a.stop()


def add(url: str, name: str, agent: AgentProc, *extra: str) -> str:
    return ok(url, "agents", "add", name, "--address", agent.address,
              "--psk-file", str(agent.psk_file), *extra)  # fmt: skip


# ---- agents, gpus, status, reserve, release on fake-NVML agents


def test_agents_gpus_status(pool_url: str, gpu_fleet: list[AgentProc]) -> None:
    g1, g2 = gpu_fleet
    assert "no agents" in ok(pool_url, "agents")
    assert add(pool_url, "g1", g1, "--label", "rack=a").startswith(
        f"added agent g1 at {g1.address}: 4 devices, 3 servable"
    )
    add(pool_url, "g2", g2)
    table = ok(pool_url, "agents").splitlines()
    assert table[0].split() == [
        "NAME", "ADDRESS", "HEALTH", "CORDON", "DEVICES", "LEASES", "HEARTBEAT", "LABELS",
    ]  # fmt: skip
    assert table[1].split()[:6] == ["g1", g1.address, "up", "-", "3", "0"]
    assert table[1].split()[-1] == "rack=a"
    agents = {a["name"]: a for a in js(pool_url, "agents")["agents"]}
    assert agents["g2"]["health"] == "up" and agents["g2"]["version"] >= 2
    assert agents["g1"]["auth"] == {"psk_file": str(g1.psk_file)}

    rows = {line.split()[1]: line.split() for line in ok(pool_url, "gpus").splitlines()[1:]}
    assert rows["GPU-g1a"][-1] == "MIG" and rows["MIG-g1a-3"][4] == "3g.40gb"
    assert rows["GPU-g2b"][:3] == ["g2", "GPU-g2b", "gpu"]
    gpus = {g["id"]: g for g in js(pool_url, "gpus", "--agent", "g1")["gpus"]}
    assert set(gpus) == {"GPU-g1a", "MIG-g1a-1", "MIG-g1a-2", "MIG-g1a-3"}
    assert gpus["MIG-g1a-1"]["model"] == "NVIDIA H100 80GB HBM3"
    assert gpus["MIG-g1a-1"]["memory_total"] == 10 * GiB and not gpus["GPU-g1a"]["servable"]

    st = js(pool_url, "status")
    assert st["agents"]["up"] == 2 and st["gpus"]["mig"] == 3 and st["gpus"]["gpu"] == 2
    assert st["memory"]["total"] == 220 * GiB and st["memory"]["booked"] == 0
    human = ok(pool_url, "status")
    assert f"pool    : {pool_url} (from --pool)" in human and "2 up" in human

    # cordon / uncordon an agent and a device; refresh; the table follows
    ok(pool_url, "agents", "cordon", "g2")
    assert ok(pool_url, "agents").splitlines()[2].split()[3] == "cordoned"
    assert js(pool_url, "status")["agents"]["cordoned"] == 1
    ok(pool_url, "agents", "uncordon", "g2")
    ok(pool_url, "gpus", "cordon", "g2/GPU-g2a")
    assert {g["id"]: g["cordoned"] for g in js(pool_url, "gpus", "--agent", "g2")["gpus"]} == {
        "GPU-g2a": True,
        "GPU-g2b": False,
    }
    assert ok(pool_url, "agents", "refresh", "g2").startswith("agent g2: 2 devices")
    assert js(pool_url, "gpus", "--agent", "g2")["gpus"][0]["cordoned"]  # kept by a refresh


def test_reserve_release_leases(pool_url: str, gpu_fleet: list[AgentProc]) -> None:
    g1, g2 = gpu_fleet
    add(pool_url, "g1", g1)
    add(pool_url, "g2", g2)
    slice_ = js(pool_url, "reserve", "v1", "--profile", "1g.10gb", "--owner", "ops")["lease"]
    assert (slice_["agent"], slice_["gpu"][:7], slice_["exclusive"]) == ("g1", "MIG-g1a", True)
    assert slice_["memory"] == 10 * GiB and slice_["token"] > 0 and slice_["owner"] == "ops"
    whole = js(pool_url, "reserve", "v2", "--whole", "--model", "h100 80gb")["lease"]
    assert whole["agent"] == "g2" and whole["memory"] == 80 * GiB
    shared = ok(pool_url, "reserve", "v3", "--memory", "30GiB", "--agent", "g2")
    assert shared.startswith("reserved lease ") and "-> g2/GPU-g2" in shared
    assert whole["token"] > slice_["token"]  # tokens grow: they fence older leases

    leases = js(pool_url, "leases")["leases"]
    assert sorted(x["vgpu"] for x in leases) == ["v1", "v2", "v3"]
    assert [x["vgpu"] for x in js(pool_url, "leases", "--agent", "g1")["leases"]] == ["v1"]
    table = ok(pool_url, "leases", "--vgpu", "v2").splitlines()
    assert table[0].split()[:3] == ["LEASE", "VGPU", "DEVICE"] and whole["id"] in table[1]
    booked = {g["id"]: g["booked"] for g in js(pool_url, "gpus", "--agent", "g2")["gpus"]}
    assert sorted(booked.values()) == [30 * GiB, 80 * GiB]
    vg = ok(pool_url, "vgpus").splitlines()
    assert [v.split()[0] for v in vg[1:]] == ["v1", "v2", "v3"]
    assert js(pool_url, "status")["memory"]["booked"] == 120 * GiB

    r = cli(pool_url, "reserve", "v4", "--memory", "60GiB")
    one_line_error(r, 1, "no capacity", "memory=60 GiB")
    r = cli(pool_url, "reserve", "v4", "--profile", "7g.80gb")
    one_line_error(r, 1, "no capacity")
    r = cli(pool_url, "agents", "remove", "g2")  # holds leases
    one_line_error(r, 1, "g2", "lease")

    assert ok(pool_url, "release", whole["id"]) == f"released lease {whole['id']}\n"
    assert js(pool_url, "release", slice_["id"])["released"] == slice_["id"]
    left = js(pool_url, "leases")["leases"]
    assert [x["vgpu"] for x in left] == ["v3"]
    ok(pool_url, "agents", "remove", "g2", "--force")
    assert js(pool_url, "leases")["leases"] == []
    assert [a["name"] for a in js(pool_url, "agents")["agents"]] == ["g1"]
    ok(pool_url, "vgpus", "remove", "v3")
    ok(pool_url, "vgpus", "add", "v9", "--socket", "/run/x/v9.ctl", "--domain", "dom9")
    v9 = [v for v in js(pool_url, "vgpus")["vgpus"] if v["name"] == "v9"]
    assert v9 == [{"name": "v9", "socket": "/run/x/v9.ctl", "domain": "dom9", "lease": ""}]


# ---- errors and help


def test_errors_are_one_line(pool_url: str, agent: AgentProc, tmp_path: Path) -> None:
    one_line_error(cli(pool_url, "agents", "cordon", "nope"), 1, "no agent named nope")
    one_line_error(cli(pool_url, "release", "feedbeef"), 1, "no lease feedbeef")
    one_line_error(cli(pool_url, "unbind", "ghost"), 1, "no vGPU")
    one_line_error(cli(pool_url, "migrate", "ghost"), 1, "no vGPU")
    one_line_error(cli(pool_url, "drain", "nope"), 1, "no agent named nope")
    r = cli(pool_url, "agents", "add", "x", "--address", "127.0.0.1:1", "--psk-file",
            str(agent.psk_file))  # fmt: skip
    one_line_error(r, 1, "agent at 127.0.0.1:1")
    wrong = tmp_path / "wrong.psk"
    wrong.write_text("not-the-key-0123456789")
    r = cli(pool_url, "agents", "add", "x", "--address", agent.address, "--psk-file", str(wrong))
    one_line_error(r, 1, "PERMISSION_DENIED")
    r = cli(pool_url, "agents", "add", "x", "--address", agent.address, "--psk-file", "/no/such")
    one_line_error(r, 2, "/no/such")
    r = cli(pool_url, "agents", "add", "x", "--address", "nocolon", "--psk-file", str(wrong))
    one_line_error(r, 2, "HOST:PORT")
    assert js(pool_url, "agents")["agents"] == []  # nothing half-added

    # bad input: exit 2, before anything is done
    for args in (
        ("reserve", "v", "--memory", "lots"),
        ("reserve", "v", "--memory", "1G", "--whole"),
        ("migrate", "v", "--to", "a/"),
        ("gpus", "cordon"),
        ("agents", "frobnicate"),
    ):
        r = cli(pool_url, *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr
    one_line_error(cli("ftp://nowhere", "agents"), 2, "ftp://nowhere")

    # --json: the failure is one JSON object on stdout
    r = cli(pool_url, "release", "feedbeef", "--json")
    assert r.returncode == 1 and r.stderr == ""
    assert json.loads(r.stdout) == {"ok": False, "error": "no lease feedbeef in the pool",
                                    "status": 1}  # fmt: skip


def test_store_down_is_one_line(tmp_path: Path) -> None:
    from tests.conftest import free_port

    r = cli(f"etcd://127.0.0.1:{free_port()}", "agents")
    one_line_error(r, 1, "127.0.0.1")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    r = cli(f"sqlite://{not_a_folder}/pool.db", "agents")
    one_line_error(r, 1, str(not_a_folder))


def test_config_file_and_environment(tmp_path: Path) -> None:
    conf = tmp_path / "vpcie.toml"
    db = tmp_path / "from-file.db"
    conf.write_text(f'pool = "sqlite://{db}"\n')
    env = {**os.environ, "VPCIE_CONFIG": str(conf)}
    env.pop("VPCIE_POOL", None)
    r = subprocess.run([*VPCIE, "status"], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0 and f"sqlite://{db} (from {conf})" in r.stdout, r.stderr
    env["VPCIE_POOL"] = f"sqlite://{tmp_path}/from-env.db"
    r = subprocess.run([*VPCIE, "status", "--json"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=60)  # fmt: skip
    assert json.loads(r.stdout)["pool"] == env["VPCIE_POOL"]
    conf.write_text("pool = [1]\n")
    r = subprocess.run([*VPCIE, "status"], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=60)  # fmt: skip
    one_line_error(r, 2, str(conf))


VERBS = [
    ("agents",), ("agents", "add"), ("agents", "cordon"), ("gpus",), ("vgpus",), ("leases",),
    ("status",), ("reserve",), ("release",), ("bind",), ("unbind",), ("migrate",), ("drain",),
]  # fmt: skip


def test_help_of_every_verb_has_examples() -> None:
    for verb in VERBS:
        r = subprocess.run([*VPCIE, *verb, "--help"], capture_output=True, text=True,
                           cwd=ROOT, timeout=60)  # fmt: skip
        assert r.returncode == 0 and "examples:" in r.stdout, verb
        assert f"vpcie {verb[0]}" in r.stdout.split("examples:")[1], verb
    top = subprocess.run([*VPCIE, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    for verb in {v[0] for v in VERBS}:
        assert f"    {verb}" in top.stdout
