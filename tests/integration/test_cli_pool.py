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
from tests.conftest import ROOT, AgentProc, start_agent, wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # real agents, a CLI process per step

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

    rows = {line.split()[1]: line for line in ok(pool_url, "gpus").splitlines()[1:]}
    assert rows["GPU-g1a"].split()[-1] == "MIG-mode"  # listed, its slices are what is leased
    assert " 3g.40gb " in rows["MIG-g1a-3"] and " 40.0GiB " in rows["MIG-g1a-3"]
    assert rows["GPU-g2b"].split()[:3] == ["g2", "GPU-g2b", "gpu"]
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
    assert js(pool_url, "status")["agents"]["cordoned"] == 0  # the agent's uncordon held
    ok(pool_url, "gpus", "uncordon", "g2/GPU-g2a")
    assert not any(g["cordoned"] for g in js(pool_url, "gpus", "--agent", "g2")["gpus"])


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
    # A bind whose backend is not there: one line, and no lease nor vGPU left behind
    add(pool_url, "a", agent)
    r = cli(pool_url, "bind", "vm", "--backend", str(tmp_path / "none.ctl"))
    one_line_error(r, 1, f"no backend listens on {tmp_path / 'none.ctl'}")
    one_line_error(cli(pool_url, "bind", "vm", "--memory", "1TiB"), 1, "no capacity")
    assert js(pool_url, "leases")["leases"] == [] and js(pool_url, "vgpus")["vgpus"] == []

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


# ---- bind, unbind, migrate, drain: real CPU agents, real backends


def cpu_agent(tmp: Path, name: str) -> AgentProc:
    return start_agent(tmp / name, "--name", name, "--state-file", str(tmp / f"{name}.json"))


async def aok(url: str, *args: str) -> str:
    rc, out, err = await acli(url, *args)
    assert rc == 0, f"vpcie {' '.join(args)}: {err or out}"
    return out


async def ajs(url: str, *args: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(await aok(url, *args, "--json"))
    return doc


async def add_cpu_agents(url: str, *agents: tuple[str, AgentProc]) -> None:
    for name, a in agents:
        await aok(url, "agents", "add", name, "--address", a.address, "--psk-file", str(a.psk_file))


def sessions(state_file: Path) -> list[dict[str, Any]]:
    try:
        got: list[dict[str, Any]] = json.loads(state_file.read_text())["sessions"]
    except (OSError, ValueError, KeyError):
        return []
    return got


async def test_bind_unbind_through_the_pool(pool_url: str, tmp_path: Path) -> None:
    from tests.conftest import until
    from tests.integration.test_vgpu_device import alloc, rig
    from vpcie.control.client import control_request
    from vpcie.errors import ErrorCode
    from vpcie.protocol.batch import rec
    from vpcie.protocol.codes import Opcode

    a1 = cpu_agent(tmp_path, "a1")
    try:
        async with rig(tmp_path) as r:
            await add_cpu_agents(pool_url, ("a1", a1))
            # Bound by hand already: the backend refuses the pool's bind, and
            # the lease reserved for it is released again.
            manual = ("--agent", a1.address, "--psk-file", str(a1.psk_file))
            await aok(pool_url, "vgpu", "bind", "--backend", r.control, *manual)
            rc, out, err = await acli(pool_url, "bind", "vm1", "--backend", r.control)
            assert rc == 1 and "refused bind" in err and err.count("\n") == 1, err
            assert (await ajs(pool_url, "leases"))["leases"] == []
            await aok(pool_url, "vgpu", "unbind", "--backend", r.control)

            doc = await ajs(pool_url, "bind", "vm1", "--backend", r.control, "--memory", "64MiB")
            lease = doc["lease"]
            assert (lease["state"], lease["agent"], lease["gpu"]) == ("bound", "a1", "cpu0")
            assert doc["bound"].startswith(a1.address) and doc["vgpu"]["socket"] == r.control
            st = await control_request(r.control, {"op": "status"})
            assert st["binding"] == "bound" and a1.address in st["target"]
            # A guest context opens its session with the lease's token and quota.
            ctx = await r.gpu.open("prog")
            await alloc(ctx, 4096)
            state = tmp_path / "a1.json"
            got = await until(lambda: sessions(state), 10, "a session in the agent's state file")
            assert [s["lease_token"] for s in got] == [lease["token"]]
            over = await ctx.run([rec(Opcode.MEM_ALLOC, 128 << 20, 0)])
            assert over.status == ErrorCode.QUOTA_EXCEEDED  # the lease's 64 MiB
            rc, out, err = await acli(pool_url, "bind", "vm1", "--memory", "1MiB")
            assert rc == 1 and "already bound" in err and err.count("\n") == 1

            out = await aok(pool_url, "unbind", "vm1")
            assert out.startswith("unbound vm1: backend unbound") and lease["id"] in out
            assert (await control_request(r.control, {"op": "status"}))["binding"] == "unbound"
            assert (await ajs(pool_url, "leases"))["leases"] == []
            # Fencing: the device was leased through the pool, so the pool-less
            # path (token 0) is refused by the agent from now on.
            rc, out, err = await acli(pool_url, "vgpu", "bind", "--backend", r.control, *manual)
            assert rc == 1 and "STALE_LEASE" in err, err
            # bound again through the pool: a new lease, a larger token, accepted
            out = await aok(pool_url, "bind", "vm1", "--memory", "64MiB")
            assert out.startswith(f"bound vm1: {a1.address}"), out
            (again,) = (await ajs(pool_url, "leases"))["leases"]
            assert again["token"] > lease["token"] and f"token {again['token']}" in out
            await aok(pool_url, "unbind", "vm1")
    finally:
        a1.stop()


async def test_migrate_keeps_the_data(pool_url: str, tmp_path: Path) -> None:
    from tests.integration.test_vgpu_device import alloc, rig
    from vpcie.control.client import control_request
    from vpcie.errors import ErrorCode
    from vpcie.protocol.batch import rec
    from vpcie.protocol.codes import Opcode

    a1, a2 = cpu_agent(tmp_path, "a1"), cpu_agent(tmp_path, "a2")
    try:
        async with rig(tmp_path) as r:
            await add_cpu_agents(pool_url, ("a1", a1), ("a2", a2))
            await aok(pool_url, "bind", "vm1", "--backend", r.control, "--memory", "64MiB",
                      "--agent", "a1")  # fmt: skip
            old = (await ajs(pool_url, "leases"))["leases"][0]
            ctx = await r.gpu.open("prog")
            blob = os.urandom(1 << 20)
            src = await ctx.create_bo(len(blob), scatter=True)
            src.write(blob)
            (h,) = await alloc(ctx, len(blob))
            reply = await ctx.run([rec(Opcode.COPY_H2D, h, src.resource_id, 0, 0, len(blob))])
            assert reply.status == ErrorCode.OK

            rc, out, err = await acli(pool_url, "migrate", "vm1", "--json")
            assert rc == 0, err
            doc = json.loads(out)
            assert (doc["from"], doc["to"]) == ("a1/cpu0", "a2/cpu0")
            assert doc["released"] == old["id"] and doc["token"] > old["token"]
            assert doc["backend"]["contexts"] == 1 and not doc["backend"]["state_lost"]
            assert doc["backend"]["state_bytes"] >= len(blob)
            assert "vm1: moving from a1/cpu0 to a2/cpu0" in err  # progress on stderr
            assert "vm1: now on a2/cpu0" in err

            # The guest's handle reads its data back, from the new agent.
            dst = await ctx.create_bo(len(blob))
            reply = await ctx.run([rec(Opcode.COPY_D2H, h, dst.resource_id, 0, 0, len(blob))])
            assert reply.status == ErrorCode.OK and dst.read() == blob
            st = await control_request(r.control, {"op": "status"})
            assert a2.address in st["target"]
            (now,) = (await ajs(pool_url, "leases"))["leases"]
            assert (now["agent"], now["state"], now["id"]) == ("a2", "bound", doc["lease"])

            # and back, onto a named agent (the table line for people)
            rc, out, err = await acli(pool_url, "migrate", "vm1", "--to", "a1")
            assert rc == 0 and out.startswith("migrated vm1: a2/cpu0 -> a1/cpu0, lease "), err
            assert "1 contexts" in out and out.count("\n") == 1
            dst.write(bytes(len(blob)))  # what is read next comes from a1 again
            reply = await ctx.run([rec(Opcode.COPY_D2H, h, dst.resource_id, 0, 0, len(blob))])
            assert reply.status == ErrorCode.OK and dst.read() == blob
            (now,) = (await ajs(pool_url, "leases"))["leases"]
            assert now["agent"] == "a1"

            # migrating onto an agent that is not in the pool: refused, nothing changes
            rc, out, err = await acli(pool_url, "migrate", "vm1", "--to", "a9")
            assert rc == 1 and "no agent named a9" in err
            assert (await ajs(pool_url, "leases"))["leases"] == [now]
            await aok(pool_url, "unbind", "vm1")
    finally:
        a1.stop()
        a2.stop()


async def test_drain_moves_what_it_can_and_reports_the_rest(pool_url: str, tmp_path: Path) -> None:
    from tests.integration.test_vgpu_device import rig

    a1, a2 = cpu_agent(tmp_path, "a1"), cpu_agent(tmp_path, "a2")
    sock2 = tmp_path / "vm2.sock"
    be2 = subprocess.Popen(
        [sys.executable, "-m", "vpcie.backend_main", "--socket-path", str(sock2)],
        cwd=ROOT, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with rig(tmp_path) as r:
            await add_cpu_agents(pool_url, ("a1", a1), ("a2", a2))
            ctl2 = f"{sock2}.ctl"
            wait_for(lambda: Path(ctl2).exists(), 20, "vm2's control socket")
            for vm, ctl in (("vm1", r.control), ("vm2", ctl2)):
                await aok(pool_url, "bind", vm, "--backend", ctl, "--memory", "16MiB",
                          "--agent", "a1")  # fmt: skip
            # vm2's backend goes away: its vGPU cannot be moved (nothing to tell)
            be2.terminate()
            be2.wait(10)

            rc, out, err = await acli(pool_url, "drain", "a1")
            assert rc == 1, (out, err)
            assert "drain a1: cordoned; 2 vGPU(s) to move" in err
            assert "vm1: now on a2/cpu0" in err and "drain a1: vm2 cannot move:" in err
            assert out.startswith("drained a1: 1 moved, 1 could not move")
            assert "  moved vm1 -> a2/cpu0" in out and "  STAYED vm2: " in out
            where = {x["vgpu"]: (x["agent"], x["state"]) for x in
                     (await ajs(pool_url, "leases"))["leases"]}  # fmt: skip
            assert where == {"vm1": ("a2", "bound"), "vm2": ("a1", "bound")}
            agents = {a["name"]: a for a in (await ajs(pool_url, "agents"))["agents"]}
            assert agents["a1"]["cordoned"] and not agents["a2"]["cordoned"]

            # with vm2 released, a drain has nothing left to refuse
            vm2 = [x for x in (await ajs(pool_url, "leases"))["leases"] if x["vgpu"] == "vm2"]
            await aok(pool_url, "release", vm2[0]["id"])
            rc, out, err = await acli(pool_url, "drain", "a1", "--json")
            assert rc == 0 and json.loads(out) == {"ok": True, "agent": "a1", "moved": [],
                                                   "failed": []}  # fmt: skip
            await aok(pool_url, "unbind", "vm1")
    finally:
        be2.kill()
        be2.wait(10)
        a1.stop()
        a2.stop()


# ---- vpcie-agent serve --pool: the registrar


def health(url: str, name: str) -> str:
    r = cli(url, "agents", "--json")
    if r.returncode != 0:
        return f"error: {r.stderr.strip()}"
    for a in json.loads(r.stdout)["agents"]:
        if a["name"] == name:
            return str(a["health"])
    return "absent"


def registrar_pids(agent_pid: int) -> list[int]:
    from tests.integration.agent_helpers import children

    out = []
    for pid in children(agent_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"vpcie.fleet.registrar" in cmd:
            out.append(pid)
    return out


def test_registered_agent_goes_down_when_killed(pool_url: str, tmp_path: Path) -> None:
    import time

    ttl = 2
    a = start_agent(tmp_path / "reg", "--name", "reg1", "--pool", pool_url,
                    "--pool-ttl", str(ttl))  # fmt: skip
    try:
        wait_for(lambda: health(pool_url, "reg1") == "up", 30, "reg1 registered and up")
        (rec,) = js(pool_url, "agents")["agents"]
        assert rec["registered"] and rec["address"] == a.address
        assert rec["auth"] == {"psk_file": str(a.psk_file)}
        assert [g["id"] for g in js(pool_url, "gpus", "--agent", "reg1")["gpus"]] == ["cpu0"]
        lease = js(pool_url, "reserve", "v1", "--memory", "1MiB", "--agent", "reg1")["lease"]
        ok(pool_url, "release", lease["id"])
        # The agent and its registrar die together (SIGKILL to the group): no
        # one revokes the alive key; it expires.
        t0 = time.monotonic()
        a.kill()
        wait_for(lambda: health(pool_url, "reg1") == "down", ttl + 5, "reg1 down after its TTL")
        # Expiry, not a revoke: the key outlives the last keepalive by the TTL,
        # and that keepalive came at most a tick (ttl/3) before the kill.
        assert time.monotonic() - t0 >= ttl * 2 / 3 - 0.25
        r = cli(pool_url, "reserve", "v2", "--memory", "1MiB", "--agent", "reg1")
        one_line_error(r, 1, "no capacity", "down")
    finally:
        a.stop()


def test_registrar_dies_with_its_agent_and_revokes(pool_url: str, tmp_path: Path) -> None:
    import signal

    a = start_agent(tmp_path / "reg", "--name", "reg2", "--pool", pool_url, "--pool-ttl", "60")
    try:
        wait_for(lambda: health(pool_url, "reg2") == "up", 30, "reg2 registered and up")
        (child,) = registrar_pids(a.proc.pid)
        os.kill(a.proc.pid, signal.SIGKILL)  # the agent's main process only
        # PR_SET_PDEATHSIG stops the registrar, which revokes the key: "down"
        # long before the 60 s TTL.
        wait_for(lambda: health(pool_url, "reg2") == "down", 10, "reg2 down at once")
        from tests.integration.agent_helpers import alive

        wait_for(lambda: not alive(child), 10, "the registrar gone with its agent")
    finally:
        a.kill()


def test_agent_pool_options_are_checked(tmp_path: Path) -> None:
    psk = tmp_path / "psk"
    psk.write_text("lab-secret-0123456789")
    psk.chmod(0o600)
    base = [sys.executable, "-m", "host_agent.main", "serve", "--listen", "127.0.0.1:0",
            "--psk-file", str(psk), "--executor", "cpu"]  # fmt: skip
    for extra, word in (
        (["--pool", "ftp://x"], "ftp://x"),
        (["--pool", "/tmp/p.db", "--pool-ttl", "0.5"], "--pool-ttl"),
        (["--pool-address", "h:1"], "needs --pool"),
    ):
        r = subprocess.run([*base, *extra], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 2 and word in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_tls_agents_with_the_fleet_pki(tmp_path: Path) -> None:
    """Mutual TLS: ``agents add`` takes the PKI folder of vpcie.toml, and a
    TLS agent started with --pool registers itself with a client certificate."""
    from tests.conftest import free_port, tls_agent_proc, wait_port
    from tests.integration.agent_helpers import make_pki

    pki = make_pki(tmp_path / "pki")
    url = f"sqlite://{tmp_path}/pool.db"
    conf = tmp_path / "vpcie.toml"
    conf.write_text(f'pool = "{url}"\npki = "{pki}"\n')
    env = {**os.environ, "VPCIE_CONFIG": str(conf)}
    env.pop("VPCIE_POOL", None)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*VPCIE, *args], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=60)  # fmt: skip

    with tls_agent_proc(pki) as port:
        r = run("agents", "add", "t1", "--address", f"127.0.0.1:{port}", "--tls-name", "backend1")
        assert r.returncode == 0 and "added agent t1" in r.stdout, r.stderr
        r = run("agents", "add", "t2", "--address", f"127.0.0.1:{port}", "--tls-name", "nobody")
        assert r.returncode == 2 and "nobody.crt" in r.stderr and r.stderr.count("\n") == 1
    (t1,) = json.loads(run("agents", "--json").stdout)["agents"]
    assert t1["auth"] == {"tls_dir": str(pki), "tls_name": "backend1"}

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "host_agent.main", "serve", "--listen", f"127.0.0.1:{port}",
         "--tls-dir", str(pki), "--cert-name", "agent1", "--executor", "cpu", "--name", "t3",
         "--pool", url, "--pool-tls-name", "backend1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_port("127.0.0.1", port, proc)
        wait_for(lambda: health(url, "t3") == "up", 30, "the TLS agent t3 registered")
        t3 = [a for a in json.loads(run("agents", "--json").stdout)["agents"] if a["name"] == "t3"]
        assert t3[0]["auth"] == {"tls_dir": str(pki), "tls_name": "backend1"}
    finally:
        proc.terminate()
        proc.wait(10)
    # a stopped agent's registrar revokes its key on the way out
    wait_for(lambda: health(url, "t3") == "down", 10, "t3 down once stopped")
