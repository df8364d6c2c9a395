"""``vgpu``: the tenant's API to a vpcie vGPU, inside the guest.

A ``Device`` is one open render node (one virtio-gpu context). Work goes to
the GPU as vGPU batches (``vpcie.protocol.batch``) in EXECBUFFER; buffers are
guest-backed resources the remote GPU copies from and into directly (COPY_H2D /
COPY_D2H name them). The ioctl's fence only means "accepted": completion is
the fence page (docs/GUEST_ABI.md), a buffer the backend writes and this
module polls, and each batch's COMPLETION reply lands in a reply buffer.

    dev = Device()  # the vGPU among /dev/dri's render nodes; Device(path) to name one
    a = dev.buffer(4096); a.write(data)
    reply = dev.run([rec(Opcode.MEM_ALLOC, 4096, 0)])
    h = reply.value(0)
    dev.run([rec(Opcode.COPY_H2D, h, a.resource_id, 0, 0, 4096)]).check()
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable, Sequence

from guest_tools import drm
from guest_tools.drm import PARAM_SUPPORTED_CAPSET_IDS, VIRTIO_GPU_DRIVER, NodeProbe, RenderNode
from vpcie.errors import ErrorCode, VgpuError
from vpcie.protocol.batch import Record, encode_batch, rec
from vpcie.protocol.codes import Opcode

# The guest ABI (docs/GUEST_ABI.md): the one definition the backend uses too.
from vpcie.protocol.guest_abi import (
    CAPSET_ID,
    CAPSET_SIZE,
    CAPSET_VERSION,
    FENCE_HEADER_SIZE,
    FENCE_MAGIC,
    FENCE_SLOT_SIZE,
    REPLY_SLOT,
    REPLY_SLOTS,
    SLOT_ST,
    Reply,
    VgpuInfo,
    decode_reply,
    fence_slot_offset,
)

__all__ = [
    "CAPSET_ID",
    "CAPSET_SIZE",
    "CAPSET_VERSION",
    "FENCE_HEADER_SIZE",
    "FENCE_MAGIC",
    "FENCE_SLOT_SIZE",
    "REPLY_SLOT",
    "REPLY_SLOTS",
    "Buffer",
    "Device",
    "Reply",
    "VgpuInfo",
    "choose_render_node",
    "decode_reply",
    "find_render_node",
]

PAGE = 4096
SPIN_S = 0.005  # wait(): busy-poll this long before sleeping between looks
RENDER_NODE_ENV = "VPCIE_RENDER_NODE"  # names the vGPU's render node, skipping the lookup


def _is_vgpu(p: NodeProbe) -> bool:
    return p.driver == VIRTIO_GPU_DRIVER and bool(p.capset_ids & (1 << CAPSET_ID))


def _what(p: NodeProbe) -> str:
    name = os.path.basename(p.path)
    if p.error:
        return f"{name}: {p.error}"
    if p.driver != VIRTIO_GPU_DRIVER:
        return f"{name}: {p.driver or 'unknown'} driver"
    return f"{name}: virtio-gpu without capset {CAPSET_ID}"


def choose_render_node(probes: Sequence[NodeProbe], where: str = drm.DRI_DIR) -> str:
    """The first node that is a virtio-gpu offering the vpcie capset, else
    VgpuError(NO_DEVICE) saying what each node was and what to do."""
    for p in probes:
        if _is_vgpu(p):
            return p.path
    if not probes:
        seen = f"no render node in {where} (is the virtio_gpu module loaded?)"
    else:
        seen = "; ".join(_what(p) for p in probes)
    raise VgpuError(
        ErrorCode.NO_DEVICE,
        f"no vpcie vGPU found ({seen}): "
        f"name its render node with Device(path) or {RENDER_NODE_ENV}",
    )


def find_render_node(
    dri_dir: str | None = None, probe: Callable[[str], NodeProbe] = drm.probe
) -> str:
    """The vGPU's render node in ``dri_dir`` (default /dev/dri): every render
    node is asked its driver and capsets (an open and two ioctls each, once
    per Device)."""
    where = dri_dir or drm.DRI_DIR
    return choose_render_node([probe(path) for path in drm.render_nodes(where)], where)


class Buffer:
    """A guest-backed buffer resource, mapped into this process."""

    def __init__(self, node: RenderNode, size: int) -> None:
        self.node = node
        self.handle, self.resource_id, self.size = node.create_buffer(size)
        self.map: mmap.mmap = node.map(self.handle, self.size)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"{len(data)} bytes at {offset} do not fit {self.size}")
        self.map[offset : offset + len(data)] = data

    def read(self, offset: int = 0, size: int | None = None) -> bytes:
        size = self.size - offset if size is None else size
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError(f"{size} bytes at {offset} are outside {self.size}")
        return self.map[offset : offset + size]

    def close(self) -> None:
        self.map.close()
        self.node.close_buffer(self.handle)


class Device:
    """A vpcie vGPU as one guest process sees it: ``path`` names its render
    node, else $VPCIE_RENDER_NODE, else the render nodes are searched for it."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or os.environ.get(RENDER_NODE_ENV) or find_render_node()
        self.node = RenderNode(self.path)
        path = self.path
        try:
            driver = self.node.driver_name()
            if driver != VIRTIO_GPU_DRIVER:
                raise VgpuError(
                    ErrorCode.NO_DEVICE, f"{path} is not a virtio-gpu (its driver: {driver})"
                )
            ids = self.node.getparam(PARAM_SUPPORTED_CAPSET_IDS)
            if not ids & (1 << CAPSET_ID):
                raise VgpuError(
                    ErrorCode.NO_DEVICE,
                    f"{path} is a virtio-gpu without the vpcie capset {CAPSET_ID}",
                )
            self.info = self.query_caps()
            self.fence = Buffer(self.node, PAGE)
            self.replies = Buffer(self.node, REPLY_SLOT * REPLY_SLOTS)
            self._words = memoryview(self.fence.map).cast("Q")  # fence page, u64 words
            fence_set = rec(Opcode.FENCE_PAGE_SET, self.fence.resource_id, 0)
            self.node.execbuffer(encode_batch([fence_set]))
        except BaseException:
            self.node.close()
            raise
        self._seq: dict[int, int] = {}
        self._slot_of: dict[tuple[int, int], int] = {}
        self._next_slot = 0

    def query_caps(self) -> VgpuInfo:
        """The capset as the kernel caches it: the GPU bound when it was read."""
        return VgpuInfo.decode(self.node.get_caps(CAPSET_ID, CAPSET_VERSION, CAPSET_SIZE))

    def query(self) -> VgpuInfo:
        """What is bound now (a QUERY batch). The capset (``info``) is what was
        bound when the kernel first read it: the kernel caches capsets."""
        return VgpuInfo.decode(self.run([rec(Opcode.QUERY)]).check().blob)

    def buffer(self, size: int) -> Buffer:
        return Buffer(self.node, size)

    def close(self) -> None:
        self._words.release()
        self.fence.close()
        self.replies.close()
        self.node.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ work
    def start(self, records: Sequence[Record], *, stream: int = 0) -> int:
        """Submit ``records`` + a SIGNAL on ``stream``; returns its sequence number."""
        seq = self._seq.get(stream, 0) + 1
        if len(self._slot_of) >= REPLY_SLOTS:
            raise VgpuError(ErrorCode.QUOTA_EXCEEDED, f"{REPLY_SLOTS} batches already waited for")
        slot = self._next_slot
        while slot in self._slot_of.values():
            slot = (slot + 1) % REPLY_SLOTS
        self._next_slot = (slot + 1) % REPLY_SLOTS
        sig = rec(
            Opcode.SIGNAL, seq, self.replies.resource_id, slot * REPLY_SLOT, REPLY_SLOT,
            stream=stream,
        )  # fmt: skip
        start = slot * REPLY_SLOT
        self.replies.write(bytes(64), start)  # no stale reply if this one is never written
        self.node.execbuffer(encode_batch([*records, sig]))
        self._seq[stream] = seq
        self._slot_of[(stream, seq)] = slot
        return seq

    def done(self, stream: int, seq: int) -> bool:
        return int(self._words[fence_slot_offset(stream) >> 3]) >= seq

    def wait(self, stream: int, seq: int, *, timeout: float = 30.0) -> Reply:
        """Poll the fence page until ``seq`` is done on ``stream``; its reply.
        Spins for the first SPIN_S (a round trip is well under that), then
        sleeps with backoff up to 1 ms between looks."""
        word = fence_slot_offset(stream) >> 3
        words = self._words
        start = time.monotonic()
        nap = 0.0
        while words[word] < seq:
            now = time.monotonic()
            if now - start < SPIN_S:
                continue
            if now - start > timeout:
                raise TimeoutError(f"stream {stream}: batch {seq} not done in {timeout} s")
            nap = min(0.001, nap * 2 or 0.00005)
            time.sleep(nap)
        failed_seq = int(words[word + 1])
        raw = self.fence.read(fence_slot_offset(stream), FENCE_SLOT_SIZE)
        _completed, _failed, code, failed_index = SLOT_ST.unpack(raw)
        slot = self._slot_of.pop((stream, seq))
        try:
            status, index, message, _n, results, blob = decode_reply(
                self.replies.read(slot * REPLY_SLOT, REPLY_SLOT)
            )
        except Exception:  # no reply written (the batch was refused before running)
            if failed_seq == seq:
                return Reply(ErrorCode(code), failed_index, "refused by the backend", {}, b"")
            raise
        if failed_seq == seq and status == 0:
            status, index = code, failed_index  # no reply, or it did not fit
        return Reply(ErrorCode(status), index, str(message), dict(results), bytes(blob))

    def run(self, records: Sequence[Record], *, stream: int = 0, timeout: float = 30.0) -> Reply:
        return self.wait(stream, self.start(records, stream=stream), timeout=timeout)
