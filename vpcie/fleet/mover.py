"""Move vGPUs between agents: ``migrate`` one vGPU, ``drain`` an agent.

migrate: reserve a lease like the current one elsewhere (another agent
unless ``--to`` names one), mark the current lease "migrating", have the
backend move its state to the new lease's device (control op ``migrate``,
with the new lease's fencing token), then release the old lease. If
anything fails, the new lease is released and the old one is bound again:
the vGPU keeps running where it was.

drain: cordon the agent (nothing new lands there), then migrate every
vGPU holding a lease on it, one at a time; what cannot move is reported,
never dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vpcie.control.client import MIGRATE_TIMEOUT_S
from vpcie.errors import VpcieError
from vpcie.fleet import backends
from vpcie.fleet.agents import find_agent
from vpcie.fleet.binder import LIVE, get_vgpu, live_lease
from vpcie.pool.errors import NotFound, PoolError
from vpcie.pool.model import Gpu, Lease, Request
from vpcie.pool.pool import Pool

Progress = Callable[[str], None]


@dataclass(frozen=True)
class MoveResult:
    vgpu: str
    old: Lease
    new: Lease
    report: dict[str, Any]  # the backend's migrate answer ({} for a lease not bound yet)
    seconds: float


@dataclass
class DrainReport:
    agent: str
    moved: list[MoveResult] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (vgpu, one-line reason)


def parse_to(text: str | None) -> tuple[str, str]:
    """``AGENT`` or ``AGENT/GPU`` -> (agent, gpu); ("", "") for None."""
    if not text:
        return "", ""
    agent, _, gpu = text.partition("/")
    if not agent or (_ and not gpu):
        raise ValueError(f"--to {text!r}: expected AGENT or AGENT/GPU")
    return agent, gpu


def like(lease: Lease, gpu: Gpu | None, to: tuple[str, str]) -> Request:
    """A request for a device like the one ``lease`` holds: the same MIG
    profile for a slice, a whole device for an exclusive lease, else the
    same memory; on ``to`` if given, else on any other agent."""
    agent, gpu_id = to
    exclude = () if agent else (lease.agent,)
    if gpu is not None and gpu.kind == "mig" and gpu.profile:
        return Request(profile=gpu.profile, agent=agent, gpu=gpu_id, exclude_agents=exclude)
    if lease.exclusive:
        return Request(whole=True, agent=agent, gpu=gpu_id, exclude_agents=exclude)
    return Request(memory=lease.memory, agent=agent, gpu=gpu_id, exclude_agents=exclude)


async def migrate(
    pool: Pool, name: str, owner: str, to: str | None = None, progress: Progress | None = None
) -> MoveResult:
    say = progress or (lambda line: None)
    t0 = time.monotonic()
    vgpu = await get_vgpu(pool, name)
    old = await live_lease(pool, name)
    if old is None:
        raise NotFound(f"vGPU {name} holds no lease: nothing to migrate (vpcie bind {name})")
    if old.state == "migrating":
        raise PoolError(f"vGPU {name} is already migrating (lease {old.id})")
    target = parse_to(to)
    if target[0]:
        await find_agent(pool, target[0])  # an unknown --to is its own error, not "no capacity"
    gpus = {g.id: g for g in await pool.gpus(agent=old.agent)}
    new = await pool.reserve(name, like(old, gpus.get(old.gpu), target), owner)
    say(f"{name}: moving from {old.agent}/{old.gpu} to {new.agent}/{new.gpu} (lease {new.id})")
    bound = old.state == "bound"
    try:
        await pool.set_lease_state(old.id, "migrating")
        report: dict[str, Any] = {}
        if bound:
            agent = await find_agent(pool, new.agent)
            report = await backends.call(
                vgpu.socket,
                "migrate",
                backends.target_fields(agent, new),
                MIGRATE_TIMEOUT_S,
            )
    except BaseException:
        await pool.release(new.id)
        await pool.set_lease_state(old.id, old.state)
        raise
    await pool.set_lease_state(new.id, "bound" if bound else "reserved")
    await pool.release(old.id)
    done = time.monotonic() - t0
    say(f"{name}: now on {new.agent}/{new.gpu} ({summary(report, done)})")
    return MoveResult(name, old, new, report, done)


def summary(report: dict[str, Any], seconds: float) -> str:
    """The backend's migrate report in a few words (progress and CLI lines)."""
    if not report:
        return f"lease moved, not bound, {seconds * 1e3:.0f} ms"
    lost = ", STATE LOST (source gone)" if report.get("state_lost") else ""
    return (
        f"{report.get('contexts', 0)} contexts, {report.get('state_bytes', 0) / (1 << 20):.1f} "
        f"MiB, stun {report.get('stun_ms', 0):.0f} ms, total {seconds * 1e3:.0f} ms{lost}"
    )


async def drain(
    pool: Pool, agent: str, owner: str, progress: Progress | None = None
) -> DrainReport:
    say = progress or (lambda line: None)
    await find_agent(pool, agent)
    await pool.cordon_agent(agent, True)
    leases = [lease for lease in await pool.leases(agent=agent) if lease.state in LIVE]
    say(f"drain {agent}: cordoned; {len(leases)} vGPU(s) to move")
    report = DrainReport(agent)
    for i, lease in enumerate(leases, 1):
        say(f"drain {agent}: [{i}/{len(leases)}] {lease.vgpu}")
        try:
            report.moved.append(await migrate(pool, lease.vgpu, owner, progress=say))
        except VpcieError as exc:  # this vGPU stays; the next may still move
            say(f"drain {agent}: {lease.vgpu} cannot move: {exc}")
            report.failed.append((lease.vgpu, str(exc)))
    left = len(report.failed)
    say(f"drain {agent}: {len(report.moved)} moved, {left} could not move")
    return report
