"""Agents into the pool: ask an agent what it serves (its INVENTORY over the
tunnel) and record it and its GPUs / MIG slices.

``gpus_from_inventory`` is the pure part (an INVENTORY reply -> pool Gpus);
``add`` and ``refresh`` are the I/O around it.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Any

from vpcie.control.messages import parse_hostport
from vpcie.errors import ConfigError, ErrorCode, VgpuError, VpcieError
from vpcie.pool.errors import NotFound
from vpcie.pool.model import Agent, Gpu
from vpcie.pool.pool import Pool
from vpcie.tls_files import client_tls_context
from vpcie.tunnel.inventory import query_inventory

CLIENT_NAME = "vpcie-fleet"  # our name in the agent's HELLO log
INVENTORY_TIMEOUT_S = 5.0


class AgentUnreachable(VpcieError):
    """No answer from the agent's address (one line naming it)."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused  # nothing listens there: the agent is gone


def auth_record(psk_file: str | None, tls_dir: str | None, tls_name: str) -> dict[str, str]:
    """The credential an agent record names, as the backends will use it:
    absolute paths (a backend resolves them in its own working directory)."""
    if psk_file:
        return {"psk_file": str(Path(psk_file).absolute())}
    if tls_dir:
        return {"tls_dir": str(Path(tls_dir).absolute()), "tls_name": tls_name}
    raise ConfigError("an agent needs --psk-file or --tls-dir")


def credentials(auth: dict[str, Any]) -> tuple[bytes | None, ssl.SSLContext | None]:
    """(psk, TLS context) for an agent record's ``auth``; ConfigError naming
    the file that cannot be used."""
    if auth.get("psk_file"):
        path = str(auth["psk_file"])
        try:
            psk = Path(path).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read PSK file {path}: {exc.strerror or exc}") from exc
        if not psk:
            raise ConfigError(f"PSK file {path} is empty")
        return psk, None
    if auth.get("tls_dir"):
        return None, client_tls_context(str(auth["tls_dir"]), str(auth.get("tls_name", "backend")))
    raise ConfigError(f"agent credentials {auth!r} name neither psk_file nor tls_dir")


async def fetch_inventory(
    address: str, auth: dict[str, Any], timeout: float = INVENTORY_TIMEOUT_S
) -> dict[str, Any]:
    """The agent's INVENTORY reply (docs/PROTOCOL.md). VgpuError (refused:
    credentials, protocol) or AgentUnreachable, each one line."""
    try:
        host, port = parse_hostport(address)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    psk, tls = credentials(auth)
    try:
        return await query_inventory(
            host, port, psk=psk, ssl=tls, name=CLIENT_NAME, timeout=timeout
        )
    except ConnectionRefusedError as exc:
        raise AgentUnreachable(f"agent at {address}: nothing listens there", True) from exc
    except (OSError, TimeoutError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise AgentUnreachable(f"agent at {address}: {why or 'no answer in time'}") from exc
    except VgpuError as exc:
        if exc.code == ErrorCode.DEVICE_LOST:  # unreachable, closed, no answer in time
            refused = isinstance(exc.__cause__, ConnectionRefusedError)
            if refused:
                raise AgentUnreachable(f"agent at {address}: nothing listens there", True) from exc
            raise AgentUnreachable(exc.message or f"agent at {address}: no answer") from exc
        if exc.code == ErrorCode.PERMISSION_DENIED:
            why = f"agent at {address} refused our credentials: {exc.message}"
            raise VgpuError(exc.code, why) from None
        raise


def gpus_from_inventory(agent: str, reply: dict[str, Any]) -> list[Gpu]:
    """The pool's view of an agent's devices. Every device is listed, a GPU in
    MIG mode too (servable False: its slices are what is leased); a MIG
    slice's model is its GPU's, so ``--model`` matches slices of that GPU."""
    devices = reply.get("inventory", {}).get("devices", [])
    names = {d["id"]: d["name"] for d in devices}
    out = []
    for d in devices:
        model = names.get(d.get("parent") or "", d["name"]) if d["kind"] == "mig" else d["name"]
        out.append(
            Gpu(
                id=d["id"],
                agent=agent,
                kind=d["kind"],
                parent=d.get("parent", ""),
                model=model,
                memory_total=int(d["memory_total"]),
                profile=d.get("profile", ""),
                cc_major=int(d.get("cc_major", 0)),
                cc_minor=int(d.get("cc_minor", 0)),
                healthy=bool(d.get("healthy", True)),
                servable=bool(d.get("servable", True)),
                cordoned=False,
                labels={},
            )
        )
    return out


def agent_record(
    name: str,
    address: str,
    auth: dict[str, Any],
    reply: dict[str, Any],
    labels: dict[str, str] | None = None,
    registered: bool = False,
) -> Agent:
    """An agent added by hand has no heartbeat to wait for (ttl 0: the
    operator vouches for it, "up" until removed); a registered one is "up"
    while its registrar keeps its alive key."""
    return Agent(
        name=name,
        address=address,
        auth=auth,
        labels=dict(labels or {}),
        cordoned=False,
        registered=registered,
        heartbeat=time.time(),
        version=int(reply.get("version", 0)),
        ttl=10.0 if registered else 0.0,
    )


async def add(
    pool: Pool,
    name: str,
    address: str,
    auth: dict[str, Any],
    labels: dict[str, str] | None = None,
) -> tuple[Agent, list[Gpu]]:
    """Ask the agent at ``address`` what it serves, then record it (an
    agent that cannot be asked is not added)."""
    reply = await fetch_inventory(address, auth)
    agent = agent_record(name, address, auth, reply, labels)
    gpus = gpus_from_inventory(name, reply)
    await pool.add_agent(agent, gpus)
    return agent, gpus


async def refresh(pool: Pool, name: str) -> list[Gpu]:
    """Ask a recorded agent again and update its devices and heartbeat."""
    agent = await find_agent(pool, name)
    reply = await fetch_inventory(agent.address, agent.auth)
    gpus = gpus_from_inventory(name, reply)
    await pool.update_inventory(name, gpus)
    await pool.heartbeat(name)
    return gpus


async def find_agent(pool: Pool, name: str) -> Agent:
    for a in await pool.agents():
        if a.name == name:
            return a
    raise NotFound(f"no agent named {name} in the pool (vpcie agents list)")
