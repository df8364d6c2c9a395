"""The control socket's client side (CLI, hooks, tests): one request, one answer.

Imports only the messages: a client loads neither the device model nor the
C module (tests/unit/test_control_client_imports.py checks that)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from vpcie.control.messages import (
    BindRequest,
    MigrateRequest,
    Request,
    StatusRequest,
    UnbindRequest,
)
from vpcie.errors import VpcieError

# A control socket answers "status" at once; a vhost-user socket given by
# mistake resets the connection (our JSON is not a vhost-user header) or, with
# QEMU attached, leaves us in its accept backlog. Only that first answer has
# this short deadline; a bind may then take the server's probe timeout.
FIRST_ANSWER_S = 2.0


# A migration holds the guest's work while the state moves: the drain's own
# limit (30 s by default) plus the copy of the device memory.
MIGRATE_TIMEOUT_S = 600.0


class NotAControlSocket(VpcieError):
    """The path is a socket, but nothing there speaks the control protocol."""


async def control_request(
    path: str, req: Request | dict[str, Any], timeout: float = 30.0
) -> dict[str, Any]:
    """Send ``req`` (a request message, or its JSON object as is) to the
    control socket at ``path``; the answer's JSON object.

    A request other than status is preceded by a status on the same
    connection, so a path that is not a control socket fails within
    FIRST_ANSWER_S (NotAControlSocket), not after ``timeout``."""
    wire = req if isinstance(req, dict) else req.to_wire()
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
    try:
        first = wire if wire.get("op") == "status" else {"op": "status"}
        reply = await _exchange(reader, writer, first, path, None)
        if first is not wire:
            reply = await _exchange(reader, writer, wire, path, timeout)
        return reply
    finally:
        writer.close()


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    req: dict[str, Any],
    path: str,
    timeout: float | None,
) -> dict[str, Any]:
    """Send one request, read one answer; ``timeout`` None: this is the first
    answer on the connection, which proves (or not) that a control socket is there."""
    first = timeout is None
    timeout = FIRST_ANSWER_S if timeout is None else timeout
    not_ctl = (
        f"{path} does not answer as a vpcie control socket (a vhost-user socket? a "
        "backend's control socket is its vhost-user path + .ctl, or /run/vpcie/NAME.ctl "
        "when libvirt started it)"
    )
    try:
        writer.write(json.dumps(req).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        if first:
            raise NotAControlSocket(
                f"{not_ctl}: no answer in {timeout} s (or a backend too busy to answer)"
            ) from None
        raise OSError(f"backend at {path} did not answer in {timeout} s") from None
    except (ConnectionResetError, BrokenPipeError) as exc:
        if first:
            raise NotAControlSocket(f"{not_ctl}: connection reset") from exc
        raise
    if not line:
        if first:
            raise NotAControlSocket(f"{not_ctl}: closed without answering")
        raise OSError("backend closed the control socket without answering")
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise NotAControlSocket(f"{path} answered something that is not a control reply")
    return reply


class ControlClient:
    """A backend's control socket by path, one call per op. Each call is one
    ``control_request``; the answer is the reply's JSON object (``ok`` false
    with a one-line ``error`` when the backend refused)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    async def status(self) -> dict[str, Any]:
        return await control_request(self.path, StatusRequest(), self.timeout)

    async def bind(self, req: BindRequest | None = None, /, **fields: Any) -> dict[str, Any]:
        """``req``, or a BindRequest made of ``fields`` (agent, psk_file, ...)."""
        return await control_request(self.path, req or BindRequest(**fields), self.timeout)

    async def unbind(self) -> dict[str, Any]:
        return await control_request(self.path, UnbindRequest(), self.timeout)

    async def migrate(
        self,
        req: MigrateRequest | None = None,
        /,
        *,
        timeout: float = MIGRATE_TIMEOUT_S,
        **fields: Any,
    ) -> dict[str, Any]:
        """Live migration to the agent ``req`` (or ``fields``, as for bind)
        names; the report: migrated, from, contexts, state_bytes, stun_ms,
        copy_ms, state_lost, precopy_bytes, stun_bytes, rounds, precopy_ms."""
        return await control_request(self.path, req or MigrateRequest(**fields), timeout)
