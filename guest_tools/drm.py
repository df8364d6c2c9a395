"""The virtio-gpu DRM uAPI (Linux ``include/uapi/drm/virtgpu_drm.h``) from Python.

Only the standard library: ``fcntl.ioctl`` on the render node with the
structs packed by hand, ``ctypes`` for the user pointers some of them carry,
``mmap`` for buffer objects. Every failing ioctl becomes a DrmError that names
the ioctl and the errno.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Sequence

RENDER_NODE = "/dev/dri/renderD128"

_IOC_WRITE, _IOC_READ = 1, 2
_DRM_COMMAND_BASE = 0x40


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("d") << 8) | nr


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# Structs, little-endian as the guest's x86-64 / arm64 kernels use.
_MAP = struct.Struct("<QII")  # offset (out), handle, pad
# flags, size, command, bo_handles, num_bo_handles, fence_fd, ring_idx,
# syncobj_stride, num_in_syncobjs, num_out_syncobjs, in_syncobjs, out_syncobjs
_EXECBUFFER = struct.Struct("<IIQQIiIIIIQQ")
_GETPARAM = struct.Struct("<QQ")  # param, value (user pointer to an int)
# target, format, bind, width, height, depth, array_size, last_level,
# nr_samples, flags, bo_handle (out), res_handle (out), size (in/out), stride (out)
_RESOURCE_CREATE = struct.Struct("<14I")
_WAIT = struct.Struct("<II")  # handle, flags
_GET_CAPS = struct.Struct("<IIQII")  # cap_set_id, cap_set_ver, addr, size, pad
_GEM_CLOSE = struct.Struct("<II")  # handle, pad

IOCTL_MAP = _iowr(_DRM_COMMAND_BASE + 0x01, _MAP.size)
IOCTL_EXECBUFFER = _iowr(_DRM_COMMAND_BASE + 0x02, _EXECBUFFER.size)
IOCTL_GETPARAM = _iowr(_DRM_COMMAND_BASE + 0x03, _GETPARAM.size)
IOCTL_RESOURCE_CREATE = _iowr(_DRM_COMMAND_BASE + 0x04, _RESOURCE_CREATE.size)
IOCTL_WAIT = _iowr(_DRM_COMMAND_BASE + 0x08, _WAIT.size)
IOCTL_GET_CAPS = _iowr(_DRM_COMMAND_BASE + 0x09, _GET_CAPS.size)
IOCTL_GEM_CLOSE = _ioc(_IOC_WRITE, 0x09, _GEM_CLOSE.size)  # DRM_IOCTL_GEM_CLOSE

PARAM_3D_FEATURES = 1
PARAM_SUPPORTED_CAPSET_IDS = 7
WAIT_NOWAIT = 1

# A guest-backed buffer: what the vGPU's resources are (virgl values).
PIPE_BUFFER = 0
R8_UNORM = 64
BIND_CUSTOM = 1 << 17


class DrmError(OSError):
    """An ioctl on the render node failed."""


class RenderNode:
    """An open virtio-gpu render node: one DRM file = one device context."""

    def __init__(self, path: str = RENDER_NODE) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise DrmError(exc.errno, f"cannot open {path}: {exc.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RenderNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ioctl(self, name: str, request: int, arg: bytearray) -> bytearray:
        try:
            fcntl.ioctl(self.fd, request, arg, True)
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise DrmError(code, f"{name} on {self.path}: {os.strerror(code)}") from None
        return arg

    # ------------------------------------------------------------------ queries
    def getparam(self, param: int) -> int:
        value = ctypes.c_uint64(0)
        arg = bytearray(_GETPARAM.pack(param, ctypes.addressof(value)))
        self._ioctl("VIRTGPU_GETPARAM", IOCTL_GETPARAM, arg)
        return int(value.value & 0xFFFF_FFFF)  # the kernel writes an int

    def get_caps(self, capset_id: int, version: int, size: int) -> bytes:
        buf = ctypes.create_string_buffer(size)
        arg = bytearray(_GET_CAPS.pack(capset_id, version, ctypes.addressof(buf), size, 0))
        self._ioctl("VIRTGPU_GET_CAPS", IOCTL_GET_CAPS, arg)
        return buf.raw

    # ------------------------------------------------------------------ buffers
    def create_buffer(self, size: int) -> tuple[int, int, int]:
        """A guest-backed buffer resource of ``size`` bytes: (GEM handle,
        resource id, size the kernel allocated)."""
        if size <= 0:
            raise ValueError(f"buffer size {size} must be positive")
        arg = bytearray(
            _RESOURCE_CREATE.pack(
                PIPE_BUFFER, R8_UNORM, BIND_CUSTOM, size, 1, 1, 1, 0, 0, 0, 0, 0, size, 0
            )
        )
        self._ioctl("VIRTGPU_RESOURCE_CREATE", IOCTL_RESOURCE_CREATE, arg)
        values = _RESOURCE_CREATE.unpack(arg)
        return values[10], values[11], values[12]

    def map(self, handle: int, size: int) -> mmap.mmap:
        """The buffer's pages in this process (shared with the device's DMA)."""
        arg = self._ioctl("VIRTGPU_MAP", IOCTL_MAP, bytearray(_MAP.pack(0, handle, 0)))
        offset = _MAP.unpack(arg)[0]
        return mmap.mmap(
            self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
        )

    def close_buffer(self, handle: int) -> None:
        self._ioctl("GEM_CLOSE", IOCTL_GEM_CLOSE, bytearray(_GEM_CLOSE.pack(handle, 0)))

    # ------------------------------------------------------------------ work
    def execbuffer(self, command: bytes, bo_handles: Sequence[int] = ()) -> None:
        """EXECBUFFER: the kernel sends ``command`` byte for byte in a fenced
        SUBMIT_3D; it returns once the device has the request queued."""
        cmd = ctypes.create_string_buffer(command, len(command))
        handles = (ctypes.c_uint32 * max(1, len(bo_handles)))(*bo_handles)
        arg = bytearray(
            _EXECBUFFER.pack(
                0, len(command), ctypes.addressof(cmd), ctypes.addressof(handles),
                len(bo_handles), -1, 0, 0, 0, 0, 0, 0,
            )
        )  # fmt: skip
        self._ioctl("VIRTGPU_EXECBUFFER", IOCTL_EXECBUFFER, arg)

    def wait(self, handle: int, *, nowait: bool = False) -> bool:
        """VIRTGPU_WAIT on a buffer's fences (virtio fences mean "accepted").
        False when ``nowait`` and still busy."""
        arg = bytearray(_WAIT.pack(handle, WAIT_NOWAIT if nowait else 0))
        try:
            self._ioctl("VIRTGPU_WAIT", IOCTL_WAIT, arg)
        except DrmError as exc:
            if nowait and exc.errno == errno.EBUSY:
                return False
            raise
        return True
