"""A worker process: one connection, one session (``python -m host_agent.worker``).

The agent's main process accepts a TCP connection and starts this program
with the socket (``--conn-fd``) and one end of a socketpair (``--ctl-fd``)
that carries JSON lines to and from the parent:

    parent -> worker  {"config": {...}}                       at start
    worker -> parent  {"op": "open", "device", "mem_quota", "max_inflight", "client", "peer"}
    parent -> worker  {"ok": true, "session", "device": {...}, "mem_quota", "max_inflight"}
                      | {"ok": false, "status", "message"}
    worker -> parent  {"op": "bound", "env": {"CUDA_VISIBLE_DEVICES": ...}, "executor": ...}
    worker -> parent  {"op": "end", "reason": ...}

The worker does TLS + HELLO/AUTH itself, so a hostile peer never reaches the
parent's memory; it pins ``CUDA_VISIBLE_DEVICES`` to the granted GPU or MIG
UUID before CuPy is imported, so the session sees only its device.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import struct
import sys
from typing import Any

from host_agent.config import AgentConfig
from host_agent.executors.base import DeviceIdentity, Executor, SessionLimits
from host_agent.handshake import Handshake, HandshakeTimeout
from host_agent.logs import log, set_process
from host_agent.session import Session, SessionConfig
from vpcie.errors import AuthError, ErrorCode, ProtocolError
from vpcie.protocol.codes import FrameType
from vpcie.protocol.frames import encode_payload

_MAX_CTL_LINE = 1 << 20


class Control:
    """The JSON-lines channel to the parent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, obj: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk or len(self.buf) > _MAX_CTL_LINE:
                raise ConnectionError("agent control channel closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        out: dict[str, Any] = json.loads(line)
        return out


def make_executor(kind: str, device: dict[str, Any], limits: SessionLimits, agent: str) -> Executor:
    """CPU or CuPy executor for the granted device; CuPy is imported only here,
    after CUDA_VISIBLE_DEVICES is pinned."""
    if kind == "auto":
        kind = "cpu" if device["kind"] == "cpu" else "cuda"
    if kind == "cuda":
        from host_agent.executors.cuda import CudaExecutor

        return CudaExecutor(limits, DeviceIdentity(device["name"], device["id"], agent))
    from host_agent.executors.cpu import CpuExecutor

    return CpuExecutor(limits, DeviceIdentity("", device["id"], agent))


def _set_idle_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO on a blocking socket: recv fails with EAGAIN after silence,
    without a poll() per recv that socket timeouts cost."""
    sec = int(seconds)
    usec = int((seconds - sec) * 1e6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, usec))


def _open_reply(hs: Handshake, status: int, session: int, message: str, info: bytes) -> None:
    payload = encode_payload("OPEN_REPLY", status, session, message[:1000], info)
    hs.send(FrameType.OPEN, payload, session=session)


def run(conn: socket.socket, ctl: Control, cfg: AgentConfig) -> str:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hs = Handshake(conn, cfg)
    try:
        hs.authenticate()
        device_req, mem_quota, max_inflight, client, handle_epoch = hs.read_open()
    except HandshakeTimeout as exc:
        log("warning", "auth_timeout", error=str(exc))
        return "auth-timeout"
    except AuthError as exc:
        log("warning", "auth_refused", error=str(exc), peer=hs.peer)
        hs.send_error(ErrorCode.PERMISSION_DENIED, str(exc))
        return "auth-refused"
    except ProtocolError as exc:
        log("warning", "handshake_protocol_error", error=str(exc))
        hs.send_error(ErrorCode.PROTOCOL, str(exc))
        return "protocol"
    except ssl.SSLError as exc:
        log("warning", "tls_refused", error=str(exc))
        return "tls-refused"
    except OSError as exc:
        log("info", "handshake_lost", error=str(exc))
        return "lost"

    ctl.send(
        {
            "op": "open",
            "device": device_req,
            "mem_quota": mem_quota,
            "max_inflight": max_inflight,
            "client": client,
            "peer": hs.peer or hs.client_name,
        }
    )
    grant = ctl.recv()
    if not grant.get("ok"):
        _open_reply(hs, int(grant["status"]), 0, str(grant.get("message", "")), b"")
        return "open-refused"
    device: dict[str, Any] = grant["device"]
    sid = int(grant["session"])
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if device["kind"] == "cpu" else device["id"]
    limits = SessionLimits(int(grant["mem_quota"]), int(grant["max_inflight"]))
    try:
        executor = make_executor(cfg.executor, device, limits, cfg.agent_name)
    except Exception as exc:  # ImportError (no CuPy), CUDA init failure
        log("error", "executor_failed", device=device["id"], error=repr(exc))
        _open_reply(hs, ErrorCode.NO_DEVICE, 0, f"executor for {device['id']} failed: {exc}", b"")
        return "executor-failed"
    executor.set_handle_epoch(handle_epoch)
    ctl.send(
        {
            "op": "bound",
            "session": sid,
            "device": device["id"],
            "executor": executor.name,
            "env": {"CUDA_VISIBLE_DEVICES": os.environ["CUDA_VISIBLE_DEVICES"]},
        }
    )
    _open_reply(hs, ErrorCode.OK, sid, "", executor.query_info())
    sock = hs.sock
    sock.settimeout(None)
    _set_idle_timeout(sock, cfg.idle_timeout)
    session = Session(
        sock,
        hs.reader,
        executor,
        SessionConfig(sid, limits.max_inflight, cfg.event_wait_timeout, cfg.idle_timeout),
    )
    log(
        "info",
        "session_open",
        session=sid,
        device=device["id"],
        client=client,
        executor=executor.name,
        mem_quota=limits.mem_quota,
    )
    profile_to = os.environ.get("VPCIE_AGENT_PROFILE")  # operators: where time goes
    if profile_to:
        import cProfile

        prof = cProfile.Profile()
        reason = prof.runcall(session.serve, hs.leftover())
        prof.dump_stats(f"{profile_to}.{sid}")
    else:
        reason = session.serve(hs.leftover())
    log("info", "session_end", session=sid, reason=reason)
    return reason


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="host_agent.worker")
    ap.add_argument("--conn-fd", type=int, required=True)
    ap.add_argument("--ctl-fd", type=int, required=True)
    args = ap.parse_args(argv)
    set_process("worker")
    ctl = Control(socket.socket(fileno=args.ctl_fd))
    conn = socket.socket(fileno=args.conn_fd)
    reason = "error"
    try:
        cfg = AgentConfig.from_json(json.dumps(ctl.recv()["config"]))
        reason = run(conn, ctl, cfg)
    finally:
        try:
            conn.close()
        except OSError:
            pass
        try:
            ctl.send({"op": "end", "reason": reason})
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
