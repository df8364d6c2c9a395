"""Numbers of the vhost-user protocol (QEMU docs/interop/vhost-user.rst).

Caps on what the peer controls are named here (STYLE habit 6).
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

# vhost-user.rst "Header": flags bits 0-1 are the version, which must be 1.
VERSION = 0x1
VERSION_MASK = 0x3
HEADER_SIZE = 12

# VHOST_MEMORY_BASELINE_NREGIONS: the most regions one SET_MEM_TABLE carries.
MAX_MEM_REGIONS = 8
# VHOST_USER_MAX_CONFIG_SIZE: the most config-space bytes one GET/SET_CONFIG carries.
MAX_CONFIG_SIZE = 256
# The most fds one message may carry (QEMU never sends more than the regions).
MAX_FDS_PER_MESSAGE = MAX_MEM_REGIONS
# Our cap on a payload: larger than any message we understand (memory table:
# 8 + 8 * 32 bytes; config: 12 + 256), small enough that a hostile size field
# cannot make us buffer much.
MAX_PAYLOAD_SIZE = 4096
# The largest split ring the virtio spec allows (virtio 1.2 §2.7: Queue Size <= 32768).
MAX_QUEUE_SIZE = 32768
# SET_VRING_KICK/CALL/ERR u64: bits 0-7 are the ring index, bit 8 says "no fd".
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 0x100


class Flag(IntFlag):
    """Header flags (vhost-user.rst "Header")."""

    VERSION_1 = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


class Request(IntEnum):
    """Front-end message types (vhost-user.rst "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(IntEnum):
    """Protocol feature bit numbers (vhost-user.rst "Protocol features")."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


class VirtioFeature(IntEnum):
    """Virtio feature bit numbers we speak of (virtio 1.2 §6, §5.7.3)."""

    VIRTIO_GPU_F_VIRGL = 0
    VIRTIO_GPU_F_EDID = 1
    VIRTIO_GPU_F_RESOURCE_UUID = 2
    VIRTIO_GPU_F_RESOURCE_BLOB = 3
    VIRTIO_GPU_F_CONTEXT_INIT = 4
    VIRTIO_RING_F_INDIRECT_DESC = 28
    VIRTIO_RING_F_EVENT_IDX = 29
    VHOST_USER_F_PROTOCOL_FEATURES = 30
    VIRTIO_F_VERSION_1 = 32
    VIRTIO_F_ACCESS_PLATFORM = 33
    VIRTIO_F_RING_PACKED = 34
    VIRTIO_F_IN_ORDER = 35
    VIRTIO_F_ORDER_PLATFORM = 36
    VIRTIO_F_SR_IOV = 37
    VIRTIO_F_NOTIFICATION_DATA = 38
    VIRTIO_F_NOTIF_CONFIG_DATA = 39
    VIRTIO_F_RING_RESET = 40


def bit(n: int) -> int:
    """The mask of feature bit ``n``."""
    return 1 << n


# QEMU 10 sets these in SET_FEATURES even when the backend did not offer them
# (DESIGN.md "Guest-facing ABI"); they are accepted, never a protocol error.
TOLERATED_UNOFFERED_FEATURES = (
    bit(VirtioFeature.VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VirtioFeature.VIRTIO_RING_F_EVENT_IDX)
    | bit(VirtioFeature.VIRTIO_F_RING_RESET)
)
