"""The device-neutral core: vhost-user effects applied to memory, queues, a Device.

``BackendCore`` implements ``VhostUserHandler`` for one backend process. It
outlives connections: a QEMU reconnect gets a fresh ``Connection`` driving
the same core (and the same Device state), and rings restart from what QEMU
resends (SET_VRING_BASE).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from vpcie.backend.device import Device
from vpcie.backend.poller import BusyPoller
from vpcie.errors import GuestError, ProtocolError
from vpcie.memory import GuestMemory, MemoryRegion, MemoryTable
from vpcie.vhost_user.connection import RingConfig
from vpcie.vhost_user.constants import ProtocolFeature, bit
from vpcie.vhost_user.messages import MemRegion
from vpcie.virtqueue import VirtQueue

log = logging.getLogger(__name__)

OFFERED_PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.RESET_DEVICE)
)


@dataclass
class _Queue:
    config: RingConfig
    vq: VirtQueue
    kick_fd: int
    call_fd: int | None
    claimed: bool = False  # the device serves it from its own thread (claim_kicks)


class BackendCore:
    """Guest memory, started queues and the device, driven by vhost-user messages."""

    def __init__(
        self,
        device: Device,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        poll_s: float = 0.0,
    ) -> None:
        self.device = device
        self._loop = loop
        self.poller = BusyPoller(poll_s, loop)
        self._memory = MemoryTable()
        self._queues: dict[int, _Queue] = {}
        self.kicks = 0
        self.notifies = 0
        device.attach(self)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # ------------------------------------------------------------ DeviceHost
    @property
    def memory(self) -> MemoryTable:
        return self._memory

    def queue(self, index: int) -> VirtQueue | None:
        q = self._queues.get(index)
        return q.vq if q is not None else None

    def notify(self, index: int) -> None:
        q = self._queues.get(index)
        if q is None or q.call_fd is None:
            return
        if q.vq.needs_notify():
            os.eventfd_write(q.call_fd, 1)
            self.notifies += 1

    def claim_kicks(self, index: int) -> tuple[VirtQueue, int, int | None] | None:
        q = self._queues.get(index)
        if q is None:
            return None
        if not q.claimed:
            self.loop.remove_reader(q.kick_fd)
            q.claimed = True
        return q.vq, q.kick_fd, q.call_fd

    def unclaim_kicks(self, index: int) -> None:
        q = self._queues.get(index)
        if q is None or not q.claimed:
            return
        q.claimed = False
        self.loop.add_reader(q.kick_fd, self._on_kick_fd, index)
        self.loop.call_soon(self._service, index)  # kicks the device took no notice of

    # ------------------------------------------------------ VhostUserHandler
    def offered_features(self) -> int:
        return self.device.features()

    def offered_protocol_features(self) -> int:
        return OFFERED_PROTOCOL_FEATURES

    def num_queues(self) -> int:
        return self.device.num_queues()

    def set_features(self, features: int) -> None:
        self.device.on_features(features)

    def set_mem_table(self, regions: Sequence[MemRegion], fds: Sequence[int]) -> None:
        # mmap first: a table that does not map leaves the old one in place.
        new = GuestMemory(
            [
                MemoryRegion(r.guest_address, r.size, r.user_address, r.mmap_offset, fd)
                for r, fd in zip(regions, fds, strict=True)
            ]
        )
        running = [q.config for q in self._queues.values()]
        # Rings restart on the new table where they stopped (memory hotplug);
        # work in flight finishes on the old mapping, closed after it.
        bases = {cfg.index: self.stop_ring(cfg.index) for cfg in running}
        self._memory.replace(new)
        for cfg in running:
            self.start_ring(_with_base(cfg, bases[cfg.index]))
        log.info(
            "memory table: %d region(s), %d MiB", len(regions), sum(r.size for r in regions) >> 20
        )

    def start_ring(self, ring: RingConfig) -> None:
        if ring.index in self._queues:
            raise ProtocolError(f"ring {ring.index} started twice")
        mem = self._memory.mem
        try:
            vq = VirtQueue.from_uva(
                mem,
                ring.num,
                ring.desc_uva,
                ring.avail_uva,
                ring.used_uva,
                event_idx=ring.event_idx,
            )
        except GuestError as exc:
            # QEMU gave ring addresses outside the table it sent: its fault.
            raise ProtocolError(f"ring {ring.index}: {exc}") from None
        vq.last_avail_idx = ring.base
        self._queues[ring.index] = _Queue(ring, vq, ring.kick_fd, ring.call_fd)
        self.loop.add_reader(ring.kick_fd, self._on_kick_fd, ring.index)
        log.info("ring %d started: num %d base %d", ring.index, ring.num, ring.base)
        # A kick may have come before we watched the fd: look at the ring now.
        self.loop.call_soon(self._service, ring.index)
        self.device.on_queue_started(ring.index)

    def stop_ring(self, index: int) -> int:
        q = self._queues.pop(index, None)
        if q is None:
            return 0
        self.loop.remove_reader(q.kick_fd)
        self.device.on_queue_stopped(index)
        base = int(q.vq.last_avail_idx)
        log.info("ring %d stopped at %d", index, base)
        return base

    def set_call_fd(self, index: int, fd: int | None) -> None:
        q = self._queues.get(index)
        if q is not None:
            q.call_fd = fd
            self.device.on_call_fd(index, fd)

    def get_config(self, offset: int, size: int) -> bytes:
        return self.device.config()[offset : offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        self.device.set_config(offset, data)

    def set_gpu_socket(self, fd: int) -> None:
        self.device.on_set_socket(os.dup(fd))

    def reset(self) -> None:
        for index in list(self._queues):
            self.stop_ring(index)
        self.device.reset()

    # -------------------------------------------------------------- lifecycle
    def disconnected(self) -> None:
        """The front-end went away: reset the device (its guest is gone: drop
        contexts and remote sessions, end in-flight work), stop every ring and
        drop guest memory."""
        self.device.reset()
        for index in list(self._queues):
            self.stop_ring(index)
        self._memory.replace(None)

    def close(self) -> None:
        self.disconnected()
        self.device.close()

    def status(self) -> dict[str, object]:
        return {
            "memory": self._memory.present,
            "queues": {
                i: {"num": q.config.num, "last_avail_idx": int(q.vq.last_avail_idx)}
                for i, q in self._queues.items()
            },
            "kicks": self.kicks,
            "notifies": self.notifies,
        }

    # ----------------------------------------------------------------- kicks
    def _on_kick_fd(self, index: int) -> None:
        q = self._queues.get(index)
        if q is None:
            return
        try:
            os.eventfd_read(q.kick_fd)
        except BlockingIOError:
            pass
        self.kicks += 1
        self._serve(index, q)
        self.poller.touch()

    def _service(self, index: int) -> None:
        q = self._queues.get(index)
        if q is not None:
            self._serve(index, q)

    def _serve(self, index: int, q: _Queue) -> None:
        try:
            self.device.on_kick(index, q.vq)
        except GuestError as exc:
            log.warning("queue %d: guest error: %s", index, exc)
        if q.call_fd is not None and q.vq.needs_notify():  # notify(index), inlined
            os.eventfd_write(q.call_fd, 1)
            self.notifies += 1


def _with_base(cfg: RingConfig, base: int) -> RingConfig:
    return RingConfig(
        index=cfg.index,
        num=cfg.num,
        desc_uva=cfg.desc_uva,
        avail_uva=cfg.avail_uva,
        used_uva=cfg.used_uva,
        base=base,
        kick_fd=cfg.kick_fd,
        call_fd=cfg.call_fd,
        event_idx=cfg.event_idx,
    )
