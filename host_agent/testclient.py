"""A small blocking tunnel client and an agent launcher, for tests and smoke
checks (the production client is vpcie.tunnel's asyncio TunnelClient).

Frames are built with vpcie.protocol.frames, the same definitions the agent
uses; nothing here trusts the agent more than a test needs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from host_agent.tls import client_context
from vpcie.protocol.batch import Record, encode_batch
from vpcie.protocol.codes import MAX_DATA_CHUNK, PROTOCOL_VERSION, AuthMode, FrameFlag, FrameType
from vpcie.protocol.frames import (
    MAC_SIZE,
    NONCE_SIZE,
    Frame,
    FrameReader,
    data_frame_header,
    decode_payload,
    encode_frame,
    encode_open,
    encode_payload,
    psk_mac,
)


class Completion(NamedTuple):
    status: int
    failed_index: int
    message: str
    results: dict[int, int]
    blob: bytes
    data: bytes  # D2H bytes, in stream order


class RawClient:
    def __init__(
        self,
        port: int,
        *,
        psk: bytes | None = None,
        tls: tuple[str, str | None, str | None] | None = None,
        host: str = "127.0.0.1",
        timeout: float = 10.0,
        source: str = "",
    ) -> None:
        bind = (source, 0) if source else None  # a lab's client binds its own address
        raw = socket.create_connection((host, port), timeout=timeout, source_address=bind)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = raw
        if tls is not None:
            ctx = client_context(*tls)
            self.sock = ctx.wrap_socket(raw, server_hostname=host)
        self.psk = psk
        self.reader = FrameReader()
        self.frames: list[Frame] = []
        self.session = 0
        self.seq = 0
        self.completions: dict[int, Completion] = {}
        self.data: dict[int, list[tuple[int, bytes]]] = {}
        self.info = b""
        self.pongs: list[Frame] = []

    # -- frames ----------------------------------------------------------------
    def send(self, ftype: int, payload: bytes = b"", *, seq: int = 0, flags: int = 0) -> None:
        self.sock.sendall(encode_frame(ftype, payload, session=self.session, seq=seq, flags=flags))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self) -> Frame:
        while not self.frames:
            n = self.sock.recv_into(self.reader.get_buffer())
            if n == 0:
                raise ConnectionResetError("agent closed the connection")
            self.frames.extend(self.reader.buffer_updated(n))
        return self.frames.pop(0)

    def expect_closed(self, timeout: float = 5.0) -> list[Frame]:
        """Read until EOF (or reset); return the frames seen on the way."""
        self.sock.settimeout(timeout)
        seen: list[Frame] = []
        try:
            while True:
                seen.append(self.recv_frame())
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return seen

    # -- setup -------------------------------------------------------------------
    def hello(self, auth: AuthMode | None = None) -> tuple[Any, ...]:
        mode = auth if auth is not None else (AuthMode.PSK if self.psk else AuthMode.TLS)
        self.cnonce = os.urandom(NONCE_SIZE)
        self.send(
            FrameType.HELLO,
            encode_payload(
                "HELLO", PROTOCOL_VERSION, PROTOCOL_VERSION, int(mode), self.cnonce, "test"
            ),
        )
        f = self.recv_frame()
        if f.type != FrameType.HELLO:
            raise ConnectionError(f"HELLO answered with frame type {f.type}: {f.payload!r}")
        reply = decode_payload("HELLO_REPLY", f.payload)
        self.snonce = reply[2]
        return reply

    def auth(self, key: bytes | None = None) -> Frame:
        k = key if key is not None else self.psk
        mac = psk_mac(k, b"client", self.cnonce, self.snonce) if k else bytes(MAC_SIZE)
        self.send(FrameType.AUTH, encode_payload("AUTH", mac))
        return self.recv_frame()

    def open(
        self,
        device: str = "",
        mem_quota: int = 0,
        max_inflight: int = 0,
        *,
        handle_epoch: int = 0,
        lease_token: int = 0,
        lease_live: Sequence[int] | None = None,
    ) -> tuple[int, int, str, dict[str, Any]]:
        """OPEN; ``lease_live`` None: (token,), an exclusive lease (() with token 0)."""
        live = (lease_token,) if lease_live is None and lease_token else lease_live or ()
        opened = encode_open(
            device, mem_quota, max_inflight, "test", handle_epoch, lease_token, live
        )
        self.send(FrameType.OPEN, opened)
        f = self.recv_frame()
        assert f.type == FrameType.OPEN, f
        status, session, message, info = decode_payload("OPEN_REPLY", f.payload)
        self.session = session
        self.info = info
        return status, session, message, query_info(info) if info else {}

    def connect(
        self,
        device: str = "",
        mem_quota: int = 0,
        max_inflight: int = 0,
        *,
        handle_epoch: int = 0,
        lease_token: int = 0,
        lease_live: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        self.hello()
        f = self.auth()
        assert f.type == FrameType.AUTH and decode_payload("AUTH_REPLY", f.payload) == (0,), f
        status, _sid, message, info = self.open(
            device,
            mem_quota,
            max_inflight,
            handle_epoch=handle_epoch,
            lease_token=lease_token,
            lease_live=lease_live,
        )
        assert status == 0, message
        return info

    def inventory(self) -> dict[str, Any]:
        """HELLO, AUTH, INVENTORY: the agent's JSON answer (it then closes)."""
        self.hello()
        f = self.auth()
        assert f.type == FrameType.AUTH and decode_payload("AUTH_REPLY", f.payload) == (0,), f
        self.send(FrameType.INVENTORY)
        f = self.recv_frame()
        if f.type != FrameType.INVENTORY or not f.flags & FrameFlag.REPLY:
            raise ConnectionError(f"INVENTORY answered with frame type {f.type}")
        (doc,) = decode_payload("INVENTORY_REPLY", f.payload)
        result: dict[str, Any] = json.loads(doc)
        return result

    # -- commands ----------------------------------------------------------------
    def submit(self, records: Sequence[Record | bytes], data: bytes | memoryview = b"") -> int:
        self.seq += 1
        seq = self.seq
        batch = encode_batch(records)
        head = encode_frame(FrameType.COMMAND, batch, session=self.session, seq=seq)
        view = memoryview(data).cast("B")
        if len(view) <= 65536:  # small: one write
            parts: list[bytes | memoryview] = [head]
            for pos in range(0, len(view), MAX_DATA_CHUNK):
                chunk = view[pos : pos + MAX_DATA_CHUNK]
                last = pos + len(chunk) == len(view)
                parts += [data_frame_header(self.session, seq, pos, len(chunk), last=last), chunk]
            self.sock.sendall(b"".join(parts))
            return seq
        self.sock.sendall(head)
        for pos in range(0, len(view), MAX_DATA_CHUNK):  # bulk: no copies of the data
            chunk = view[pos : pos + MAX_DATA_CHUNK]
            last = pos + len(chunk) == len(view)
            self.sock.sendall(data_frame_header(self.session, seq, pos, len(chunk), last=last))
            self.sock.sendall(chunk)
        return seq

    def _take(self, f: Frame) -> None:
        if f.type == FrameType.DATA:
            self.data.setdefault(f.seq, []).append((f.data_offset, bytes(f.payload)))
        elif f.type == FrameType.COMPLETION:
            st, idx, msg, _n, res, blob = decode_payload("COMPLETION", f.payload)
            chunks = sorted(self.data.pop(f.seq, []))
            self.completions[f.seq] = Completion(
                st, idx, msg, dict(res), blob, b"".join(c for _, c in chunks)
            )
        elif f.type == FrameType.ERROR:
            code, fatal, msg = decode_payload("ERROR", f.payload)
            raise ConnectionError(f"agent ERROR {code} fatal={fatal}: {msg}")

    def wait(self, seq: int) -> Completion:
        while seq not in self.completions:
            f = self.recv_frame()
            if f.type == FrameType.PONG:
                self.pongs.append(f)
                continue
            self._take(f)
        return self.completions.pop(seq)

    def call(self, records: Sequence[Record | bytes], data: bytes = b"") -> Completion:
        return self.wait(self.submit(records, data))

    def ping(self, stamp: int) -> None:
        self.send(FrameType.PING, encode_payload("PING", stamp))

    def close(self) -> Frame | None:
        try:
            self.send(FrameType.CLOSE, encode_payload("CLOSE", 0))
            while True:
                f = self.recv_frame()
                if f.type == FrameType.CLOSE:
                    return f
                self._take(f)
        except OSError:
            return None
        finally:
            self.sock.close()


def query_info(blob: bytes) -> dict[str, Any]:
    names = (
        "proto_version executor flags mem_total mem_free mem_quota mem_used max_inflight "
        "max_batch_bytes max_streams sm_count cc_major cc_minor name uuid agent"
    ).split()
    return dict(zip(names, decode_payload("QUERY_INFO", blob), strict=True))


class AgentProcess:
    """``vpcie-agent serve`` on 127.0.0.1, a free port, until ``stop()``."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.state = workdir / f"agent-{os.getpid()}-{time.monotonic_ns()}.json"
        self.log = workdir / (self.state.stem + ".log")
        cmd = [
            sys.executable,
            "-m",
            "host_agent.main",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--state-file",
            str(self.state),
            "--name",
            "test-agent",
            *args,
        ]
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.logf = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stderr=self.logf, stdout=self.logf, env=full_env)
        self.port = self._wait_port()

    def _wait_port(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}: {self.log_text()}")
            try:
                port = int(json.loads(self.state.read_text())["listen"].rsplit(":", 1)[1])
                if port:
                    return port
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"agent did not listen within {timeout} s: {self.log_text()}")

    def state_json(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.state.read_text())
        return out

    def wait_sessions(self, pred: Any = None, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Sessions in the state file once ``pred(sessions)`` holds (default:
        every session reported its environment)."""
        check = pred or (lambda ss: ss and all(s.get("env") for s in ss))
        deadline = time.monotonic() + timeout
        while True:
            try:
                sessions: list[dict[str, Any]] = self.state_json()["sessions"]
                if check(sessions):
                    return sessions
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"state file never matched: {self.state.read_text()}")
            time.sleep(0.02)

    def log_text(self) -> str:
        if not self.logf.closed:
            self.logf.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()
