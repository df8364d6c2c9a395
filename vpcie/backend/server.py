"""The socket edge: accept QEMU, recvmsg bytes + fds, feed the Connection.

One connection at a time (vhost-user is point to point); after it closes,
cleanly or by a protocol error, the next one is accepted, so QEMU's
``reconnect-ms=`` finds the backend again.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from vpcie.backend.core import BackendCore
from vpcie.backend.device import Device
from vpcie.backend.sockpath import ClaimedSocket, SocketAccess
from vpcie.errors import ProtocolError
from vpcie.vhost_user.connection import Connection, Runstate
from vpcie.vhost_user.constants import MAX_FDS_PER_MESSAGE
from vpcie.vhost_user.messages import Message

log = logging.getLogger("vpcie.backend")

RECV_SIZE = 65536
_FD_SIZE = array.array("i").itemsize

EventSink = Callable[..., None]


def _default_event(event: str, **fields: Any) -> None:
    log.info(event, extra={"fields": fields})


async def recvmsg_fds(sock: socket.socket, size: int = RECV_SIZE) -> tuple[bytes, list[int]]:
    """One non-blocking recvmsg of at most ``size`` bytes with SCM_RIGHTS fds.

    Returns b"" at end of stream.
    """
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(
                size, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD_SIZE)
            )
        except BlockingIOError:
            fut: asyncio.Future[None] = loop.create_future()

            def ready(f: asyncio.Future[None] = fut) -> None:
                if not f.done():
                    f.set_result(None)

            loop.add_reader(sock.fileno(), ready)
            try:
                await fut
            finally:
                loop.remove_reader(sock.fileno())
            continue
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
                fds.extend(arr)
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("too many fds in one message (control data truncated)")
        return data, fds


class BackendServer:
    """Serves vhost-user connections for one Device, one at a time."""

    def __init__(
        self, device: Device, *, event: EventSink | None = None, poll_s: float = 0.0
    ) -> None:
        self.device = device
        self.core = BackendCore(device, poll_s=poll_s)
        self.connection: Connection | None = None
        self.connections = 0
        self._event = event or _default_event
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Ask serve_* to return (signal handlers call this)."""
        self._stopping.set()

    # ----------------------------------------------------------- listening
    async def serve_path(self, path: str, access: SocketAccess | None = None) -> None:
        """Listen on unix socket ``path`` until stop(). Refuses (ConfigError) a
        path where a live socket or a non-socket is; replaces a stale socket;
        removes the path at the end only while it is still our socket."""
        claimed = ClaimedSocket(path, access)
        try:
            self._event("listening", path=path)
            await self.serve_listener(claimed.sock)
        finally:
            claimed.release()

    async def serve_fd(self, fd: int) -> None:
        """Serve an inherited fd: a listening socket, or one connected socket (libvirt)."""
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX:
            sock.detach()
            raise ProtocolError(f"--fd {fd} is not a unix socket")
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            try:
                await self.serve_listener(sock)
            finally:
                sock.close()
        else:
            self._event("inherited_connection", fd=fd)
            await self._race_stop(self.serve_connection(sock))

    async def serve_listener(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        while not self._stopping.is_set():
            accept = asyncio.ensure_future(loop.sock_accept(listener))
            stop = asyncio.ensure_future(self._stopping.wait())
            done, _ = await asyncio.wait({accept, stop}, return_when=asyncio.FIRST_COMPLETED)
            if accept not in done:
                accept.cancel()
                stop.cancel()
                break
            stop.cancel()
            conn, _ = accept.result()
            await self._race_stop(self.serve_connection(conn))
        self.core.close()

    async def _race_stop(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    # ---------------------------------------------------------- connection
    async def serve_connection(self, sock: socket.socket) -> None:
        """Run one vhost-user connection until EOF or a protocol error."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self.connections += 1
        number = self.connections
        peer = _peer_pid(sock)
        self._event("connected", connection=number, peer_pid=peer)
        conn = Connection(self.core, on_message=self._on_message)
        self.connection = conn
        reason = "eof"
        try:
            while True:
                data, fds = await recvmsg_fds(sock, conn.next_read_size())
                if not data:
                    for fd in fds:
                        os.close(fd)
                    break
                out = conn.receive(data, fds)
                if out:
                    await loop.sock_sendall(sock, out)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
        except (ConnectionResetError, BrokenPipeError) as exc:
            reason = f"connection lost: {exc}"
        except asyncio.CancelledError:
            reason = "backend stopping"
            raise
        finally:
            conn.close()
            self.core.disconnected()
            sock.close()
            self._event(
                "disconnected",
                connection=number,
                reason=reason,
                messages=len(conn.handled),
            )

    def _on_message(self, msg: Message, state: Runstate) -> None:
        fields: dict[str, Any] = {"request": msg.name, "state": state.value}
        if isinstance(msg.payload, int):
            fields["value"] = hex(msg.payload)
        elif msg.payload is not None and not isinstance(msg.payload, bytes):
            fields["payload"] = repr(msg.payload)
        if msg.fds:
            fields["fds"] = len(msg.fds)
        self._event("message", **fields)

    def status(self) -> dict[str, object]:
        conn = self.connection
        return {
            "connections": self.connections,
            "state": conn.state.value if conn else None,
            "rings": conn.ring_status() if conn else [],
            "core": self.core.status(),
        }


def _peer_pid(sock: socket.socket) -> int | None:
    try:
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except OSError:
        return None
    return int.from_bytes(cred[:4], "little")
