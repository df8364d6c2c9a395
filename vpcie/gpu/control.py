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
import ssl
from pathlib import Path
from typing import Any

from vpcie.backend.sockpath import ClaimedSocket, SocketAccess
from vpcie.errors import ConfigError, VpcieError
from vpcie.gpu.binding import AgentTarget, Binding, info_bytes
from vpcie.gpu.device import GpuDevice
from vpcie.tls_files import check_pki_files, tls_folder

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 64 * 1024
PROBE_TIMEOUT_S = 10.0


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"agent address {text!r} is not HOST:PORT")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"agent address {text!r}: port {int(port)} is not in 1..65535")
    return host.strip("[]"), int(port)


def client_tls_context(tls_dir: str, name: str) -> ssl.SSLContext:
    """mTLS client context from a PKI folder made by ``vpcie-agent pki``:
    ca.crt, NAME.crt (a client certificate) and NAME.key. A folder or file
    that cannot be used is a ConfigError naming it (and the user we run as)."""
    d = tls_folder(tls_dir)
    ca, cert, key = d / "ca.crt", d / f"{name}.crt", d / f"{name}.key"
    check_pki_files(ca, cert, key)
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:  # checked above; a race or an OpenSSL-only refusal
        raise ConfigError(f"cannot use TLS files in {d} ({name}.crt/.key, ca.crt): {exc}") from exc
    # The agent's certificate must name (SAN) the address the bind uses, so
    # another agent of the same fleet cannot answer in this one's place.
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
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


# A control socket answers "status" at once; a vhost-user socket given by
# mistake resets the connection (our JSON is not a vhost-user header) or, with
# QEMU attached, leaves us in its accept backlog. Only that first answer has
# this short deadline; a bind may then take PROBE_TIMEOUT_S.
FIRST_ANSWER_S = 2.0


class NotAControlSocket(VpcieError):
    """The path is a socket, but nothing there speaks the control protocol."""


async def control_request(path: str, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Client side (CLI, hooks, tests): one request, one answer.

    A request other than status is preceded by a status on the same
    connection, so a path that is not a control socket fails within
    FIRST_ANSWER_S (NotAControlSocket), not after ``timeout``."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
    try:
        first = req if req.get("op") == "status" else {"op": "status"}
        reply = await _exchange(reader, writer, first, path, None)
        if first is not req:
            reply = await _exchange(reader, writer, req, path, timeout)
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
