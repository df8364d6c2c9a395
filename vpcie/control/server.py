"""The backend's control socket: bind, unbind, migrate and status, for the
CLI, the pool and the hooks.

The messages are in ``vpcie.control.messages``; this is the serving side, on
a unix socket (mode 0600 unless told otherwise). A bind is probed first (a
session is opened and closed on the agent), so a wrong address or credential
fails the bind and leaves the old binding in place. A bind of a bound vGPU is
refused unless ``replace`` is true: replacing ends the old binding's work with
DEVICE_LOST and loses its device memory. A migrate moves the device state to
another agent instead (vpcie.gpu.migration); bind and unbind are refused
while it runs.

The device served is anything with ``status()`` and ``bound_info`` (the
``ServedDevice`` protocol; ``GpuDevice`` in the backend): this package does not
import the device model.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol

from vpcie.backend.sockpath import ClaimedSocket, SocketAccess
from vpcie.control.messages import (
    BindReply,
    BindRequest,
    MigrateReply,
    MigrateRequest,
    Refusal,
    Reply,
    StatusReply,
    StatusRequest,
    UnbindReply,
    parse_request,
)
from vpcie.control.target import bind_target
from vpcie.errors import VpcieError
from vpcie.gpu.binding import AgentTarget, Binding, info_bytes
from vpcie.gpu.migration_plan import MigrationReport

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 64 * 1024
PROBE_TIMEOUT_S = 10.0


class ServedDevice(Protocol):
    """What the control socket needs of the device it serves."""

    bound_info: bytes  # QUERY_INFO bytes of the bound GPU, for the capset
    migrating: bool  # a migration runs: bind, unbind and migrate are refused

    def status(self) -> dict[str, Any]:
        """Binding, counters and contexts, as JSON-able fields."""
        ...

    async def migrate(self, target: AgentTarget) -> MigrationReport:
        """Live migration to ``target`` (VgpuError, one line, when refused)."""
        ...


class ControlServer:
    def __init__(self, device: ServedDevice, binding: Binding) -> None:
        self.device = device
        self.binding = binding
        self._server: asyncio.AbstractServer | None = None
        self._claimed: ClaimedSocket | None = None

    async def start(self, path: str, access: SocketAccess | None = None) -> None:
        """Listen on ``path`` (mode 0600 unless ``access`` says otherwise); a
        live socket or a non-socket there is refused, never replaced."""
        self._claimed = ClaimedSocket(path, access, default_mode=0o600, backlog=16)
        self._server = await asyncio.start_unix_server(
            self._client, sock=self._claimed.sock, limit=MAX_REQUEST_LINE
        )
        log.info("control socket on %s", path)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._claimed is not None:
            self._claimed.release()
            self._claimed = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b'{"ok": false, "error": "request line too long"}\n')
                    break
                if not line:
                    break
                reply = await self.execute(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def execute(self, line: bytes) -> dict[str, Any]:
        """One request line; the reply's JSON object (a refusal, one line, for
        anything that fails)."""
        try:
            reply = await self._serve(line)
        except (ValueError, KeyError, TypeError, OSError, VpcieError) as exc:
            reply = Refusal(f"{type(exc).__name__}: {exc}")
        return reply.to_wire()

    async def _serve(self, line: bytes) -> Reply:
        req = parse_request(line)
        if isinstance(req, StatusRequest):
            return StatusReply(self.device.status())
        if self.device.migrating:
            return Refusal(f"a migration of this vGPU is running: {req.op} refused, try again")
        if isinstance(req, MigrateRequest):
            report = await self.device.migrate(bind_target(req))
            return MigrateReply(report.to_wire())
        if isinstance(req, BindRequest):
            return await self._bind(req)
        was = self.binding.target
        self.binding.unbind()
        return UnbindReply(was.describe() if was else None)

    async def _bind(self, req: BindRequest) -> Reply:
        target = bind_target(req)
        refused = self._refuse_rebind(req.replace)
        if refused:
            return refused
        gen = self.binding.generation
        info = await self.probe_info(target)
        # Another bind or unbind may have landed while the probe ran.
        refused = self._refuse_rebind(req.replace) if self.binding.generation != gen else None
        if refused:
            return refused
        was = self.binding.target
        self.binding.bind(target)
        self.device.bound_info = info  # the capset describes what it serves now
        return BindReply(target.describe(), was.describe() if was is not None else None)

    def _refuse_rebind(self, replace: bool) -> Refusal | None:
        """A bound vGPU keeps its binding (and the guest its device memory)
        unless the operator asked to replace it."""
        current = self.binding.target
        if current is None or replace:
            return None
        return Refusal(
            f"this vGPU is already bound to {current.describe()}: unbind it first, "
            "or bind --replace (its device memory is lost, work in flight ends with "
            "DEVICE_LOST)"
        )

    async def probe(self, target: AgentTarget) -> None:
        """Probe ``target`` (already bound, e.g. ``vpcie-backend --bind``): the
        device's capset then describes what it serves."""
        self.device.bound_info = await self.probe_info(target)

    async def probe_info(self, target: AgentTarget) -> bytes:
        """Open and close a session on ``target`` (OSError or VgpuError when
        that fails); its QUERY_INFO bytes, for the capset once bound."""
        probe = Binding(self.binding.factory)
        probe.target = target
        try:
            session, _gen = await asyncio.wait_for(probe.open("bind-probe"), PROBE_TIMEOUT_S)
        except TimeoutError as exc:
            raise OSError(
                f"agent {target.describe()} did not answer in {PROBE_TIMEOUT_S} s"
            ) from exc
        info = info_bytes(session.info)
        await session.close()
        return info
