"""Bind a vGPU through the pool: reserve a lease, tell the backend to open
its sessions with the lease's agent, device, quota and fencing token, mark
the lease bound. Unbind: the backend first, then the lease is released.

A failure after the reserve releases the lease again: a lease never stays
booked for a backend that is not using it because we failed half way.
"""

from __future__ import annotations

from dataclasses import dataclass

from vpcie.fleet import backends
from vpcie.fleet.agents import find_agent
from vpcie.pool.errors import Conflict, NotFound
from vpcie.pool.model import Lease, Request, Vgpu
from vpcie.pool.pool import Pool

LIVE = ("reserved", "bound", "migrating")


@dataclass(frozen=True)
class BindResult:
    vgpu: Vgpu
    lease: Lease
    bound: str  # the backend's description of its new binding


@dataclass(frozen=True)
class UnbindResult:
    vgpu: Vgpu
    lease: Lease
    backend_was: str | None  # what the backend said it unbound; None: no backend there


async def find_vgpu(pool: Pool, name: str) -> Vgpu | None:
    for v in await pool.vgpus():
        if v.name == name:
            return v
    return None


async def get_vgpu(pool: Pool, name: str) -> Vgpu:
    v = await find_vgpu(pool, name)
    if v is None:
        raise NotFound(f"no vGPU {name!r} in the pool (vpcie vgpus)")
    return v


async def live_lease(pool: Pool, vgpu: str) -> Lease | None:
    """The vGPU's lease that is not released, if any."""
    for lease in await pool.leases(vgpu=vgpu):
        if lease.state in LIVE:
            return lease
    return None


async def ensure_vgpu(pool: Pool, name: str, socket: str | None, domain: str = "") -> Vgpu:
    """The vGPU record, added on first use (its control socket: ``socket``, or
    the managed backend's default). A different socket for a known vGPU is
    refused rather than silently changed."""
    v = await find_vgpu(pool, name)
    if v is None:
        v = Vgpu(name=name, socket=socket or backends.default_socket(name), domain=domain, lease="")
        await pool.add_vgpu(v)
        return v
    if socket and socket != v.socket:
        raise Conflict(
            f"vGPU {name} is recorded with control socket {v.socket}, not {socket} "
            "(vpcie vgpus remove it first to change it)"
        )
    return v


async def bind(
    pool: Pool,
    name: str,
    request: Request,
    owner: str,
    socket: str | None = None,
    domain: str = "",
) -> BindResult:
    """Bind ``name``: a lease it already holds in state "reserved" is used,
    otherwise one is reserved for ``request``."""
    added = await find_vgpu(pool, name) is None
    vgpu = await ensure_vgpu(pool, name, socket, domain)
    lease = await live_lease(pool, name)
    reserved_here = False
    if lease is not None and lease.state != "reserved":
        raise Conflict(
            f"vGPU {name} is already {lease.state} to {lease.agent}/{lease.gpu} (lease "
            f"{lease.id}): vpcie unbind {name} first, or vpcie migrate {name}"
        )
    try:
        if lease is None:
            lease = await pool.reserve(name, request, owner)
            reserved_here = True
        agent = await find_agent(pool, lease.agent)
        reply = await backends.call(
            vgpu.socket, "bind", backends.target_fields(agent, lease), backends.BIND_TIMEOUT_S
        )
    except BaseException:
        # Leave the pool as it was: no lease booked for a backend that is
        # not using it, no vGPU record with a socket nobody listens on.
        if reserved_here and lease is not None:
            await pool.release(lease.id)
        if added:
            await pool.remove_vgpu(name)
        raise
    lease = await pool.set_lease_state(lease.id, "bound")
    return BindResult(await get_vgpu(pool, name), lease, str(reply.get("bound", "")))


async def unbind(pool: Pool, name: str) -> UnbindResult:
    """Unbind the backend, then release the lease. A backend that is gone
    (its socket absent) does not keep the lease booked: the fencing token
    keeps it off the GPU once the GPU is leased again."""
    vgpu = await get_vgpu(pool, name)
    lease = await live_lease(pool, name)
    if lease is None:
        raise NotFound(f"vGPU {name} holds no lease (vpcie leases --vgpu {name})")
    was: str | None = None
    try:
        reply = await backends.call(vgpu.socket, "unbind", {}, backends.BIND_TIMEOUT_S)
        was = reply.get("was") or ""
    except backends.BackendGone:
        was = None
    return UnbindResult(vgpu, await pool.release(lease.id), was)
