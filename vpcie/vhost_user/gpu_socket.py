"""The vhost-user-gpu socket (QEMU docs/interop/vhost-user-gpu.rst), sans-IO.

GPU_SET_SOCKET hands the backend one end of a socketpair; on it the backend is
the client: it sends requests (GET/SET_PROTOCOL_FEATURES, SCANOUT, UPDATE...)
and QEMU answers the ones that have a reply. Our scanouts are null (the vGPU
is a compute device), so we only need the feature exchange and SCANOUT.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import construct as cs

from vpcie.errors import ProtocolError

# vhost-user-gpu.rst "Header": request u32, flags u32, size u32 (flags bit 2: reply).
GPU_HEADER = cs.Struct("request" / cs.Int32ul, "flags" / cs.Int32ul, "size" / cs.Int32ul)
GPU_HEADER_SIZE = 12
GPU_FLAG_REPLY = 0x4
# Largest reply we accept: GET_DISPLAY_INFO (24 + 16 * 24) or GET_EDID (32 + 1024).
MAX_GPU_REPLY_SIZE = 4096

GPU_U64 = cs.Struct("u64" / cs.Int64ul, cs.Terminated)
# "VhostUserGpuScanout": scanout_id, width, height.
GPU_SCANOUT = cs.Struct(
    "scanout_id" / cs.Int32ul, "width" / cs.Int32ul, "height" / cs.Int32ul, cs.Terminated
)


class GpuRequest(IntEnum):
    """vhost-user-gpu.rst "Message types"."""

    GET_PROTOCOL_FEATURES = 1
    SET_PROTOCOL_FEATURES = 2
    GET_DISPLAY_INFO = 3
    CURSOR_POS = 4
    CURSOR_POS_HIDE = 5
    CURSOR_UPDATE = 6
    SCANOUT = 7
    UPDATE = 8
    DMABUF_SCANOUT = 9
    DMABUF_UPDATE = 10
    GET_EDID = 11
    DMABUF_SCANOUT2 = 12


class GpuProtocolFeature(IntEnum):
    EDID = 0
    DMABUF2 = 1


@dataclass(frozen=True)
class GpuReply:
    request: int
    payload: bytes


def gpu_message(request: GpuRequest, payload: bytes = b"", *, reply: bool = False) -> bytes:
    """Bytes of one vhost-user-gpu message."""
    flags = GPU_FLAG_REPLY if reply else 0
    head = GPU_HEADER.build({"request": int(request), "flags": flags, "size": len(payload)})
    return bytes(head) + payload


def get_protocol_features() -> bytes:
    return gpu_message(GpuRequest.GET_PROTOCOL_FEATURES)


def set_protocol_features(features: int) -> bytes:
    return gpu_message(GpuRequest.SET_PROTOCOL_FEATURES, bytes(GPU_U64.build({"u64": features})))


def scanout(scanout_id: int, width: int, height: int) -> bytes:
    """SCANOUT; width = height = 0 disables the scanout (a null display)."""
    body = GPU_SCANOUT.build({"scanout_id": scanout_id, "width": width, "height": height})
    return gpu_message(GpuRequest.SCANOUT, bytes(body))


def parse_u64(payload: bytes) -> int:
    try:
        return int(GPU_U64.parse(payload).u64)
    except cs.ConstructError as exc:
        raise ProtocolError(f"vhost-user-gpu: bad u64 payload: {exc}") from None


class GpuReplyDecoder:
    """Reassembles replies (or, on the QEMU side of tests, requests) from a stream."""

    def __init__(self, *, replies: bool = True) -> None:
        self._buf = bytearray()
        self._replies = replies

    def feed(self, data: bytes) -> list[GpuReply]:
        self._buf += data
        out: list[GpuReply] = []
        while len(self._buf) >= GPU_HEADER_SIZE:
            hdr = GPU_HEADER.parse(bytes(self._buf[:GPU_HEADER_SIZE]))
            if bool(hdr.flags & GPU_FLAG_REPLY) != self._replies:
                raise ProtocolError(f"vhost-user-gpu: unexpected flags {int(hdr.flags):#x}")
            if hdr.size > MAX_GPU_REPLY_SIZE:
                raise ProtocolError(f"vhost-user-gpu: message size {int(hdr.size)} too large")
            end = GPU_HEADER_SIZE + int(hdr.size)
            if len(self._buf) < end:
                break
            out.append(GpuReply(int(hdr.request), bytes(self._buf[GPU_HEADER_SIZE:end])))
            del self._buf[:end]
        return out
