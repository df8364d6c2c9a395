"""Sending frames from a worker: one lock, vectored writes, no bulk copies.

A plain TCP socket gets ``sendmsg`` with the header and the payload views as
separate iovecs (D2H data goes straight from device/staging memory); an
SSLSocket has no sendmsg, so small parts are joined and big views sent as
they are.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from vpcie.protocol.codes import FrameType
from vpcie.protocol.frames import SEQ_LENGTH, header_prefix

__all__ = ["MAX_IOV", "SEQ_LENGTH", "Buf", "Sender", "completion_head"]

Buf = bytes | bytearray | memoryview


class SendAll(Protocol):
    """A TLS stream (host_agent.tlsstream.TlsStream): no sendmsg, only sendall."""

    def sendall(self, data: Buf) -> None: ...
MAX_IOV = 512  # below IOV_MAX (1024 on Linux)
_JOIN_LIMIT = 64 * 1024  # TLS: parts smaller than this are joined


def completion_head(session: int) -> bytes:
    """The bytes of every COMPLETION header of ``session`` before seq
    (append ``SEQ_LENGTH.pack(seq, n)``)."""
    return header_prefix(FrameType.COMPLETION, session)


class Sender:
    def __init__(self, sock: socket.socket | SendAll) -> None:
        self.sock: Any = sock
        self.lock = threading.Lock()
        self.tls = not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket)

    def send(self, parts: Sequence[Buf]) -> None:
        """Send all parts, in order, as one write where the kernel allows."""
        with self.lock:
            self.send_alone(parts)

    def send_alone(self, parts: Sequence[Buf]) -> None:
        """``send`` without the lock, for a caller that knows no other thread
        can be sending now (a session's reader before it started any lane)."""
        if self.tls:
            self._send_tls(parts)
        elif len(parts) <= MAX_IOV:
            # Common case (replies of one recv): one sendmsg takes everything.
            total = 0
            for p in parts:  # mostly bytes; a view may be typed (nbytes != len)
                total += len(p) if type(p) is bytes else memoryview(p).nbytes
            sent = self.sock.sendmsg(parts)
            if sent != total:
                self._send_plain(_skip(parts, sent))
        else:
            self._send_plain(parts)

    def _send_plain(self, parts: Sequence[Buf]) -> None:
        """Send all ``parts``, MAX_IOV at a time, until the kernel took them."""
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        i = 0
        while i < len(views):
            batch = views[i : i + MAX_IOV]
            sent = self.sock.sendmsg(batch)
            # Skip whole views sent; keep the tail of a partly sent one.
            while sent:
                first = views[i]
                if sent >= len(first):
                    sent -= len(first)
                    i += 1
                else:
                    views[i] = first[sent:]
                    sent = 0

    def _send_tls(self, parts: Sequence[Buf]) -> None:
        small: list[Buf] = []
        for p in parts:
            if len(p) < _JOIN_LIMIT:
                small.append(p)
                continue
            if small:
                self.sock.sendall(b"".join(small))
                small = []
            self.sock.sendall(p)
        if small:
            self.sock.sendall(b"".join(small))


def _skip(parts: Sequence[Buf], sent: int) -> list[memoryview]:
    """The parts left after ``sent`` bytes went out."""
    out: list[memoryview] = []
    for p in parts:
        v = memoryview(p).cast("B")
        if sent >= len(v):
            sent -= len(v)
            continue
        out.append(v[sent:])
        sent = 0
    return out
