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

Buf = bytes | bytearray | memoryview
MAX_IOV = 512  # below IOV_MAX (1024 on Linux)
_JOIN_LIMIT = 64 * 1024  # TLS: parts smaller than this are joined


class Sender:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.tls = isinstance(sock, ssl.SSLSocket)

    def send(self, parts: Sequence[Buf]) -> None:
        """Send all parts, in order, as one write where the kernel allows."""
        with self.lock:
            if self.tls:
                self._send_tls(parts)
            else:
                self._send_plain(parts)

    def _send_plain(self, parts: Sequence[Buf]) -> None:
        if len(parts) <= MAX_IOV:
            # Common case (replies of one recv): one sendmsg takes everything.
            total = sum(memoryview(p).nbytes for p in parts)
            sent = self.sock.sendmsg(parts)
            if sent == total:
                return
            parts = _skip(parts, sent)
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
