"""A model of the guest side: what Linux 6.12's virtio_gpu driver sends for
each ioctl (DESIGN.md "What the guest kernel sends, per ioctl"), plus the
vGPU batch conventions the guest tools use (fence page, SIGNAL, replies).

Tests and benchmarks drive the device through it, over the vhost-user
frontend harness (``FrontendTransport``) or straight into the sans-IO core
(``DirectTransport``). The sequences are the kernel's, not a convenient
subset: RESOURCE_CREATE_3D and ATTACH_BACKING with ctx_id 0, fenced creates,
CTX_ATTACH with the context, every command in an indirect table, UNREF without
DETACH_BACKING.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vpcie.errors import ErrorCode
from vpcie.gpu.capset import CAPSET_SIZE, VGPU_CAPSET_ID
from vpcie.gpu.fencepage import FENCE_PAGE_SIZE, HEADER_ST, SLOT_ST
from vpcie.memory import GuestMemory
from vpcie.protocol import virtio_gpu as wire
from vpcie.protocol.batch import Record, encode_batch, rec
from vpcie.protocol.codes import Opcode
from vpcie.protocol.frames import decode_payload
from vpcie.protocol.guest_abi import REPLY_SLOT, REPLY_SLOTS, Reply, decode_reply

PAGE = 4096
_HDR_FMT = wire.HDR
_PIPE_BUFFER, _R8_UNORM = 0, 64
_BIND_CUSTOM = 1 << 17  # VIRGL_BIND_CUSTOM (guest tools' buffers)


class Transport(Protocol):
    async def command(self, request: bytes, resp_size: int) -> bytes: ...


class DirectTransport:
    """Straight into ``GpuDevice.handle`` (no queues): unit tests."""

    def __init__(self, device: Any) -> None:
        self.device = device

    async def command(self, request: bytes, resp_size: int) -> bytes:
        return bytes(self.device.handle(request))[:resp_size]


class FrontendTransport:
    """Through the control virtqueue of a VhostUserFrontend (the harness that
    plays QEMU): request and response in an indirect table, kick, wait."""

    def __init__(self, fe: Any, *, slots: int = 8, max_request: int = 1 << 20) -> None:
        self.fe = fe
        self._free = [(fe.alloc(max_request, PAGE), fe.alloc(2 * PAGE, PAGE)) for _ in range(slots)]
        self._max = max_request
        self._sem = asyncio.Semaphore(slots)

    async def command(self, request: bytes, resp_size: int) -> bytes:
        if len(request) > self._max:
            raise ValueError("request larger than the transport's buffers")
        async with self._sem:
            req_gpa, resp_gpa = self._free.pop()
            try:
                self.fe.mem.write(req_gpa, request)
                head = self.fe.ctrl.add(
                    readable=[(req_gpa, len(request))],
                    writable=[(resp_gpa, resp_size)],
                    indirect=True,
                )
                self.fe.kick(0)
                n = await self.fe.wait_used(0, head)
                return bytes(self.fe.mem.read(resp_gpa, n))
            finally:
                self._free.append((req_gpa, resp_gpa))


def hdr(ctype: int, *, ctx_id: int = 0, fence_id: int = 0) -> bytes:
    flags = wire.FLAG_FENCE if fence_id else 0
    return _HDR_FMT.pack(ctype, flags, fence_id, ctx_id, 0, b"\0\0\0")


class CommandFailed(Exception):
    def __init__(self, ctype: int, resp: int) -> None:
        self.ctype, self.resp = ctype, resp
        name = wire.Resp(resp).name if resp in wire.Resp._value2member_map_ else hex(resp)
        super().__init__(f"{wire.Cmd(ctype).name} -> {name}")


@dataclass
class Bo:
    """A guest buffer object: a 3D buffer resource with guest pages behind it."""

    resource_id: int
    size: int
    segments: list[tuple[int, int]]  # (gpa, len) backing, in order
    mem: GuestMemory

    def write(self, data: bytes | memoryview, offset: int = 0) -> None:
        self._each(offset, len(data), lambda gpa, pos, n: self.mem.write(gpa, data[pos : pos + n]))

    def read(self, offset: int = 0, size: int | None = None) -> bytes:
        size = self.size - offset if size is None else size
        out = bytearray(size)
        self._each(
            offset,
            size,
            lambda gpa, pos, n: self.mem.read_into(gpa, memoryview(out)[pos : pos + n]),
        )
        return bytes(out)

    def _each(self, offset: int, size: int, fn: Callable[[int, int, int], Any]) -> None:
        if offset + size > self.size:
            raise ValueError("outside the buffer")
        pos, base = 0, 0
        for gpa, length in self.segments:
            lo, hi = max(offset, base), min(offset + size, base + length)
            if lo < hi:
                fn(gpa + lo - base, lo - offset, hi - lo)
                pos += hi - lo
            base += length


class GuestGpu:
    """The virtio_gpu driver of one guest, as far as vpcie cares."""

    def __init__(
        self, transport: Transport, mem: GuestMemory, alloc: Callable[[int, int], int]
    ) -> None:
        self.t = transport
        self.mem = mem
        self.alloc = alloc
        self._fence = 0
        self._ctx = 0
        self._res = 0

    def next_fence(self) -> int:
        self._fence += 1
        return self._fence

    async def call(self, request: bytes, resp_size: int = 24, *, expect: int = 0x1100) -> bytes:
        resp = await self.t.command(request, resp_size)
        rtype = struct.unpack_from("<I", resp, 0)[0] if len(resp) >= 4 else 0
        if rtype != expect:
            raise CommandFailed(struct.unpack_from("<I", request, 0)[0], rtype)
        return resp

    async def load(self) -> bytes:
        """Driver load: GET_CAPSET_INFO, GET_CAPSET (GET_CAPS), GET_EDID, GET_DISPLAY_INFO."""
        info = await self.call(
            hdr(wire.Cmd.GET_CAPSET_INFO) + struct.pack("<II", 0, 0), 40, expect=0x1102
        )
        cid, _ver, size, _pad = struct.unpack_from("<IIII", info, 24)
        assert cid == VGPU_CAPSET_ID and size == CAPSET_SIZE
        await self.call(hdr(wire.Cmd.GET_EDID) + struct.pack("<II", 0, 0), 1056, expect=0x1104)
        await self.call(hdr(wire.Cmd.GET_DISPLAY_INFO), 408, expect=0x1101)
        return await self.get_capset()

    async def get_capset(self) -> bytes:
        resp = await self.call(
            hdr(wire.Cmd.GET_CAPSET) + struct.pack("<II", VGPU_CAPSET_ID, 1),
            24 + CAPSET_SIZE,
            expect=0x1103,
        )
        return resp[24:]

    async def open(self, name: str = "python3.11") -> GuestContext:
        self._ctx += 1
        raw = name.encode()[:64]
        await self.call(
            hdr(wire.Cmd.CTX_CREATE, ctx_id=self._ctx)
            + struct.pack("<II", len(raw), 0)
            + raw.ljust(64, b"\0")
        )
        ctx = GuestContext(self, self._ctx)
        return ctx

    def alloc_pages(self, size: int, *, scatter: bool) -> list[tuple[int, int]]:
        """Guest pages for a buffer: one run, or page-sized pieces with gaps
        (as a fragmented guest gives), so backing lists have many entries."""
        npages = max(1, -(-size // PAGE))
        if not scatter:
            return [(self.alloc(npages * PAGE, PAGE), npages * PAGE)]
        segs = []
        for _ in range(npages):
            segs.append((self.alloc(PAGE, PAGE), PAGE))
            self.alloc(PAGE, PAGE)  # a hole, so neighbours do not merge
        return segs


class GuestContext:
    """One DRM fd (one guest process): its context, buffers and fence page."""

    def __init__(self, gpu: GuestGpu, ctx_id: int) -> None:
        self.gpu = gpu
        self.ctx_id = ctx_id
        self.fence_bo: Bo | None = None
        self.reply_bo: Bo | None = None
        self._seq: dict[int, int] = {}
        self._reply_next = 0

    async def create_bo(self, size: int, *, scatter: bool = False) -> Bo:
        g = self.gpu
        g._res += 1
        rid = g._res
        # RESOURCE_CREATE_3D: fenced, header ctx_id 0 (DESIGN.md).
        await g.call(
            hdr(wire.Cmd.RESOURCE_CREATE_3D, fence_id=g.next_fence())
            + struct.pack(
                "<12I", rid, _PIPE_BUFFER, _R8_UNORM, _BIND_CUSTOM, size, 1, 1, 1, 0, 0, 0, 0
            )
        )
        segs = g.alloc_pages(size, scatter=scatter)
        entries = b"".join(struct.pack("<QII", gpa, n, 0) for gpa, n in segs)
        await g.call(
            hdr(wire.Cmd.RESOURCE_ATTACH_BACKING) + struct.pack("<II", rid, len(segs)) + entries
        )
        await g.call(
            hdr(wire.Cmd.CTX_ATTACH_RESOURCE, ctx_id=self.ctx_id) + struct.pack("<II", rid, 0)
        )
        return Bo(rid, size, segs, g.mem)

    async def close_bo(self, bo: Bo) -> None:
        """GEM close: CTX_DETACH_RESOURCE, then RESOURCE_UNREF (no DETACH_BACKING)."""
        g = self.gpu
        await g.call(
            hdr(wire.Cmd.CTX_DETACH_RESOURCE, ctx_id=self.ctx_id)
            + struct.pack("<II", bo.resource_id, 0)
        )
        await g.call(hdr(wire.Cmd.RESOURCE_UNREF) + struct.pack("<II", bo.resource_id, 0))

    async def destroy(self) -> None:
        await self.gpu.call(hdr(wire.Cmd.CTX_DESTROY, ctx_id=self.ctx_id))

    async def submit(self, batch: bytes) -> None:
        """EXECBUFFER: a fenced SUBMIT_3D with the payload byte for byte."""
        g = self.gpu
        await g.call(
            hdr(wire.Cmd.SUBMIT_3D, ctx_id=self.ctx_id, fence_id=g.next_fence())
            + struct.pack("<II", len(batch), 0)
            + batch
        )

    async def setup_fences(self) -> None:
        self.fence_bo = await self.create_bo(PAGE)
        self.reply_bo = await self.create_bo(REPLY_SLOT * REPLY_SLOTS)
        await self.submit(encode_batch([rec(Opcode.FENCE_PAGE_SET, self.fence_bo.resource_id, 0)]))

    async def run(
        self, records: Sequence[Record], *, stream: int = 0, timeout: float = 10.0
    ) -> Reply:
        """Submit records + SIGNAL, wait on the fence page, return the reply."""
        seq = await self.start(records, stream=stream)
        return await self.wait(stream, seq, timeout=timeout)

    async def start(self, records: Sequence[Record], *, stream: int = 0) -> int:
        if self.fence_bo is None:
            await self.setup_fences()
        assert self.reply_bo is not None
        seq = self._seq.get(stream, 0) + 1
        self._seq[stream] = seq
        slot = self._reply_next % REPLY_SLOTS
        self._reply_next += 1
        self._pending_slot = getattr(self, "_pending_slot", {})
        self._pending_slot[(stream, seq)] = slot
        sig = rec(
            Opcode.SIGNAL, seq, self.reply_bo.resource_id, slot * REPLY_SLOT, REPLY_SLOT,
            stream=stream,
        )  # fmt: skip
        await self.submit(encode_batch([*records, sig]))
        return seq

    def fence_slot(self, stream: int) -> tuple[int, int, int, int]:
        assert self.fence_bo is not None
        raw = self.fence_bo.read(HEADER_ST.size + stream * SLOT_ST.size, SLOT_ST.size)
        values: tuple[int, int, int, int] = SLOT_ST.unpack(raw)
        return values

    def fence_header(self) -> tuple[int, int, int, int, int]:
        assert self.fence_bo is not None
        values: tuple[int, int, int, int, int] = HEADER_ST.unpack(
            self.fence_bo.read(0, HEADER_ST.size)
        )
        return values

    async def wait(self, stream: int, seq: int, *, timeout: float = 10.0) -> Reply:
        """Wait with backoff until the fence page says ``seq`` is done on ``stream``."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            done, err_seq, code, failed = self.fence_slot(stream)
            if done >= seq:
                break
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"stream {stream} seq {seq} not done (at {done})")
            # Spin (yielding) for the first 2 ms: asyncio rounds sleeps below a
            # millisecond up to one, which would dominate a short round trip.
            await asyncio.sleep(0 if now - start < 0.002 else 0.001)
        slot = self._pending_slot.pop((stream, seq))
        assert self.reply_bo is not None
        raw = self.reply_bo.read(slot * REPLY_SLOT, REPLY_SLOT)
        try:
            status, failed_index, message, _n, results, blob = decode_reply(raw)
        except Exception:  # no reply written (e.g. rejected before running)
            if err_seq == seq:
                return Reply(ErrorCode(code), failed, "", {}, b"")
            raise
        if err_seq == seq and status == 0:
            status = code  # the reply did not fit: the fence page says why
        return Reply(ErrorCode(status), failed_index, message, dict(results), bytes(blob))


def fence_page_size() -> int:
    return FENCE_PAGE_SIZE


__all__ = [
    "Bo",
    "CommandFailed",
    "DirectTransport",
    "FrontendTransport",
    "GuestContext",
    "GuestGpu",
    "Reply",
    "decode_payload",
]
