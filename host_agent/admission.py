"""Admission: what a connection costs the agent before it has authenticated.

The agent's main process runs TLS, HELLO, AUTH and OPEN for every connection
itself, on its asyncio loop with non-blocking sockets, so an unauthenticated
peer costs one socket, an SSL object and a few KB of buffers, never a
process. Bounds (docs/SECURITY.md "Before authentication"):

* one deadline per connection (``auth_timeout``) for everything up to OPEN;
* ``PendingTable``: at most ``max_handshakes`` connections in this phase,
  and ``max_per_source`` from one address; over a cap the OLDEST such
  connection is dropped (a flood then churns itself, while a peer that
  completes its handshake promptly is never the one dropped);
* frames are read header first and a payload over ``MAX_CONTROL_PAYLOAD``
  (HELLO/AUTH/OPEN are all smaller) is refused before anything is allocated;
* exactly the bytes of HELLO, AUTH and OPEN are read: what the client sent
  after OPEN stays in the kernel (or in the SSL object's buffer) for the
  worker that inherits the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from host_agent.handshake import OpenRequest, ServerHandshake
from host_agent.tls import peer_name
from vpcie.errors import ProtocolError
from vpcie.protocol.codes import MAX_CONTROL_PAYLOAD, AuthMode
from vpcie.protocol.frames import HEADER_SIZE, SEQ_LENGTH, Frame, FrameReader

_LENGTH_AT = HEADER_SIZE - SEQ_LENGTH.size  # (seq, length) end the header
_READER_BUF = HEADER_SIZE + MAX_CONTROL_PAYLOAD
_DRAIN_MAX = 256 * 1024  # unread bytes taken before closing a refused connection


class PendingTable:
    """Unauthenticated connections, oldest first, and whom a newcomer evicts
    (sans-IO: keys are the caller's, nothing here touches a socket)."""

    def __init__(self, max_total: int, max_per_source: int) -> None:
        if max_total < 1 or max_per_source < 1:
            raise ValueError("caps must be at least 1")
        self.max_total = max_total
        self.max_per_source = max_per_source
        self._order: OrderedDict[int, str] = OrderedDict()  # key -> source, oldest first
        self._per_source: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: int) -> bool:
        return key in self._order

    def count(self, source: str) -> int:
        return self._per_source.get(source, 0)

    def add(self, key: int, source: str) -> list[int]:
        """Admit ``key`` from ``source``; returns the keys to drop (already
        forgotten here), oldest first."""
        evict: list[int] = []
        if self.count(source) >= self.max_per_source:
            oldest = next(k for k, s in self._order.items() if s == source)
            evict.append(oldest)
            self.remove(oldest)
        if len(self._order) >= self.max_total:
            oldest = next(iter(self._order))
            evict.append(oldest)
            self.remove(oldest)
        self._order[key] = source
        self._per_source[source] = self.count(source) + 1
        return evict

    def remove(self, key: int) -> None:
        source = self._order.pop(key, None)
        if source is None:
            return
        left = self._per_source[source] - 1
        if left:
            self._per_source[source] = left
        else:
            del self._per_source[source]


@dataclass
class Admitted:
    """A connection that authenticated and sent OPEN (or INVENTORY: ``open``
    is None)."""

    sock: socket.socket  # an ssl.SSLSocket in TLS mode; non-blocking
    open: OpenRequest | None
    client_name: str  # from HELLO
    peer_cn: str  # the client certificate's common name (TLS), else ""


class Waiter:
    """Waits for a non-blocking socket to become readable or writable."""

    def __init__(self, sock: socket.socket) -> None:
        self.loop = asyncio.get_running_loop()
        self.fd = sock.fileno()

    async def wait(self, writing: bool) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if writing:
            self.loop.add_writer(self.fd, ready)
        else:
            self.loop.add_reader(self.fd, ready)
        try:
            await fut
        finally:
            if writing:
                self.loop.remove_writer(self.fd)
            else:
                self.loop.remove_reader(self.fd)


async def _io(waiter: Waiter, call: Callable[[], int | None], writing: bool) -> int | None:
    """Run a non-blocking socket call until it stops asking to wait."""
    while True:
        try:
            return call()
        except ssl.SSLWantReadError:
            await waiter.wait(False)
        except ssl.SSLWantWriteError:
            await waiter.wait(True)
        except BlockingIOError:
            await waiter.wait(writing)


async def send_all(sock: socket.socket, data: bytes) -> None:
    waiter, view = Waiter(sock), memoryview(data)
    while view:
        n = await _io(waiter, partial(sock.send, view), True)
        view = view[n or 0 :]


async def _read_exact(sock: socket.socket, waiter: Waiter, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = await _io(waiter, partial(sock.recv_into, buf[got:]), False)
        if not n:
            raise ConnectionResetError("peer closed during authentication")
        got += n


async def read_control_frame(sock: socket.socket, waiter: Waiter) -> Frame:
    """One pre-authentication frame: header, length check, then its payload."""
    raw = bytearray(HEADER_SIZE)
    await _read_exact(sock, waiter, memoryview(raw))
    length = SEQ_LENGTH.unpack_from(raw, _LENGTH_AT)[1]
    if length > MAX_CONTROL_PAYLOAD:
        raise ProtocolError(
            f"{length}-byte frame before authentication (at most {MAX_CONTROL_PAYLOAD})"
        )
    raw.extend(bytes(length))
    await _read_exact(sock, waiter, memoryview(raw)[HEADER_SIZE:])
    reader = FrameReader(buffer_size=_READER_BUF)  # the one header/payload validator
    view = reader.get_buffer()
    view[: len(raw)] = raw
    frames = reader.buffer_updated(len(raw))
    if len(frames) != 1:  # a known type's cap is never below MAX_CONTROL_PAYLOAD
        raise ProtocolError("malformed frame before authentication")
    return frames[0]


async def admit(
    sock: socket.socket,
    ssl_ctx: ssl.SSLContext | None,
    hs: ServerHandshake,
    on_tls: Callable[[socket.socket], None],
) -> Admitted:
    """TLS (if ``ssl_ctx``), HELLO, AUTH, OPEN (or INVENTORY) on a non-blocking socket.

    Raises AuthError / ProtocolError / ssl.SSLError / OSError; the caller
    bounds the time. ``on_tls`` gets the SSLSocket as soon as it exists (so
    the caller can close that rather than the raw socket). Replies go out as
    they are produced; on error nothing more is sent here."""
    sock.setblocking(False)
    peer_cn = ""
    if ssl_ctx is not None:
        tls = ssl_ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        on_tls(tls)
        await _io(Waiter(tls), tls.do_handshake, False)
        sock, peer_cn = tls, peer_name(tls)
    waiter = Waiter(sock)
    while hs.open is None and not hs.inventory:
        reply = hs.receive(await read_control_frame(sock, waiter))
        if reply:
            await send_all(sock, reply)
    return Admitted(sock, hs.open, hs.client_name, peer_cn)


def close_refused(sock: socket.socket) -> None:
    """Close a refused connection with a FIN, not a RST: bytes the peer sent
    that were never read would make the kernel reset the connection, and the
    peer could lose the ERROR just sent. Reads only what is already there,
    at most ``_DRAIN_MAX`` bytes, without waiting."""
    left = _DRAIN_MAX
    with contextlib.suppress(OSError, ValueError):
        sock.setblocking(False)
        while left > 0:
            chunk = sock.recv(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)
    sock.close()


async def linger_close(sock: socket.socket, seconds: float) -> None:
    """Half-close a refused connection, then read and drop what the peer still
    sends (until its EOF, ``seconds`` or ``_DRAIN_MAX`` bytes) before closing.

    Why: a TLS 1.3 client sends its first frame (HELLO) right after its side of
    the handshake, before it reads our alert for its certificate. Closed at
    once, the kernel answers that HELLO with a RST, and the client's write
    fails with "connection reset" before it reads the alert: it cannot say
    why it was refused. ``sock`` is detached from TLS first: nothing more is
    written on the TLS stream (no close_notify)."""
    raw = socket.socket(fileno=sock.detach())
    loop = asyncio.get_running_loop()
    left = _DRAIN_MAX
    try:
        raw.setblocking(False)
        raw.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(seconds):
            while left > 0:
                chunk = await loop.sock_recv(raw, min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
    except (OSError, TimeoutError):
        pass
    finally:
        close_refused(raw)


def auth_mode(auth: str) -> AuthMode:
    return AuthMode.TLS if auth == "tls" else AuthMode.PSK
