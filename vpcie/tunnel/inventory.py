"""Ask an agent what it has: its devices, their sessions and lease fences.

One connection, authenticated like a session (PSK or mutual TLS), that sends
INVENTORY instead of OPEN; the agent answers from its main process (no
worker, no device slot) and closes (docs/PROTOCOL.md "Inventory"). The pool
(vpcie/fleet/) uses it to add and refresh agents.
"""

from __future__ import annotations

import json
from ssl import SSLContext
from typing import Any

from vpcie.errors import AuthError, ErrorCode, ProtocolError, VgpuError
from vpcie.tunnel.client import TunnelClient

INVENTORY_KEYS = ("agent", "version", "inventory", "sessions", "fences", "max_sessions")


async def query_inventory(
    host: str,
    port: int,
    *,
    psk: bytes | None = None,
    ssl: SSLContext | None = None,
    name: str = "vpcie",
    timeout: float = 5.0,
    server_hostname: str | None = None,
) -> dict[str, Any]:
    """The agent's INVENTORY document::

        {"agent": NAME, "version": 2, "inventory": {...Inventory.to_json()},
         "sessions": {DEVICE_ID: n}, "fences": {DEVICE_ID: token}, "max_sessions": N}

    Raises VgpuError with one line: DEVICE_LOST (unreachable, closed, no
    answer within ``timeout``), PERMISSION_DENIED (authentication refused or
    failed), PROTOCOL (not an INVENTORY answer); ConfigError for bad
    arguments (both or neither of psk/ssl)."""
    where = f"{host}:{port}"
    try:
        raw = await TunnelClient.fetch_inventory(
            host, port, psk=psk, ssl=ssl, server_hostname=server_hostname, name=name,
            timeout=timeout,
        )  # fmt: skip
    except AuthError as exc:
        raise VgpuError(ErrorCode.PERMISSION_DENIED, str(exc)) from None
    except ProtocolError as exc:
        raise VgpuError(ErrorCode.PROTOCOL, f"agent {where}: {exc}") from None
    except VgpuError as exc:
        if exc.code is ErrorCode.TIMEOUT:
            raise VgpuError(ErrorCode.DEVICE_LOST, exc.message) from None
        raise
    try:
        doc = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        why = f"agent {where}: inventory is not JSON: {exc}"
        raise VgpuError(ErrorCode.PROTOCOL, why) from None
    missing = [k for k in INVENTORY_KEYS if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise VgpuError(ErrorCode.PROTOCOL, f"agent {where}: inventory lacks {', '.join(missing)}")
    result: dict[str, Any] = doc
    return result
