"""vhost-user: the wire codec (sans-IO), the connection state machine, the GPU socket.

Spec: QEMU docs/interop/vhost-user.rst and docs/interop/vhost-user-gpu.rst.
"""

from vpcie.vhost_user.codec import MessageDecoder, encode_message
from vpcie.vhost_user.connection import Connection, RingConfig, Runstate, VhostUserHandler
from vpcie.vhost_user.constants import Flag, ProtocolFeature, Request, VirtioFeature
from vpcie.vhost_user.messages import (
    ConfigSpace,
    MemRegion,
    MemTable,
    Message,
    VringAddr,
    VringFile,
    VringState,
)

__all__ = [
    "ConfigSpace",
    "Connection",
    "Flag",
    "MemRegion",
    "MemTable",
    "Message",
    "MessageDecoder",
    "ProtocolFeature",
    "Request",
    "RingConfig",
    "Runstate",
    "VhostUserHandler",
    "VirtioFeature",
    "VringAddr",
    "VringFile",
    "VringState",
    "encode_message",
]
