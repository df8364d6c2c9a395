"""Worker side of connection setup: TLS, HELLO, AUTH, then reading OPEN
(docs/PROTOCOL.md "Connection = one session", steps 1-4).

Everything before OPEN must finish within the auth deadline (5 s); any frame
other than the expected one is a protocol error, a wrong key or auth mode is
PERMISSION_DENIED. Blocking I/O with per-call timeouts from one deadline.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque

from host_agent.config import AgentConfig
from host_agent.tls import peer_name, server_context
from vpcie.errors import AuthError, ErrorCode, ProtocolError
from vpcie.protocol.codes import PROTOCOL_VERSION, AuthMode, FrameFlag, FrameType
from vpcie.protocol.frames import (
    MAC_SIZE,
    NONCE_SIZE,
    Frame,
    FrameReader,
    decode_payload,
    encode_frame,
    encode_payload,
    macs_equal,
    psk_mac,
)


class HandshakeTimeout(Exception):
    """The peer did not finish authenticating in time."""


class Handshake:
    def __init__(self, sock: socket.socket, config: AgentConfig) -> None:
        self.config = config
        self.raw = sock
        self.sock: socket.socket = sock
        self.deadline = time.monotonic() + config.auth_timeout
        self.reader = FrameReader()
        self.queued: deque[Frame] = deque()
        self.peer = ""
        self.client_name = ""

    def _timeout(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise HandshakeTimeout(f"not authenticated within {self.config.auth_timeout:g} s")
        return left

    def start_tls(self) -> None:
        cfg = self.config
        ctx = server_context(cfg.ca_file, cfg.cert_file, cfg.key_file)
        self.raw.settimeout(self._timeout())
        tls = ctx.wrap_socket(self.raw, server_side=True, do_handshake_on_connect=False)
        try:
            tls.do_handshake()
        except TimeoutError as exc:
            raise HandshakeTimeout("TLS handshake timed out") from exc
        self.sock = tls
        self.peer = peer_name(tls)

    def next_frame(self) -> Frame:
        while not self.queued:
            self.sock.settimeout(self._timeout())
            try:
                n = self.sock.recv_into(self.reader.get_buffer())
            except TimeoutError as exc:
                raise HandshakeTimeout("peer silent during authentication") from exc
            if n == 0:
                raise ConnectionResetError("peer closed during authentication")
            self.queued.extend(self.reader.buffer_updated(n))
        return self.queued.popleft()

    def expect(self, ftype: FrameType) -> Frame:
        f = self.next_frame()
        if f.type != ftype:
            name = FrameType(f.type).name if f.type in tuple(FrameType) else str(f.type)
            raise ProtocolError(f"expected {ftype.name}, got {name}")
        if f.flags & FrameFlag.REPLY:
            raise ProtocolError(f"{ftype.name} with the REPLY flag from a client")
        return f

    def send(
        self, ftype: FrameType, payload: bytes, *, session: int = 0, reply: bool = True
    ) -> None:
        flags = FrameFlag.REPLY if reply else 0
        self.sock.sendall(encode_frame(ftype, payload, session=session, flags=flags))

    def send_error(self, code: ErrorCode, message: str) -> None:
        try:
            self.sock.settimeout(1.0)
            self.send(
                FrameType.ERROR, encode_payload("ERROR", int(code), 1, message[:500]), reply=False
            )
        except OSError:
            pass

    def authenticate(self) -> None:
        """TLS (if configured), HELLO and AUTH; raises on any failure."""
        cfg = self.config
        mode = AuthMode.TLS if cfg.auth == "tls" else AuthMode.PSK
        if mode == AuthMode.TLS:
            self.start_tls()
        hello = self.expect(FrameType.HELLO)
        proto_min, proto_max, auth, cnonce, name = decode_payload("HELLO", hello.payload)
        self.client_name = name
        if not proto_min <= PROTOCOL_VERSION <= proto_max:
            raise ProtocolError(
                f"client speaks v{proto_min}..{proto_max}, agent v{PROTOCOL_VERSION}"
            )
        if auth != mode:
            raise AuthError(f"client uses auth mode {auth}, this agent {mode.name}")
        snonce = os.urandom(NONCE_SIZE)
        psk = bytes.fromhex(cfg.psk_hex) if mode == AuthMode.PSK else b""
        proof = psk_mac(psk, b"agent", cnonce, snonce) if psk else bytes(MAC_SIZE)
        self.send(
            FrameType.HELLO,
            encode_payload(
                "HELLO_REPLY", PROTOCOL_VERSION, int(mode), snonce, proof, cfg.agent_name[:255]
            ),
        )
        auth_frame = self.expect(FrameType.AUTH)
        (mac,) = decode_payload("AUTH", auth_frame.payload)
        if psk:
            ok = macs_equal(mac, psk_mac(psk, b"client", cnonce, snonce))
        else:
            ok = macs_equal(mac, bytes(MAC_SIZE))
        if not ok:
            raise AuthError("wrong pre-shared key" if psk else "AUTH mac must be zero in TLS mode")
        self.send(FrameType.AUTH, encode_payload("AUTH_REPLY", 0))

    def read_open(self) -> tuple[str, int, int, str, int]:
        f = self.expect(FrameType.OPEN)
        device, mem_quota, max_inflight, client, handle_epoch = decode_payload("OPEN", f.payload)
        return device, mem_quota, max_inflight, client, handle_epoch

    def leftover(self) -> list[Frame]:
        out = list(self.queued)
        self.queued.clear()
        return out
