"""A worker: one authenticated connection, one session, in a process forked
from the agent's main process after the device grant (host_agent/spawn.py).

The main process did TLS, HELLO, AUTH and read OPEN (host_agent/admission.py)
and granted a device; the worker pins ``CUDA_VISIBLE_DEVICES`` to the granted
GPU or MIG UUID, only then imports its executor (NumPy / CuPy), answers OPEN
and serves the session. It reports to the parent on a socketpair as JSON
lines:

    worker -> parent  {"op": "bound", "session", "device", "env": {...}, "executor"}
    worker -> parent  {"op": "end", "reason": ...}

The parent learns the worker's exit from a pidfd, whatever the reason.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from host_agent.config import AgentConfig
from host_agent.handshake import open_reply_frame
from host_agent.logs import log, set_process
from host_agent.tlsstream import TlsStream
from vpcie.errors import ErrorCode

if TYPE_CHECKING:
    from host_agent.executors.base import Executor, SessionLimits


@dataclass(frozen=True)
class Grant:
    """What the main process granted to one OPEN."""

    session: int
    device: dict[str, Any]  # Device.to_json()
    mem_quota: int
    max_inflight: int
    client: str
    handle_epoch: int = 0  # from OPEN: the top byte of the session's handles


class Control:
    """The worker's end of the JSON-lines channel to the parent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, obj: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")


def make_executor(kind: str, device: dict[str, Any], limits: SessionLimits, agent: str) -> Executor:
    """CPU or CuPy executor for the granted device; CuPy is imported only here,
    after CUDA_VISIBLE_DEVICES is pinned."""
    from host_agent.executors.base import DeviceIdentity

    if kind == "auto":
        kind = "cpu" if device["kind"] == "cpu" else "cuda"
    if kind == "cuda":
        from host_agent.executors.cuda import CudaExecutor

        return CudaExecutor(limits, DeviceIdentity(device["name"], device["id"], agent))
    from host_agent.executors.cpu import CpuExecutor

    return CpuExecutor(limits, DeviceIdentity("", device["id"], agent))


def session_stream(sock: socket.socket, seconds: float) -> socket.socket | TlsStream:
    """The connection as the session uses it, where a read that waited
    ``seconds`` for bytes fails (the session ends "idle").

    Plain TCP: SO_RCVTIMEO on a blocking socket, so recv fails with EAGAIN
    after silence without the poll() per recv that a socket timeout costs.
    TLS: SO_RCVTIMEO does not work there (CPython's SSL read retries SSL_read
    on WANT_READ for a blocking socket, so the EAGAIN never surfaces and a
    silent peer held its worker forever); and the reader and the senders must
    not be in OpenSSL at once: a TlsStream (host_agent/tlsstream.py)."""
    if isinstance(sock, ssl.SSLSocket):
        return TlsStream(sock, seconds)
    sock.setblocking(True)
    sec = int(seconds)
    usec = int((seconds - sec) * 1e6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, usec))
    return sock


def serve(conn: socket.socket, ctl: Control, grant: Grant, cfg: AgentConfig) -> str:
    """The worker's life after the fork: executor, OPEN_REPLY, session; returns why it ended."""
    from host_agent.executors.base import SessionLimits
    from host_agent.session import Session, SessionConfig
    from vpcie.protocol.frames import FrameReader

    stream = session_stream(conn, cfg.idle_timeout)
    device, sid = grant.device, grant.session
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if device["kind"] == "cpu" else device["id"]
    limits = SessionLimits(grant.mem_quota, grant.max_inflight)
    try:
        executor = make_executor(cfg.executor, device, limits, cfg.agent_name)
    except Exception as exc:  # ImportError (no CuPy), CUDA init failure
        log("error", "executor_failed", device=device["id"], error=repr(exc))
        msg = f"executor for {device['id']} failed: {exc}"
        stream.sendall(open_reply_frame(ErrorCode.NO_DEVICE, 0, msg, b""))
        return "executor-failed"
    executor.set_handle_epoch(grant.handle_epoch)
    ctl.send(
        {
            "op": "bound",
            "session": sid,
            "device": device["id"],
            "executor": executor.name,
            "env": {"CUDA_VISIBLE_DEVICES": os.environ["CUDA_VISIBLE_DEVICES"]},
        }
    )
    stream.sendall(open_reply_frame(ErrorCode.OK, sid, "", executor.query_info()))
    session = Session(
        stream,
        FrameReader(),
        executor,
        SessionConfig(sid, limits.max_inflight, cfg.event_wait_timeout, cfg.idle_timeout),
    )
    log(
        "info",
        "session_open",
        session=sid,
        device=device["id"],
        client=grant.client,
        executor=executor.name,
        mem_quota=limits.mem_quota,
    )
    profile_to = os.environ.get("VPCIE_AGENT_PROFILE")  # operators: where time goes
    if profile_to:
        import cProfile

        prof = cProfile.Profile()
        reason: str = prof.runcall(session.serve, [])
        prof.dump_stats(f"{profile_to}.{sid}")
    else:
        reason = session.serve([])
    log("info", "session_end", session=sid, reason=reason)
    return reason


def run(conn: socket.socket, ctl_sock: socket.socket, grant: Grant, cfg: AgentConfig) -> int:
    """Entry point in the forked child (host_agent/spawn.py runs it)."""
    set_process("worker")
    ctl = Control(ctl_sock)
    reason = "error"
    try:
        reason = serve(conn, ctl, grant, cfg)
    except OSError as exc:
        log("info", "connection_lost", session=grant.session, error=str(exc))
        reason = "lost"
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
