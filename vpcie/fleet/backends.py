"""A vGPU's backend, reached by its control socket (the pool's Vgpu.socket):
the bind / unbind / migrate requests the fleet sends it."""

from __future__ import annotations

import json
from typing import Any

from vpcie.control.client import ControlClient
from vpcie.control.messages import BindRequest, MigrateRequest
from vpcie.errors import VpcieError
from vpcie.places import control_socket
from vpcie.pool.model import Agent, Lease

# A bind opens (probes) a session; a migrate's limit is the control client's
# MIGRATE_TIMEOUT_S (its drain and the copy of the device memory).
BIND_TIMEOUT_S = 60.0


class BackendError(VpcieError):
    """The backend could not be reached, or refused the request (one line)."""


class BackendGone(BackendError):
    """No backend listens on the control socket (nothing to unbind there)."""


def default_socket(vgpu: str) -> str:
    """Where a managed backend (libvirt started it) keeps its control socket."""
    return control_socket(vgpu)


def target_fields(agent: Agent, lease: Lease) -> dict[str, Any]:
    """The agent, credential, device, quota and fencing token of ``lease``, as
    the control socket's bind and migrate take them."""
    wire: dict[str, Any] = {
        "agent": agent.address,
        "psk_file": agent.auth.get("psk_file"),
        "tls_dir": agent.auth.get("tls_dir"),
        "tls_name": agent.auth.get("tls_name", "backend"),
        "device": lease.gpu,
        "mem_quota": lease.memory,
        "lease_token": lease.token,
        "lease_live": tuple(lease.live),
    }
    return wire


async def call(socket: str, op: str, fields: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send ``op`` (bind, migrate: ``fields`` as ``target_fields`` makes
    them; unbind) to the backend at ``socket``; its ``{"ok": true, ...}``
    answer, or BackendError with one line."""
    client = ControlClient(socket, timeout)
    try:
        if op == "bind":
            reply = await client.bind(BindRequest(**fields))
        elif op == "migrate":
            reply = await client.migrate(MigrateRequest(**fields), timeout=timeout)
        else:
            reply = await client.unbind()
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise BackendGone(
            f"no backend listens on {socket} (is its vpcie-backend running?)"
        ) from exc
    except (OSError, TimeoutError, json.JSONDecodeError) as exc:
        raise BackendError(f"backend at {socket}: {exc or type(exc).__name__}") from exc
    except VpcieError as exc:  # NotAControlSocket
        raise BackendError(str(exc)) from exc
    if not reply.get("ok"):
        raise BackendError(f"backend {socket} refused {op}: {reply.get('error', 'no reason')}")
    return reply
