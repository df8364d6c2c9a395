"""Live migration under a real guest: QEMU 10 (TCG) runs a program on its
vGPU (a loop of H2D / AXPY / D2H, every result checked in the guest) while
``vpcie vgpu migrate`` moves the vGPU between two agents, each in its own
network namespace (pyroute2) reached over a veth from the backend's.

Shown: the program sees no error and its results stay right across the move
(a buffer written before it reads back intact after); with the source agent
SIGKILLed instead, the program's batch fails DEVICE_LOST within 2 s, and
after ``vpcie vgpu migrate`` (the source is dead: the vGPU is bound to the
target empty) a new context of the program works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.integration.agent_helpers import make_pki
from tests.netlab import LabAgent, unavailable
from vpcie.testing.guestvm import (
    USER_DIR,
    GuestRun,
    image_dir,
    run_guest,
    start_backend,
    stop_backend,
)

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]

JOB = Path(__file__).with_name("migrate_guest_job.py")
GUEST_TIMEOUT = 200.0


@pytest.fixture(scope="module", autouse=True)
def _image() -> None:
    if os.environ.get("VPCIE_SKIP_IMAGE") == "1":
        pytest.skip("VPCIE_SKIP_IMAGE=1: setup did not build the guest image")
    image_dir()
    why = unavailable()
    if why:
        pytest.skip(why)


@dataclass
class Lab:
    """Two agent namespaces, each joined to ours by a veth."""

    namespaces: list[str]
    ips: list[str]  # each agent's address, in its namespace


@contextlib.contextmanager
def two_agent_namespaces() -> Iterator[Lab]:
    from pyroute2 import IPRoute, NetNS, netns

    tag = f"{os.getpid() % 100000}"
    net = 16 + os.getpid() % 200
    lab = Lab([f"vpmig-a{tag}", f"vpmig-b{tag}"], [f"10.232.{net}.2", f"10.233.{net}.2"])
    made: list[str] = []
    try:
        for k, ns in enumerate(lab.namespaces):
            netns.create(ns)
            made.append(ns)
            ours, theirs = f"vpmo{k}{tag}"[:15], f"vpmt{k}{tag}"[:15]
            host_ip = lab.ips[k].rsplit(".", 1)[0] + ".1"
            with IPRoute() as ip:
                ip.link("add", ifname=ours, kind="veth", peer=theirs)
                ip.link("set", index=ip.link_lookup(ifname=theirs)[0], net_ns_fd=ns)
                idx = ip.link_lookup(ifname=ours)[0]
                ip.addr("add", index=idx, address=host_ip, prefixlen=24)
                ip.link("set", index=idx, state="up")
            with NetNS(ns) as n:
                idx = n.link_lookup(ifname=theirs)[0]
                n.addr("add", index=idx, address=lab.ips[k], prefixlen=24)
                n.link("set", index=idx, state="up")
                n.link("set", index=n.link_lookup(ifname="lo")[0], state="up")
        yield lab
    finally:
        for ns in made:
            with contextlib.suppress(OSError, FileNotFoundError):
                netns.remove(ns)  # its veth end goes, and the pair with it


async def vpcie(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vpcie.cli.main", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return int(proc.returncode or 0), out.decode(), err.decode()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Lab, list[LabAgent], Path]]:
    """Two agents (mutual TLS, CPU executor), each in its namespace. A sync
    fixture: pyroute2's calls run their own event loop, not inside the test's."""
    with two_agent_namespaces() as lab:
        pki = make_pki(tmp_path / "pki", sans=tuple(lab.ips))
        agents: list[LabAgent] = []
        try:
            for k, (ns, ip) in enumerate(zip(lab.namespaces, lab.ips, strict=True)):
                a = LabAgent(tmp_path / f"agent{k}", ns, ip, pki)
                a.tls_dir = pki
                a.extra_args = ("--cert-name", "agent1", "--name", f"agent{k}")
                agents.append(a.start())  # type: ignore[arg-type]
            yield lab, agents, pki
        finally:
            for a in agents:
                a.stop(timeout=2)


def tls_args(agent: LabAgent, pki: Path) -> list[str]:
    return [
        "--agent",
        f"{agent.host}:{agent.port}",
        "--tls-dir",
        str(pki),
        "--tls-name",
        "backend1",
    ]


async def running_job(sock: str) -> tuple[asyncio.Task[GuestRun], int]:
    """The guest program's ``run`` loop, started and 20 iterations in; with
    the iterations it had done by then."""
    started = asyncio.Event()
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if line.startswith("job: iter 20"):
            started.set()

    guest = asyncio.create_task(
        run_guest(
            sock, f"{USER_DIR}/job.py", ["run", "40"], timeout=GUEST_TIMEOUT,
            on_line=on_line, files={"job.py": JOB},
        )
    )  # fmt: skip
    await asyncio.wait_for(started.wait(), GUEST_TIMEOUT)
    return guest, sum(1 for x in lines if x.startswith("job: iter"))


def ran_on_without_error(run: GuestRun, before: int) -> list[str]:
    """The program went on after the migration (``before`` iterations were
    done when it began), saw no error, and a buffer written before it read
    back intact; its ``job:`` lines."""
    assert not run.timed_out, "\n".join(run.lines[-30:])
    job = [x for x in run.lines if x.startswith("job:")]
    after = sum(1 for x in job if x.startswith("job: iter")) - before
    assert run.exit_code == 0, "\n".join(job[-10:])
    assert after >= 10, "the program did not go on after the migration"
    assert any("kept buffer intact" in x for x in job), job[-3:]
    assert not any("ERROR" in x or "WRONG" in x for x in job)
    return job


async def test_guest_program_runs_on_across_migrate(
    tmp_path: Path, rig: tuple[Lab, list[LabAgent], Path]
) -> None:
    _lab, (src, dst), pki = rig
    proc, sock = start_backend(
        tmp_path, "--bind", f"{src.host}:{src.port}", "--tls-dir", str(pki),
        "--tls-name", "backend1",
    )  # fmt: skip
    ctl = sock + ".ctl"
    try:
        guest, before = await running_job(sock)
        rc, out, err = await vpcie("vgpu", "migrate", "--backend", ctl, *tls_args(dst, pki))
        run = await guest
    finally:
        stop_backend(proc)
    assert rc == 0, err
    assert out.count("\n") == 1 and out.startswith(
        f"migrated: {src.host}:{src.port} device=any auth=tls -> {dst.host}:{dst.port} "
    ), out
    assert "1 contexts" in out
    job = ran_on_without_error(run, before)
    print(out.strip(), "|", job[-1])  # the figures, for -s


async def test_guest_sees_device_lost_when_the_source_dies(
    tmp_path: Path, rig: tuple[Lab, list[LabAgent], Path]
) -> None:
    _lab, (src, dst), pki = rig
    proc, sock = start_backend(
        tmp_path, "--bind", f"{src.host}:{src.port}", "--tls-dir", str(pki),
        "--tls-name", "backend1",
    )  # fmt: skip
    ctl = sock + ".ctl"
    started, lost = asyncio.Event(), asyncio.Event()
    seen: dict[str, float] = {}

    def on_line(line: str) -> None:
        if line.startswith("job: iter 20"):
            started.set()
        if line.startswith("job: DEVICE_LOST"):
            seen["lost"] = time.monotonic()
            lost.set()

    try:
        guest = asyncio.create_task(
            run_guest(
                sock,
                f"{USER_DIR}/job.py",
                ["lost", "120"],
                timeout=GUEST_TIMEOUT,
                on_line=on_line,
                files={"job.py": JOB},
            )
        )
        await asyncio.wait_for(started.wait(), GUEST_TIMEOUT)
        src.kill()
        t_kill = time.monotonic()
        await asyncio.wait_for(lost.wait(), 10)
        rc, out, err = await vpcie("vgpu", "migrate", "--backend", ctl, *tls_args(dst, pki))
        run = await guest
    finally:
        stop_backend(proc)
    assert seen["lost"] - t_kill < 2.0, f"DEVICE_LOST {seen['lost'] - t_kill:.2f} s after the kill"
    assert rc == 0, err
    assert "state lost" in out, out
    job = [x for x in run.lines if x.startswith("job:")]
    assert run.exit_code == 0, "\n".join(job[-10:])
    assert any("new context works" in x for x in job)
    print(f"DEVICE_LOST seen {seen['lost'] - t_kill:.3f} s after the kill |", out.strip())


async def test_guest_program_runs_on_across_pool_migrate(
    tmp_path: Path, rig: tuple[Lab, list[LabAgent], Path]
) -> None:
    """The same program, with the vGPU bound and moved through the pool
    (`vpcie bind`, `vpcie migrate VGPU --to AGENT`: a lease per agent, each
    with its fencing token) rather than the low-level path."""
    _lab, (src, dst), pki = rig
    pool = ["--pool", f"sqlite:///{tmp_path}/pool.db"]
    proc, sock = start_backend(tmp_path, "--name", "vm1")
    ctl = sock + ".ctl"
    try:
        for name, agent in (("agent0", src), ("agent1", dst)):
            rc, out, err = await vpcie(
                "agents", "add", name, "--address", f"{agent.host}:{agent.port}",
                "--tls-dir", str(pki), "--tls-name", "backend1", *pool,
            )  # fmt: skip
            assert rc == 0, err
        rc, out, err = await vpcie(
            "bind", "vm1", "--backend", ctl, "--agent", "agent0", "--memory", "256MiB", *pool
        )
        assert rc == 0, err
        guest, before = await running_job(sock)
        rc, out, err = await vpcie("migrate", "vm1", "--to", "agent1", *pool)
        run = await guest
        lrc, leases, lerr = await vpcie("leases", "--json", *pool)
    finally:
        stop_backend(proc)
    assert rc == 0, err
    assert lrc == 0, lerr
    held = json.loads(leases)
    held = held["leases"] if isinstance(held, dict) else held
    assert [(x["vgpu"], x["agent"], x["state"]) for x in held] == [("vm1", "agent1", "bound")]
    job = ran_on_without_error(run, before)
    print(out.strip(), err.strip(), "|", job[-1])
