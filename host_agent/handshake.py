"""Connection setup after TLS: HELLO, AUTH, then OPEN (docs/PROTOCOL.md
"Connection = one session", steps 2-4), as a sans-IO state machine. Instead
of OPEN an authenticated client may send INVENTORY: the agent answers it
itself and closes (no session, no worker).

The agent's main process runs this for every connection before it has
authenticated (host_agent/admission.py does the I/O), so it is written for a
hostile peer: it only ever sees whole frames from a FrameReader (whose
header checks bound every payload), any frame other than the expected one is
a ProtocolError, a wrong key or auth mode an AuthError. ``receive`` returns
the bytes to send; after OPEN, ``open`` holds the request.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from vpcie.errors import AuthError, ProtocolError
from vpcie.protocol.codes import PROTOCOL_VERSION, AuthMode, FrameFlag, FrameType
from vpcie.protocol.frames import (
    MAC_SIZE,
    NONCE_SIZE,
    Frame,
    decode_payload,
    encode_frame,
    encode_payload,
    macs_equal,
    psk_mac,
)


class HandshakeState(enum.Enum):
    HELLO = "hello"  # waiting for the client's HELLO
    AUTH = "auth"  # HELLO_REPLY sent, waiting for AUTH
    OPEN = "open"  # authenticated, waiting for OPEN
    DONE = "done"  # OPEN received (``open`` is set) or INVENTORY (``inventory``)


@dataclass(frozen=True)
class OpenRequest:
    device: str  # "" = any
    mem_quota: int
    max_inflight: int
    client: str
    handle_epoch: int = 0  # the top byte of every handle this session issues
    lease_token: int = 0  # the pool lease's fencing token (0: no pool lease)
    # the leases live when it was created, its own included (fencing.py)
    lease_live: tuple[int, ...] = ()


class ServerHandshake:
    """The agent's side of HELLO/AUTH/OPEN; TLS (if any) is already done."""

    def __init__(self, mode: AuthMode, agent_name: str, psk: bytes = b"") -> None:
        if mode == AuthMode.PSK and not psk:
            raise ValueError("PSK mode needs a key")
        self.mode = mode
        self.agent_name = agent_name[:255]
        self.psk = psk if mode == AuthMode.PSK else b""
        self.state = HandshakeState.HELLO
        self.client_name = ""
        self.open: OpenRequest | None = None
        self.inventory = False  # the client asked for INVENTORY instead of OPEN
        self._cnonce = b""
        self._snonce = b""

    @property
    def authenticated(self) -> bool:
        return self.state in (HandshakeState.OPEN, HandshakeState.DONE)

    def receive(self, f: Frame) -> bytes:
        """Take one frame from the client; returns the reply bytes to send."""
        st = self.state
        if st == HandshakeState.HELLO:
            return self._hello(_expect(f, FrameType.HELLO))
        if st == HandshakeState.AUTH:
            return self._auth(_expect(f, FrameType.AUTH))
        if st == HandshakeState.OPEN:
            if f.type == FrameType.INVENTORY:
                if _expect(f, FrameType.INVENTORY).payload:
                    raise ProtocolError("INVENTORY request with a payload")
                self.inventory = True
                self.state = HandshakeState.DONE
                return b""
            device, mem_quota, max_inflight, client, epoch, token, _n, live = decode_payload(
                "OPEN", _expect(f, FrameType.OPEN).payload
            )
            self.open = OpenRequest(
                device, mem_quota, max_inflight, client, epoch, token, tuple(t for (t,) in live)
            )
            self.state = HandshakeState.DONE
            return b""
        raise ProtocolError(f"{_name(f.type)} frame after OPEN, before OPEN_REPLY")

    def _hello(self, f: Frame) -> bytes:
        proto_min, proto_max, auth, cnonce, name = decode_payload("HELLO", f.payload)
        self.client_name = name
        if not proto_min <= PROTOCOL_VERSION <= proto_max:
            raise ProtocolError(
                f"client speaks v{proto_min}..{proto_max}, agent v{PROTOCOL_VERSION}"
            )
        if auth != self.mode:
            raise AuthError(f"client uses auth mode {auth}, this agent {self.mode.name}")
        self._cnonce, self._snonce = cnonce, os.urandom(NONCE_SIZE)
        psk = self.psk
        proof = psk_mac(psk, b"agent", cnonce, self._snonce) if psk else bytes(MAC_SIZE)
        self.state = HandshakeState.AUTH
        payload = encode_payload(
            "HELLO_REPLY", PROTOCOL_VERSION, int(self.mode), self._snonce, proof, self.agent_name
        )
        return encode_frame(FrameType.HELLO, payload, flags=FrameFlag.REPLY)

    def _auth(self, f: Frame) -> bytes:
        (mac,) = decode_payload("AUTH", f.payload)
        psk = self.psk
        if psk:
            ok = macs_equal(mac, psk_mac(psk, b"client", self._cnonce, self._snonce))
        else:
            ok = macs_equal(mac, bytes(MAC_SIZE))
        if not ok:
            raise AuthError("wrong pre-shared key" if psk else "AUTH mac must be zero in TLS mode")
        self.state = HandshakeState.OPEN
        return encode_frame(FrameType.AUTH, encode_payload("AUTH_REPLY", 0), flags=FrameFlag.REPLY)


def _name(ftype: int) -> str:
    return FrameType(ftype).name if ftype in tuple(FrameType) else str(ftype)


def _expect(f: Frame, ftype: FrameType) -> Frame:
    if f.type != ftype:
        raise ProtocolError(f"expected {ftype.name}, got {_name(f.type)}")
    if f.flags & FrameFlag.REPLY:
        raise ProtocolError(f"{ftype.name} with the REPLY flag from a client")
    return f


def error_frame(code: int, message: str) -> bytes:
    """The ERROR frame (fatal) that tells a refused peer why."""
    return encode_frame(FrameType.ERROR, encode_payload("ERROR", int(code), 1, message[:500]))


def inventory_reply_frame(document: bytes) -> bytes:
    """INVENTORY|REPLY carrying ``document`` (JSON bytes)."""
    return encode_frame(
        FrameType.INVENTORY, encode_payload("INVENTORY_REPLY", document), flags=FrameFlag.REPLY
    )


def open_reply_frame(status: int, session: int, message: str, info: bytes) -> bytes:
    payload = encode_payload("OPEN_REPLY", int(status), session, message[:1000], info)
    return encode_frame(FrameType.OPEN, payload, session=session, flags=FrameFlag.REPLY)
