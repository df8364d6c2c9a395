"""The backend's control socket: bind, unbind and status, for the CLI and hooks.

One JSON object per line in, one per line out, on a unix socket (mode 0600)::

    {"op": "status"}
    {"op": "bind", "agent": "HOST:PORT", "psk_file": PATH | "tls_dir": DIR,
     "tls_name": NAME, "device": UUID, "mem_quota": BYTES, "max_inflight": N,
     "replace": false}
    {"op": "unbind"}

Answers ``{"ok": true, ...}`` or ``{"ok": false, "error": "one line"}``. A bind
is probed first (a session is opened and closed on the agent), so a wrong
address or credential fails the bind and leaves the old binding in place.
A bind of a bound vGPU is refused unless ``replace`` is true: replacing ends
the old binding's work with DEVICE_LOST and loses its device memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from pathlib import Path
from typing import Any

from vpcie.errors import VpcieError
from vpcie.gpu.binding import AgentTarget, Binding, info_bytes
from vpcie.gpu.device import GpuDevice

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 64 * 1024
PROBE_TIMEOUT_S = 10.0


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"agent address {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def client_tls_context(tls_dir: str, name: str) -> ssl.SSLContext:
    """mTLS client context from a PKI folder made by ``vpcie-agent pki``:
    ca.crt, NAME.crt (a client certificate) and NAME.key."""
    d = Path(tls_dir)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(d / "ca.crt"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(d / f"{name}.crt"), str(d / f"{name}.key"))
    ctx.check_hostname = False  # agents are pinned by the fleet CA, not by DNS names
    return ctx


def target_from_request(req: dict[str, Any]) -> AgentTarget:
    host, port = parse_hostport(str(req["agent"]))
    psk = tls = None
    if req.get("psk_file"):
        psk = Path(str(req["psk_file"])).read_bytes().strip()
        if not psk:
            raise ValueError(f"PSK file {req['psk_file']} is empty")
    elif req.get("tls_dir"):
        tls = client_tls_context(str(req["tls_dir"]), str(req.get("tls_name", "backend")))
    else:
        raise ValueError("bind needs psk_file or tls_dir")
    return AgentTarget(
        host,
        port,
        psk=psk,
        tls=tls,
        device=str(req.get("device", "")),
        mem_quota=int(req.get("mem_quota", 0)),
        max_inflight=int(req.get("max_inflight", 0)),
    )


class ControlServer:
    def __init__(self, device: GpuDevice, binding: Binding) -> None:
        self.device = device
        self.binding = binding
        self._server: asyncio.AbstractServer | None = None

    async def start(self, path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._client, path, limit=MAX_REQUEST_LINE)
        os.chmod(path, 0o600)
        log.info("control socket on %s", path)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

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
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("request must be a JSON object")
            op = req.get("op")
            if op == "status":
                return {"ok": True, **self.device.status()}
            if op == "unbind":
                was = self.binding.target
                self.binding.unbind()
                return {"ok": True, "was": was.describe() if was else None}
            if op == "bind":
                return await self._bind(req)
            raise ValueError(f"unknown op {op!r} (status, bind, unbind)")
        except (ValueError, KeyError, TypeError, OSError, VpcieError) as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    async def _bind(self, req: dict[str, Any]) -> dict[str, Any]:
        replace = req.get("replace", False)
        if not isinstance(replace, bool):
            raise ValueError(f"replace must be true or false, not {replace!r}")
        target = target_from_request(req)
        refused = self._refuse_rebind(replace)
        if refused:
            return refused
        gen = self.binding.generation
        info = await self.probe_info(target)
        # Another bind or unbind may have landed while the probe ran.
        refused = self._refuse_rebind(replace) if self.binding.generation != gen else None
        if refused:
            return refused
        was = self.binding.target
        self.binding.bind(target)
        self.device.bound_info = info  # the capset describes what it serves now
        reply: dict[str, Any] = {"ok": True, "bound": target.describe()}
        if was is not None:
            reply["replaced"] = was.describe()
        return reply

    def _refuse_rebind(self, replace: bool) -> dict[str, Any] | None:
        """A bound vGPU keeps its binding (and the guest its device memory)
        unless the operator asked to replace it."""
        current = self.binding.target
        if current is None or replace:
            return None
        return {
            "ok": False,
            "error": f"this vGPU is already bound to {current.describe()}: unbind it first, "
            "or bind --replace (its device memory is lost, work in flight ends with "
            "DEVICE_LOST)",
        }

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


async def control_request(path: str, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Client side (CLI, hooks, tests): one request, one answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
    try:
        writer.write(json.dumps(req).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise OSError("backend closed the control socket without answering")
        reply: dict[str, Any] = json.loads(line)
        return reply
    finally:
        writer.close()
