"""guest_tools against the two contracts it depends on: Linux's virtio-gpu
uAPI (ioctl numbers as the 6.x headers define them) and the backend's guest
ABI (capset, fence page layout). The ioctls themselves run in a real guest:
tests/integration/test_guest_vgpu.py."""

from __future__ import annotations

import pytest

from guest_tools import drm, vgpu
from vpcie.gpu import capset, fencepage
from vpcie.protocol.frames import FAST, encode_completion


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # DRM_IOWR('d', 0x40 + nr, struct drm_virtgpu_*) in include/uapi/drm/virtgpu_drm.h
        ("IOCTL_MAP", 0xC0106441),
        ("IOCTL_EXECBUFFER", 0xC0406442),  # the 64-byte struct (ring_idx, syncobjs)
        ("IOCTL_GETPARAM", 0xC0106443),
        ("IOCTL_RESOURCE_CREATE", 0xC0386444),
        ("IOCTL_WAIT", 0xC0086448),
        ("IOCTL_GET_CAPS", 0xC0186449),
        ("IOCTL_GEM_CLOSE", 0x40086409),  # DRM_IOW('d', 0x09, struct drm_gem_close)
    ],
)
def test_ioctl_numbers(name: str, value: int) -> None:
    assert getattr(drm, name) == value


def test_guest_abi_matches_the_backend() -> None:
    assert vgpu.CAPSET_ID == capset.VGPU_CAPSET_ID
    assert vgpu.CAPSET_VERSION == capset.VGPU_CAPSET_VERSION
    assert vgpu.CAPSET_SIZE == capset.CAPSET_SIZE
    assert vgpu.FENCE_HEADER_SIZE == fencepage.HEADER_ST.size
    assert vgpu.FENCE_SLOT_SIZE == fencepage.SLOT_ST.size
    assert vgpu.FENCE_MAGIC == fencepage.FENCE_MAGIC
    assert vgpu.VgpuInfo._fields == FAST["QUERY_INFO"].names  # the capset is a QUERY_INFO


def test_reply_decoding() -> None:
    raw = encode_completion(0, failed_index=7, message="m", results=[(2, 99)], blob=b"xy")
    status, failed, message, _n, results, blob = vgpu.decode_reply(raw + bytes(100))
    assert (status, failed, message, dict(results), bytes(blob)) == (0, 7, "m", {2: 99}, b"xy")
    unbound = vgpu.VgpuInfo(1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, "", "", "")
    assert unbound.describe() == "no GPU bound to this vGPU"
