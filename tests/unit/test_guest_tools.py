"""guest_tools against the two contracts it depends on: Linux's virtio-gpu
uAPI (ioctl numbers as the 6.x headers define them) and the backend's guest
ABI (capset, fence page layout). The ioctls themselves run in a real guest:
tests/integration/test_guest_vgpu.py; the device lookup (which render node is
the vGPU) is tested here against a fake kernel behind ``fcntl.ioctl``."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from guest_tools import drm, vgpu
from vpcie.errors import ErrorCode, VgpuError
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
        ("IOCTL_VERSION", 0xC0406400),  # DRM_IOWR('d', 0x00, struct drm_version), drm.h
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


# ---------------------------------------------------------------- device lookup
VIRGL_CAPSETS = (1 << 1) | (1 << 2)  # what QEMU's own virtio-gpu offers: VIRGL, VIRGL2
VPCIE_CAPSETS = 1 << vgpu.CAPSET_ID


class FakeKernel:
    """The DRM ioctls ``probe`` and ``Device`` send, answered per node as the
    kernel would (render nodes are plain files here; the node is found from
    the fd). Records every (node, ioctl) so a test can see what was sent."""

    def __init__(self, nodes: dict[str, tuple[str, int]]) -> None:
        self.nodes = nodes  # basename -> (driver name, SUPPORTED_CAPSET_IDS)
        self.calls: list[tuple[str, str]] = []

    def ioctl(self, fd: int, request: int, arg: bytearray, mutate: bool = True) -> int:
        node = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        driver, capsets = self.nodes[node]
        if request == drm.IOCTL_VERSION:
            self.calls.append((node, "VERSION"))
            values = list(drm._VERSION.unpack(arg))
            name = driver.encode()
            ctypes.memmove(values[5], name, min(len(name), values[4]))
            values[4] = len(name)
            arg[:] = drm._VERSION.pack(*values)
            return 0
        self.calls.append((node, hex(request)))
        if driver != drm.VIRTIO_GPU_DRIVER:
            raise AssertionError(f"a virtgpu ioctl {request:#x} sent to a {driver} node")
        if request == drm.IOCTL_GETPARAM:
            param, ptr = drm._GETPARAM.unpack(arg)
            assert param == drm.PARAM_SUPPORTED_CAPSET_IDS
            ctypes.c_uint64.from_address(ptr).value = capsets
            return 0
        raise OSError(errno.ENOSYS, "not faked")


@pytest.fixture
def dri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeKernel]:
    """A /dev/dri with the given render nodes, and the fake kernel behind them."""

    def make(**nodes: tuple[str, int]) -> FakeKernel:
        for name in (*nodes, "card0", "by-path"):
            (tmp_path / name).touch()
        kernel = FakeKernel(nodes)
        monkeypatch.setattr(drm.fcntl, "ioctl", kernel.ioctl)
        monkeypatch.setattr(drm, "DRI_DIR", str(tmp_path))
        return kernel

    return make


def test_render_nodes_in_the_kernels_order(tmp_path: Path) -> None:
    for name in ("renderD129", "card1", "renderD1280", "renderD128", "renderDx", "card0"):
        (tmp_path / name).touch()
    found = [os.path.basename(p) for p in drm.render_nodes(str(tmp_path))]
    assert found == ["renderD128", "renderD129", "renderD1280"]
    assert drm.render_nodes(str(tmp_path / "absent")) == []


def test_the_vgpu_is_found_among_other_gpus(dri: Callable[..., FakeKernel]) -> None:
    """An Intel GPU first, then QEMU's own virtio-gpu, then the vpcie vGPU."""
    kernel = dri(
        renderD128=("i915", 0),
        renderD129=("virtio_gpu", VIRGL_CAPSETS),
        renderD130=("virtio_gpu", VIRGL_CAPSETS | VPCIE_CAPSETS),
    )
    assert vgpu.find_render_node() == f"{drm.DRI_DIR}/renderD130"
    # The i915 node was asked its driver only: virtgpu ioctl numbers mean
    # other things to other drivers.
    assert [c for c in kernel.calls if c[0] == "renderD128"] == [("renderD128", "VERSION")]


def test_no_vgpu_is_a_clear_error(dri: Callable[..., FakeKernel]) -> None:
    dri(renderD128=("i915", 0), renderD129=("virtio_gpu", VIRGL_CAPSETS))
    with pytest.raises(VgpuError) as err:
        vgpu.find_render_node()
    assert err.value.code == ErrorCode.NO_DEVICE
    assert str(err.value.args[-1]).endswith(
        "no vpcie vGPU found (renderD128: i915 driver; renderD129: virtio-gpu without "
        "capset 17): name its render node with Device(path) or VPCIE_RENDER_NODE"
    )
    with pytest.raises(VgpuError) as err:  # Device() says the same, opens nothing
        vgpu.Device()
    assert "no vpcie vGPU found (renderD128: i915 driver;" in str(err.value)


def test_no_render_node_at_all(tmp_path: Path) -> None:
    with pytest.raises(VgpuError) as err:
        vgpu.find_render_node(str(tmp_path))
    assert f"no render node in {tmp_path} (is the virtio_gpu module loaded?)" in str(err.value)


def test_a_named_node_that_is_not_a_virtio_gpu(
    dri: Callable[..., FakeKernel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Device(path) and $VPCIE_RENDER_NODE skip the lookup, and are checked."""
    kernel = dri(renderD128=("i915", 0), renderD129=("virtio_gpu", VPCIE_CAPSETS))
    intel = f"{drm.DRI_DIR}/renderD128"
    with pytest.raises(VgpuError, match=r"renderD128 is not a virtio-gpu \(its driver: i915\)"):
        vgpu.Device(intel)
    assert kernel.calls == [("renderD128", "VERSION")]
    monkeypatch.setenv(vgpu.RENDER_NODE_ENV, intel)
    with pytest.raises(VgpuError, match="renderD128 is not a virtio-gpu"):
        vgpu.Device()


def test_probe_on_the_real_ioctl_layer(tmp_path: Path) -> None:
    """No fake: a file that is not a DRM device answers DRM_VERSION with
    ENOTTY, a missing one cannot be opened; both are reported, not raised."""
    (tmp_path / "renderD128").write_bytes(b"")
    seen = drm.probe(str(tmp_path / "renderD128"))
    assert seen.driver == "" and "DRM_VERSION on" in seen.error
    assert os.strerror(errno.ENOTTY) in seen.error
    missing = drm.probe(str(tmp_path / "renderD129"))
    assert missing.error.startswith("cannot open") and "No such file" in missing.error
    with pytest.raises(VgpuError, match=r"renderD128: DRM_VERSION on .*: Inappropriate ioctl"):
        vgpu.find_render_node(str(tmp_path))
