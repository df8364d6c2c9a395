"""The ``Device`` interface the device-neutral core drives, and a null GPU.

STYLE habit 5: an interface with defaults plus a null implementation. The
virtio-gpu model (vpcie/gpu/) implements ``Device``; ``NullGpuDevice`` answers
every control command with VIRTIO_GPU_RESP_ERR_UNSPEC so that the transport can
be tested end to end before any GPU exists.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Protocol

import construct as cs

from vpcie.vhost_user.constants import VirtioFeature, bit

if TYPE_CHECKING:
    from vpcie.memory import MemoryTable
    from vpcie.virtqueue import VirtQueue

log = logging.getLogger(__name__)

# virtio 1.2 §5.7.4: struct virtio_gpu_config (the device's config space).
VIRTIO_GPU_CONFIG = cs.Struct(
    "events_read" / cs.Int32ul,
    "events_clear" / cs.Int32ul,
    "num_scanouts" / cs.Int32ul,
    "num_capsets" / cs.Int32ul,
)
# virtio 1.2 §5.7.6.7: struct virtio_gpu_ctrl_hdr (24 bytes).
VIRTIO_GPU_CTRL_HDR = cs.Struct(
    "type" / cs.Int32ul,
    "flags" / cs.Int32ul,
    "fence_id" / cs.Int64ul,
    "ctx_id" / cs.Int32ul,
    "ring_idx" / cs.Int8ul,
    "padding" / cs.Bytes(3),
)
CTRL_HDR_SIZE = 24
VIRTIO_GPU_FLAG_FENCE = 1
VIRTIO_GPU_FLAG_INFO_RING_IDX = 2
VIRTIO_GPU_RESP_ERR_UNSPEC = 0x1200
CONTROL_QUEUE = 0
CURSOR_QUEUE = 1
# The most chains one kick handles before yielding to the event loop (the
# guest controls how many it posts; the rest wait for the next turn).
MAX_CHAINS_PER_KICK = 256

BASE_FEATURES = (
    bit(VirtioFeature.VIRTIO_F_VERSION_1)
    | bit(VirtioFeature.VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VirtioFeature.VIRTIO_RING_F_EVENT_IDX)
)
GPU_FEATURES = bit(VirtioFeature.VIRTIO_GPU_F_VIRGL) | bit(VirtioFeature.VIRTIO_GPU_F_EDID)


class DeviceHost(Protocol):
    """What the core offers a device: its queues, guest memory, interrupts."""

    @property
    def memory(self) -> MemoryTable: ...

    def queue(self, index: int) -> VirtQueue | None: ...

    def notify(self, index: int) -> None:
        """Signal the call eventfd of queue ``index`` if the driver wants it."""
        ...

    def claim_kicks(self, index: int) -> tuple[VirtQueue, int, int | None] | None:
        """The device serves queue ``index`` from its own thread: the core
        stops watching its kick eventfd. Returns (queue, kick fd, call fd), or
        None when the queue is not started."""
        ...

    def unclaim_kicks(self, index: int) -> None:
        """The core watches the kick eventfd again (and looks at the ring)."""
        ...


class Device(ABC):
    """A virtio device model behind the vhost-user transport."""

    name = "device"

    def __init__(self) -> None:
        self.host: DeviceHost | None = None
        self.acked_features = 0

    def attach(self, host: DeviceHost) -> None:
        """Called once by the core that drives this device."""
        self.host = host

    def features(self) -> int:
        """Virtio feature bits offered (VHOST_USER_F_PROTOCOL_FEATURES is added by the core)."""
        return BASE_FEATURES

    def num_queues(self) -> int:
        return 1

    def config(self) -> bytes:
        """The device's config space (GET_CONFIG)."""
        return b""

    def set_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG; read-only by default."""
        log.info("ignoring SET_CONFIG of %d bytes at %d", len(data), offset)

    def on_features(self, features: int) -> None:
        self.acked_features = features

    @abstractmethod
    def on_kick(self, queue_index: int, vq: VirtQueue) -> None:
        """The driver kicked ``queue_index``: pop chains, push results.

        The core signals the call eventfd afterwards when ``vq.needs_notify()``;
        completions that happen later call ``host.notify(queue_index)``.
        """

    def on_queue_stopped(self, queue_index: int) -> None:
        """The queue stopped (GET_VRING_BASE, disable, disconnect)."""
        return None

    def on_queue_started(self, queue_index: int) -> None:
        """The queue started (SET_VRING_KICK, or again after a memory table change)."""
        return None

    def on_call_fd(self, queue_index: int, fd: int | None) -> None:
        """SET_VRING_CALL changed a started queue's call eventfd."""
        return None

    def on_set_socket(self, fd: int) -> None:
        """GPU_SET_SOCKET handed the vhost-user-gpu socket; the device owns ``fd``."""
        os.close(fd)

    def reset(self) -> None:
        """RESET_DEVICE / RESET_OWNER: back to the state after creation."""
        self.acked_features = 0

    def close(self) -> None:
        """The backend shuts down."""
        return None


class NullGpuDevice(Device):
    """A virtio-gpu that fails every control command with ERR_UNSPEC."""

    name = "null-gpu"

    def __init__(self, *, num_scanouts: int = 1, num_capsets: int = 0) -> None:
        super().__init__()
        self.num_scanouts = num_scanouts
        self.num_capsets = num_capsets
        self.gpu_socket: int | None = None
        self.commands = 0  # control commands answered (tests, status)

    def features(self) -> int:
        return BASE_FEATURES | GPU_FEATURES

    def num_queues(self) -> int:
        return 2  # control, cursor (virtio 1.2 §5.7.2)

    def config(self) -> bytes:
        # QEMU overrides events/num_scanouts; num_capsets is ours (DESIGN.md).
        return bytes(
            VIRTIO_GPU_CONFIG.build(
                {
                    "events_read": 0,
                    "events_clear": 0,
                    "num_scanouts": self.num_scanouts,
                    "num_capsets": self.num_capsets,
                }
            )
        )

    def on_set_socket(self, fd: int) -> None:
        if self.gpu_socket is not None:
            os.close(self.gpu_socket)
        self.gpu_socket = fd

    def on_kick(self, queue_index: int, vq: VirtQueue) -> None:
        def serve(request: bytes, read_len: int) -> bytes:
            if queue_index != CONTROL_QUEUE:
                return b""
            self.commands += 1
            return error_response(request[:CTRL_HDR_SIZE])

        vq.serve(serve, MAX_CHAINS_PER_KICK, CTRL_HDR_SIZE)  # the header is all it reads

    def reset(self) -> None:
        super().reset()

    def close(self) -> None:
        if self.gpu_socket is not None:
            os.close(self.gpu_socket)
            self.gpu_socket = None


def error_response(request_header: bytes) -> bytes:
    """A 24-byte ERR_UNSPEC response, echoing the fence of ``request_header``.

    virtio 1.2 §5.7.6.7: a response to a fenced request carries FLAG_FENCE and
    the same fence_id (and ctx_id / ring_idx with INFO_RING_IDX).
    """
    flags = fence_id = ctx_id = ring_idx = 0
    if len(request_header) >= CTRL_HDR_SIZE:
        hdr = VIRTIO_GPU_CTRL_HDR.parse(request_header)
        if hdr.flags & VIRTIO_GPU_FLAG_FENCE:
            flags = int(hdr.flags) & (VIRTIO_GPU_FLAG_FENCE | VIRTIO_GPU_FLAG_INFO_RING_IDX)
            fence_id, ctx_id = int(hdr.fence_id), int(hdr.ctx_id)
            if flags & VIRTIO_GPU_FLAG_INFO_RING_IDX:
                ring_idx = int(hdr.ring_idx)
    return bytes(
        VIRTIO_GPU_CTRL_HDR.build(
            {
                "type": VIRTIO_GPU_RESP_ERR_UNSPEC,
                "flags": flags,
                "fence_id": fence_id,
                "ctx_id": ctx_id,
                "ring_idx": ring_idx,
                "padding": b"\0\0\0",
            }
        )
    )
