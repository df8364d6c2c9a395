"""The virtio-gpu DRM uAPI (Linux ``include/uapi/drm/virtgpu_drm.h``) from Python.

Only the standard library: ``fcntl.ioctl`` on the render node with the
structs packed by hand, ``ctypes`` for the user pointers some of them carry,
``mmap`` for buffer objects. Every failing ioctl becomes a DrmError that names
the ioctl and the errno.

``render_nodes`` and ``probe`` look at the machine's render nodes (which
driver, which capsets) without assuming which one is which: a guest may have
other GPUs too (guest_tools.vgpu.find_render_node picks the vGPU).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import re
import struct
from collections.abc import Sequence
from typing import NamedTuple

DRI_DIR = "/dev/dri"
RENDER_NODE = "/dev/dri/renderD128"  # the first render node; not necessarily the vGPU
VIRTIO_GPU_DRIVER = "virtio_gpu"  # the DRM driver name of Linux's virtio-gpu
_RENDER_NAME = re.compile(r"^renderD(\d+)$")

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
# struct drm_version: major, minor, patchlevel, (pad), name_len, name,
# date_len, date, desc_len, desc; every DRM driver answers it.
_VERSION = struct.Struct("<iiiiQQQQQQ")

IOCTL_MAP = _iowr(_DRM_COMMAND_BASE + 0x01, _MAP.size)
IOCTL_EXECBUFFER = _iowr(_DRM_COMMAND_BASE + 0x02, _EXECBUFFER.size)
IOCTL_GETPARAM = _iowr(_DRM_COMMAND_BASE + 0x03, _GETPARAM.size)
IOCTL_RESOURCE_CREATE = _iowr(_DRM_COMMAND_BASE + 0x04, _RESOURCE_CREATE.size)
IOCTL_WAIT = _iowr(_DRM_COMMAND_BASE + 0x08, _WAIT.size)
IOCTL_GET_CAPS = _iowr(_DRM_COMMAND_BASE + 0x09, _GET_CAPS.size)
IOCTL_GEM_CLOSE = _ioc(_IOC_WRITE, 0x09, _GEM_CLOSE.size)  # DRM_IOCTL_GEM_CLOSE
IOCTL_VERSION = _iowr(0x00, _VERSION.size)  # DRM_IOCTL_VERSION (core DRM, not virtgpu)

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
    def driver_name(self) -> str:
        """The DRM driver behind this node ("virtio_gpu" for a vGPU). Ask it
        before any virtgpu ioctl: those numbers mean other things to other
        drivers."""
        name = ctypes.create_string_buffer(64)
        arg = bytearray(_VERSION.pack(0, 0, 0, 0, len(name), ctypes.addressof(name), 0, 0, 0, 0))
        self._ioctl("DRM_VERSION", IOCTL_VERSION, arg)
        length = min(_VERSION.unpack(arg)[4], len(name))
        return name.raw[:length].decode("ascii", "replace")

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


class NodeProbe(NamedTuple):
    """What one render node is: its driver, and for a virtio-gpu the capset
    ids it offers (a bit mask), or why it could not be asked."""

    path: str
    driver: str = ""
    capset_ids: int = 0
    error: str = ""


def render_nodes(dri_dir: str = DRI_DIR) -> list[str]:
    """The render nodes in ``dri_dir`` (renderD128, renderD129...), in the
    kernel's order; none if the folder does not exist."""
    try:
        names = os.listdir(dri_dir)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), n) for n in names if (m := _RENDER_NAME.match(n))]
    return [os.path.join(dri_dir, n) for _num, n in sorted(found)]


def probe(path: str) -> NodeProbe:
    """Open ``path`` and ask its driver (and a virtio-gpu its capset ids)."""
    try:
        with RenderNode(path) as node:
            driver = node.driver_name()
            if driver != VIRTIO_GPU_DRIVER:
                return NodeProbe(path, driver)
            return NodeProbe(path, driver, node.getparam(PARAM_SUPPORTED_CAPSET_IDS))
    except DrmError as exc:
        return NodeProbe(path, error=str(exc.strerror))
