"""A vhost-user front-end that plays QEMU, for tests.

It owns memfd-backed guest RAM, performs QEMU 10's handshake for a
vhost-user-gpu (DESIGN.md "Handshake QEMU performs", same order), drives the
two queues with ``DriverQueue`` and shuts down like QEMU (SET_VRING_ENABLE 0 +
GET_VRING_BASE)::

    async with VhostUserFrontend.connect(path, mem_size=64 << 20) as fe:
        head = fe.ctrl.add(readable=[req], writable=[(fe.alloc(4096), 4096)])
        fe.kick(0)
        used_len = await fe.wait_used(0, head)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

from vpcie.backend.server import recvmsg_fds
from vpcie.errors import ProtocolError
from vpcie.memory import GuestMemory
from vpcie.vhost_user.codec import MessageDecoder, encode_message, request
from vpcie.vhost_user.constants import Flag, ProtocolFeature, Request, VirtioFeature, bit
from vpcie.vhost_user.messages import (
    REPLY_PAYLOAD,
    ConfigSpace,
    MemRegion,
    MemTable,
    Message,
    Payload,
    VringAddr,
    VringFile,
    VringState,
)
from vpcie.virtqueue import DriverQueue, GuestAllocator

QUEUE_SIZES = (256, 16)  # control, cursor: what QEMU's vhost-user-gpu sets
RING_AREA = 1 << 20  # guest RAM reserved for rings and indirect tables
# What QEMU 10 acks in SET_FEATURES (DESIGN.md: INDIRECT_DESC, EVENT_IDX and
# RING_RESET even if not offered).
QEMU_FORCED = (
    bit(VirtioFeature.VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VirtioFeature.VIRTIO_RING_F_EVENT_IDX)
    | bit(VirtioFeature.VIRTIO_F_RING_RESET)
)
WANTED_PROTOCOL = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.RESET_DEVICE)
)


class VhostUserFrontend:
    """QEMU's side of a vhost-user-gpu connection."""

    def __init__(self, sock: socket.socket, mem_size: int, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.mem = GuestMemory.anonymous([(0, mem_size)])
        self._rings = GuestAllocator(self.mem, 0, RING_AREA)
        self._heap = GuestAllocator(self.mem, RING_AREA, mem_size - RING_AREA)
        self._decoder = MessageDecoder(replies=True)
        self._pending: list[Message] = []
        self.features = 0
        self.protocol_features = 0
        self.queue_num = 0
        self.config = b""
        self.queues: list[DriverQueue] = []
        self.kick_fds: list[int] = []
        self.call_fds: list[int] = []
        self.err_fds: list[int] = []
        self._used: list[dict[int, int]] = []
        gpu_ours, gpu_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.gpu_socket = gpu_ours  # QEMU's end of the vhost-user-gpu socket
        self._gpu_theirs = gpu_theirs

    # --------------------------------------------------------------- set up
    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        path: str,
        *,
        mem_size: int = 64 << 20,
        timeout: float = 5.0,
        handshake: bool = True,
        queue_sizes: Sequence[int] = QUEUE_SIZES,
    ) -> AsyncIterator[VhostUserFrontend]:
        """Connect to a backend listening on ``path`` (retrying until ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        fe = cls(sock, mem_size, timeout)
        try:
            if handshake:
                await fe.handshake(queue_sizes)
            yield fe
        finally:
            fe.close()

    async def __aenter__(self) -> VhostUserFrontend:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        for fd in self.kick_fds + self.call_fds + self.err_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kick_fds, self.call_fds, self.err_fds = [], [], []
        self.gpu_socket.close()
        self._gpu_theirs.close()
        self._decoder.close()
        self.mem.close()

    # ------------------------------------------------------------ messages
    async def send(
        self,
        req: Request | int,
        payload: Payload = None,
        fds: Sequence[int] = (),
        *,
        flags: int | None = None,
    ) -> None:
        msg = request(req, payload)
        if flags is not None:
            msg = Message(msg.request, flags, payload)
        await self.send_raw(encode_message(msg), fds)

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            self.sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(_fd_array(fds)))]
            )
        else:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def recv_reply(self, req: Request | int) -> Message:
        """The next reply; it must answer ``req``."""
        async with asyncio.timeout(self.timeout):
            while not self._pending:
                data, fds = await recvmsg_fds(self.sock, self._decoder.next_read_size())
                if not data:
                    raise ConnectionResetError("backend closed the connection")
                self._pending += self._decoder.feed(data, fds)
        msg = self._pending.pop(0)
        if msg.request != req:
            raise ProtocolError(f"reply to {msg.name}, expected {Request(req).name}")
        return msg

    async def call(
        self,
        req: Request,
        payload: Payload = None,
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
    ) -> Payload:
        """Send ``req``; wait for its reply (own reply, or REPLY_ACK if asked)."""
        flags = 0x1 | (Flag.NEED_REPLY if need_reply else 0)
        await self.send(req, payload, fds, flags=int(flags))
        has_reply = req in REPLY_PAYLOAD
        acked = need_reply and self.protocol_features & bit(ProtocolFeature.REPLY_ACK)
        if not has_reply and not acked:
            return None
        msg = await self.recv_reply(req)
        if not has_reply and msg.payload != 0:
            raise ProtocolError(f"{req.name} failed: ack {msg.payload!r}")
        return msg.payload

    # ----------------------------------------------------------- handshake
    async def handshake(self, queue_sizes: Sequence[int] = QUEUE_SIZES) -> None:
        """QEMU 10's vhost-user-gpu sequence (DESIGN.md), start to RUNNING."""
        offered = await self.call(Request.GET_FEATURES)
        assert isinstance(offered, int)
        if offered & bit(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES):
            proto = await self.call(Request.GET_PROTOCOL_FEATURES)
            assert isinstance(proto, int)
            self.protocol_features = proto & WANTED_PROTOCOL
            await self.call(Request.SET_PROTOCOL_FEATURES, self.protocol_features)
        qn = await self.call(Request.GET_QUEUE_NUM)
        assert isinstance(qn, int)
        self.queue_num = qn
        await self.call(Request.SET_OWNER)
        for i in range(len(queue_sizes)):
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.call_fds.append(call)
            self.err_fds.append(err)
            await self.call(Request.SET_VRING_CALL, VringFile(i, False), [call])
            await self.call(Request.SET_VRING_ERR, VringFile(i, False), [err])
        cfg = await self.call(Request.GET_CONFIG, ConfigSpace(0, 16, 0, bytes(16)))
        assert isinstance(cfg, ConfigSpace)
        self.config = cfg.payload
        await self.call(Request.GPU_SET_SOCKET, None, [self._gpu_theirs.fileno()])
        self.features = (offered | QEMU_FORCED) & ~bit(VirtioFeature.VIRTIO_GPU_F_CONTEXT_INIT)
        await self.call(Request.SET_FEATURES, self.features)
        await self.set_mem_table()
        event_idx = bool(self.features & bit(VirtioFeature.VIRTIO_RING_F_EVENT_IDX))
        for i, num in enumerate(queue_sizes):
            dq = DriverQueue(self.mem, num, self._rings, event_idx=event_idx, hold_completed=True)
            self.queues.append(dq)
            self._used.append({})
            await self.start_queue(i)

    async def set_mem_table(self) -> None:
        regions = tuple(
            MemRegion(r.guest_phys_addr, r.size, r.user_addr, r.mmap_offset) for r in self.mem.table
        )
        fds = [r.fd for r in self.mem.table]
        await self.call(Request.SET_MEM_TABLE, MemTable(regions), fds, need_reply=True)

    def uva(self, gpa: int) -> int:
        for r in self.mem.table:
            if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.size:
                return r.user_addr + gpa - r.guest_phys_addr
        raise ValueError(f"GPA {gpa:#x} not in guest memory")

    async def start_queue(self, index: int, base: int = 0) -> None:
        """SET_VRING_NUM, BASE, ADDR, KICK, ENABLE 1 (what QEMU sends at DRIVER_OK)."""
        dq = self.queues[index]
        await self.call(Request.SET_VRING_NUM, VringState(index, dq.num))
        await self.call(Request.SET_VRING_BASE, VringState(index, base))
        addr = VringAddr(
            index, 0, self.uva(dq.desc_gpa), self.uva(dq.used_gpa), self.uva(dq.avail_gpa), 0
        )
        await self.call(Request.SET_VRING_ADDR, addr)
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        while len(self.kick_fds) <= index:
            self.kick_fds.append(-1)
        if self.kick_fds[index] >= 0:
            os.close(self.kick_fds[index])
        self.kick_fds[index] = kick
        await self.call(Request.SET_VRING_KICK, VringFile(index, False), [kick])
        await self.call(Request.SET_VRING_ENABLE, VringState(index, 1), need_reply=True)

    async def stop_queue(self, index: int) -> int:
        """SET_VRING_ENABLE 0 + GET_VRING_BASE, as QEMU at shutdown; returns the base."""
        await self.call(Request.SET_VRING_ENABLE, VringState(index, 0), need_reply=True)
        state = await self.call(Request.GET_VRING_BASE, VringState(index, 0))
        assert isinstance(state, VringState) and state.index == index
        return state.num

    async def shutdown(self) -> list[int]:
        """Stop every queue like QEMU does; returns their bases."""
        return [await self.stop_queue(i) for i in range(len(self.queues))]

    # --------------------------------------------------------------- queues
    @property
    def ctrl(self) -> DriverQueue:
        return self.queues[0]

    @property
    def cursor(self) -> DriverQueue:
        return self.queues[1]

    def alloc(self, size: int, align: int = 16) -> int:
        """Guest RAM for a buffer (GPA)."""
        return self._heap.alloc(size, align)

    def kick(self, index: int) -> None:
        """Publish the avail ring and signal the kick eventfd (if the device wants it)."""
        if self.queues[index].kick():
            os.eventfd_write(self.kick_fds[index], 1)

    def poll_used(self, index: int, head: int) -> int | None:
        """Chain ``head``'s written length if the device has returned it (and
        the head is free again), else None; never waits (a guest polling its
        used ring, with no event loop in between)."""
        used = self._used[index]
        for h, n in self.queues[index].get_used():
            used[h] = n
        if head not in used:
            return None
        self.queues[index].release(head)
        return used.pop(head)

    async def wait_used(self, index: int, head: int, timeout: float | None = None) -> int:
        """Wait until the device returned chain ``head``; its written length."""
        loop = asyncio.get_running_loop()
        fd = self.call_fds[index]
        async with asyncio.timeout(timeout if timeout is not None else self.timeout):
            while True:
                # Only once returned may the head be reused: several chains can
                # be in flight, and another waiter may have collected ours.
                got = self.poll_used(index, head)
                if got is not None:
                    return got
                fut: asyncio.Future[None] = loop.create_future()

                def ready(f: asyncio.Future[None] = fut) -> None:
                    if not f.done():
                        f.set_result(None)

                loop.add_reader(fd, ready)
                try:
                    await asyncio.wait_for(fut, 0.05)  # re-check: interrupts may be off
                except TimeoutError:
                    pass
                finally:
                    loop.remove_reader(fd)
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)


def _fd_array(fds: Sequence[int]) -> bytes:
    import array

    return array.array("i", fds).tobytes()
