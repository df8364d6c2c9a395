"""The vGPU: a virtio-gpu device model whose 3D side is a remote GPU.

What the Linux 6.12 guest driver sends and in which order is recorded in
DESIGN.md ("What the guest kernel sends, per ioctl"); this model serves exactly
that: RESOURCE_CREATE_3D and ATTACH_BACKING with ctx_id 0, UNREF before or
after CTX_DESTROY, no DETACH_BACKING before UNREF, every command in an
indirect table (the virtqueue layer handles that).

2D resources and the scanout are served cheaply with a null scanout (the
guest console flushes every ~200 ms). SUBMIT_3D carries vGPU batches
(vpcie/protocol/batch.py) that go to this context's agent session; a virtio
fence means "accepted", completion is published on the fence page.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from vpcie._native.batchcheck import batch_checker
from vpcie._native.lane import BatchParts
from vpcie.backend.device import (
    BASE_FEATURES,
    GPU_FEATURES,
    MAX_CHAINS_PER_KICK,
    VIRTIO_GPU_CONFIG,
    Device,
)
from vpcie.errors import ErrorCode, GuestError, ProtocolError, VgpuError
from vpcie.gpu import wire
from vpcie.gpu.binding import Binding, Session, info_bytes
from vpcie.gpu.capset import (
    CAPSET_SIZE,
    VGPU_CAPSET_ID,
    VGPU_CAPSET_VERSION,
    capset_payload,
    make_edid,
    unbound_info,
)
from vpcie.gpu.fencepage import FencePage
from vpcie.gpu.lanes import Lanes
from vpcie.gpu.resources import (
    MAX_2D_DIMENSION,
    MAX_BACKING_ENTRIES,
    ParameterError,
    Resource,
    ResourceError,
    ResourceTable,
    check_backing,
)
from vpcie.gpu.submit import Prepared, Signal, completion_reply, prepare, prepare_checked
from vpcie.memory import GuestMemory
from vpcie.protocol.batch import Record, decode_batch
from vpcie.protocol.codes import MAX_BATCH_BYTES, MAX_HANDLE_EPOCH, MAX_STREAMS, NO_INDEX, Opcode
from vpcie.tunnel.runstate import Runstate
from vpcie.virtqueue import VirtQueue
from vpcie.virtqueue.chain import DescChain
from vpcie.virtqueue.reply import Withheld, withheld

log = logging.getLogger(__name__)

CONTROL_QUEUE, CURSOR_QUEUE = 0, 1
MAX_REQUEST_BYTES = wire.SUBMIT_3D.sizeof() + MAX_BATCH_BYTES
MAX_CONTEXTS = 1024
MAX_CTX_INFLIGHT = 1024  # forwarded batches per context not yet completed
# Outcomes of batches ended here (refused, over a cap) that wait for earlier
# work of their context before their SIGNALs publish; past this many a
# context's next ones publish at once (a guest that keeps this many failed
# batches outstanding gets no ordering for them, the backend no growth).
MAX_DEFERRED = 1024
# Guest batch bytes this vGPU holds for work not yet completed (queued behind
# the agent's window, or on the wire): a guest resubmitting 1 MiB batches must
# not grow the backend's memory without bound.
MAX_INFLIGHT_BATCH_BYTES = 64 << 20
SCANOUT_W, SCANOUT_H = 1024, 768
_BPP_2D = 4  # every virtio-gpu 2D format is 32 bits per pixel
PIPE_BUFFER = 0  # gallium pipe_texture_target for buffers


class ContextError(GuestError):
    """Unknown context id (ERR_INVALID_CONTEXT_ID)."""


_RESP_FOR_ERROR: list[tuple[type[GuestError], wire.Resp]] = [
    (ResourceError, wire.Resp.ERR_INVALID_RESOURCE_ID),
    (ContextError, wire.Resp.ERR_INVALID_CONTEXT_ID),
    (ParameterError, wire.Resp.ERR_INVALID_PARAMETER),
]


@dataclass(eq=False)  # identity: a batch is itself, whatever its fields
class Pending:
    prepared: Prepared
    ctx: Context
    done: bool = False
    mem: GuestMemory | None = None  # the table its views point into, held until done
    nbytes: int = 0  # its share of the device's in-flight batch bytes


@dataclass(eq=False)
class Context:
    ctx_id: int
    name: str
    resources: set[int] = field(default_factory=set)
    fence: FencePage | None = None
    fence_gpa: int = 0
    fence_rid: int = 0
    session: Session | None = None
    session_gen: int = -1
    lost_gen: int = -1  # binding generation in which this context's session was lost
    lost_reason: str = ""
    # Sessions this context has had: the handle epoch of its next one, so a
    # handle kept across a rebind is refused as STALE_HANDLE (codes.py).
    sessions: int = 0
    queue: asyncio.Queue[Pending] | None = None
    forwarder: asyncio.Task[None] | None = None
    inflight: list[Pending] = field(default_factory=list)
    window_open: asyncio.Event = field(default_factory=asyncio.Event)
    forwarding: bool = False  # the forwarder holds a batch (waiting for session/window)
    deferred: list[Deferred] = field(default_factory=list)


@dataclass(eq=False)
class Deferred:
    """The SIGNALs of a batch ended here, published once the batches that
    were in flight when it ended have finished (a SIGNAL never overtakes
    earlier work, GUEST_ABI.md)."""

    publish: Callable[[], None]
    waiting: set[Pending]
    pending: Pending | None = None  # a refused batch whose reply views wait with it


@dataclass(eq=False)
class HeldUnref:
    """An UNREF (or DETACH_BACKING) answered once no batch still reads or
    writes the resource's backing: the guest kernel frees those pages only
    when the answer comes, so until then they are still the buffer's."""

    rids: set[int]
    chain: DescChain
    response: bytes
    mem: GuestMemory | None  # the table ``chain`` points into, held until answered


class GpuDevice(Device):
    """virtio-gpu + vGPU. ``handle(request) -> response`` is the sans-IO core;
    ``on_kick`` feeds it from the control queue."""

    name = "vpcie-gpu"

    def __init__(
        self,
        binding: Binding | None = None,
        *,
        memory: Callable[[], GuestMemory] | None = None,
        lane: bool = True,
    ) -> None:
        super().__init__()
        self.binding = binding or Binding()
        self.binding.listeners.append(self._binding_changed)
        self._memory = memory
        self.resources = ResourceTable()
        self.contexts: dict[int, Context] = {}
        self.scanout_resource = 0
        self.stats = {
            "commands": 0, "errors": 0, "submits": 0, "submits_native": 0, "rejected": 0,
            "flushes": 0,
        }  # fmt: skip
        self.inflight_bytes = 0  # guest batch bytes held for uncompleted work
        self.edid = make_edid(SCANOUT_W, SCANOUT_H)
        self.bound_info: bytes = unbound_info()
        self._tasks: set[asyncio.Task[None]] = set()
        self.gpu_socket: int | None = None
        self._servers: dict[int, Callable[[bytes, int], bytes]] = {}
        self._checker = batch_checker()
        self._withhold: list[int] = []  # set by a handler: answer this request later
        self._held: list[HeldUnref] = []
        # Copy-free batches of lent sessions are served by a C thread (lanes.py).
        self.lanes = Lanes(self, MAX_REQUEST_BYTES, enabled=lane)

    # -- Device interface ---------------------------------------------------------
    def features(self) -> int:
        return BASE_FEATURES | GPU_FEATURES

    def num_queues(self) -> int:
        return 2

    def config(self) -> bytes:
        return bytes(
            VIRTIO_GPU_CONFIG.build(
                {"events_read": 0, "events_clear": 0, "num_scanouts": 1, "num_capsets": 1}
            )
        )

    def on_kick(self, queue_index: int, vq: VirtQueue) -> None:
        if queue_index == CONTROL_QUEUE and self.lanes.owns_ring():
            self.lanes.poke()  # the lane serves it; Python gets its turns from there
            return
        serve = self._servers.get(queue_index)
        if serve is None:
            serve = self._servers[queue_index] = (
                self.serve_control if queue_index == CONTROL_QUEUE else self._serve_cursor
            )
        vq.serve(serve, MAX_CHAINS_PER_KICK, MAX_REQUEST_BYTES)

    def serve_control(self, request: bytes, read_len: int) -> bytes:
        """A control-queue request (a chain's readable bytes) -> its response."""
        if read_len > MAX_REQUEST_BYTES or read_len < wire.HDR_SIZE:
            # Too long: ``request`` is its leading bytes; too short: nothing to echo.
            head = request[: wire.HDR_SIZE] if read_len >= wire.HDR_SIZE else b""
            return self._error_reply(head, wire.Resp.ERR_INVALID_PARAMETER)
        return self.handle(request)

    def _serve_cursor(self, request: bytes, read_len: int) -> bytes:
        # The cursor queue has no response buffers (virtio 1.2 §5.7.6.10).
        self.serve_control(request, read_len)
        return b""

    def on_set_socket(self, fd: int) -> None:
        # QEMU's end of the vhost-user-gpu socket (display updates). The null
        # scanout sends nothing on it, but it stays open for the connection's
        # life: QEMU treats a closed display socket as a broken backend.
        if self.gpu_socket is not None:
            os.close(self.gpu_socket)
        self.gpu_socket = fd

    def on_queue_started(self, queue_index: int) -> None:
        self.lanes.queue_started(queue_index)
        if queue_index == CONTROL_QUEUE and self._held:
            self._answer_held()

    def on_queue_stopped(self, queue_index: int) -> None:
        self.lanes.queue_stopped(queue_index)

    def on_call_fd(self, queue_index: int, fd: int | None) -> None:
        self.lanes.call_fd(queue_index, fd)

    def reset(self) -> None:
        super().reset()
        self._withhold.clear()
        held, self._held = self._held, []  # the rings are gone: nothing to answer
        for h in held:
            self._release_mem(h.mem)
        for ctx in list(self.contexts.values()):
            self._destroy_context(ctx)
        self.resources.clear()
        self.scanout_resource = 0

    def close(self) -> None:
        self.reset()
        self.lanes.close()
        if self.gpu_socket is not None:
            os.close(self.gpu_socket)
            self.gpu_socket = None

    # -- the sans-IO core ---------------------------------------------------------
    def mem(self) -> GuestMemory:
        if self._memory is not None:
            return self._memory()
        if self.host is None:
            raise ParameterError("no guest memory yet")
        return self.host.memory.mem

    def handle(self, request: bytes) -> bytes:
        """One control/cursor command in, its response out; never raises."""
        stats = self.stats
        stats["commands"] += 1
        if len(request) < wire.HDR_SIZE:
            stats["errors"] += 1
            return wire.response(wire.Resp.ERR_UNSPEC, 0, 0, 0, 0)
        ctype = _U32.unpack_from(request, 0)[0]
        entry = _DISPATCH.get(ctype)
        if entry is None:
            log.info("unsupported virtio-gpu command %#x", ctype)
            return self._error_reply(request, wire.Resp.ERR_UNSPEC)
        fast, handler = entry
        try:
            fields, end = fast.decode(request, 0)
        except ProtocolError:
            return self._error_reply(request, wire.Resp.ERR_INVALID_PARAMETER)
        try:
            rtype, payload = handler(self, fields, request[end:] if end < len(request) else b"")
        except GuestError as exc:
            stats["errors"] += 1
            log.info("virtio-gpu command %#x refused: %s", ctype, exc)
            for cls, resp in _RESP_FOR_ERROR:
                if isinstance(exc, cls):
                    return self._error_reply(request, resp)
            return self._error_reply(request, wire.Resp.ERR_UNSPEC)
        flags = fields[1]
        if flags & wire.FLAG_FENCE:  # virtio 1.2 §5.7.6.8: echo the fence
            head = _HDR_PACK(rtype, flags & _ECHO_FLAGS, fields[2], fields[3], fields[4], _PAD3)
        else:
            head = _PLAIN_HEAD.get(rtype) or wire.response(rtype, 0, 0, 0, 0)
        out = head + payload if payload else head
        if self._withhold:
            return self._hold(out)
        return out

    def _error_reply(self, request: bytes, rtype: wire.Resp) -> bytes:
        self.stats["errors"] += 1
        if len(request) >= wire.HDR_SIZE:
            _t, flags, fence_id, ctx_id, ring_idx, _pad = wire.HDR.unpack_from(request, 0)
            return wire.response(rtype, flags, fence_id, ctx_id, ring_idx)
        return wire.response(rtype, 0, 0, 0, 0)

    # -- 2D and display -------------------------------------------------------------
    def _display_info(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        out = [wire.DISPLAY_ONE_ST.pack(0, 0, SCANOUT_W, SCANOUT_H, 1, 0)]
        out += [bytes(wire.DISPLAY_ONE_ST.size)] * (wire.MAX_SCANOUTS - 1)
        return wire.Resp.OK_DISPLAY_INFO, b"".join(out)

    def _edid(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        if f[6] != 0:
            raise ParameterError(f"scanout {f[6]} does not exist")
        edid = self.edid + bytes(wire.EDID_SIZE - len(self.edid))
        return wire.Resp.OK_EDID, struct.pack("<II", len(self.edid), 0) + edid

    def _create_2d(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        rid, fmt, width, height = f[6:10]
        if not (0 < width <= MAX_2D_DIMENSION and 0 < height <= MAX_2D_DIMENSION):
            raise ParameterError(f"2D size {width}x{height} out of range")
        self.resources.create(Resource(rid, width * height * _BPP_2D, False, width, height, fmt))
        return wire.Resp.OK_NODATA, b""

    def _unref(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        self.lanes.dirty = True
        res = self.resources.unref(f[6])
        for cid in res.contexts:
            ctx = self.contexts.get(cid)
            if ctx is not None:
                ctx.resources.discard(res.resource_id)
        if self.scanout_resource == res.resource_id:
            self.scanout_resource = 0
        if self.contexts:  # else no batch, fence page or lane can be using it
            self._backing_gone(res.resource_id)
        return wire.Resp.OK_NODATA, b""

    def _set_scanout(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        scanout, rid = f[10], f[11]
        if scanout != 0:
            raise ParameterError(f"scanout {scanout} does not exist")
        if rid:
            self.resources.get(rid)
        self.scanout_resource = rid
        return wire.Resp.OK_NODATA, b""

    def _flush(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        self.resources.get(f[10])  # null scanout: nothing to show, but the id must exist
        self.stats["flushes"] += 1
        return wire.Resp.OK_NODATA, b""

    def _transfer_2d(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        x, y, w, h, offset, rid = f[6:12]
        res = self.resources.get(rid)
        if res.backing is None:
            raise ParameterError(f"resource {rid} has no backing")
        if x + w > res.width or y + h > res.height or offset > res.size:
            raise ParameterError("transfer box outside the resource")
        return wire.Resp.OK_NODATA, b""

    def _attach_backing(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        rid, nr = f[6], f[7]
        res = self.resources.get(rid)
        if nr > MAX_BACKING_ENTRIES:
            raise ParameterError(f"{nr} backing entries over cap {MAX_BACKING_ENTRIES}")
        if len(rest) < nr * wire.MEM_ENTRY_ST.size:
            raise ParameterError(f"ATTACH_BACKING names {nr} entries but carries fewer")
        if res.backing is not None:
            raise ParameterError(f"resource {rid} already has backing")
        entries = [(a, n) for a, n, _p in wire.MEM_ENTRY_ST.iter_unpack(rest[: nr * 16])]
        total = check_backing(self.mem(), entries)
        res.backing, res.backing_bytes = entries, total
        self.lanes.dirty = True
        return wire.Resp.OK_NODATA, b""

    def _detach_backing(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        res = self.resources.get(f[6])
        if res.backing is None:
            raise ParameterError(f"resource {res.resource_id} has no backing")
        res.backing, res.backing_bytes = None, 0
        self.lanes.dirty = True
        if self.contexts:
            self._backing_gone(res.resource_id)
        return wire.Resp.OK_NODATA, b""

    # -- capsets ----------------------------------------------------------------
    def _capset_info(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        if f[6] != 0:
            raise ParameterError(f"capset index {f[6]} does not exist")
        return wire.Resp.OK_CAPSET_INFO, struct.pack(
            "<IIII", VGPU_CAPSET_ID, VGPU_CAPSET_VERSION, CAPSET_SIZE, 0
        )

    def _capset(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        if f[6] != VGPU_CAPSET_ID or f[7] > VGPU_CAPSET_VERSION:
            raise ParameterError(f"capset {f[6]} v{f[7]} not offered")
        return wire.Resp.OK_CAPSET, capset_payload(self.bound_info)

    # -- contexts and 3D resources ---------------------------------------------------
    def _ctx(self, ctx_id: int) -> Context:
        ctx = self.contexts.get(ctx_id)
        if ctx is None:
            raise ContextError(f"unknown context {ctx_id}")
        return ctx

    def _ctx_create(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        ctx_id, nlen, context_init, raw = f[3], f[6], f[7], f[8]
        if ctx_id == 0:
            raise ContextError("context id 0 is reserved")
        if ctx_id in self.contexts:
            raise ContextError(f"context {ctx_id} already exists")
        if len(self.contexts) >= MAX_CONTEXTS:
            raise ParameterError(f"too many contexts (cap {MAX_CONTEXTS})")
        if context_init != 0:
            raise ParameterError("context_init is not supported")  # QEMU forwards no CONTEXT_INIT
        name = raw[: min(nlen, 64)].decode("utf-8", "replace")
        self.contexts[ctx_id] = Context(ctx_id, name)
        log.info("context %d created by %r", ctx_id, name)
        return wire.Resp.OK_NODATA, b""

    def _ctx_destroy(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        self._destroy_context(self._ctx(f[3]))
        return wire.Resp.OK_NODATA, b""

    def _ctx_attach(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        ctx, res = self._ctx(f[3]), self.resources.get(f[6])
        self.lanes.dirty = True
        ctx.resources.add(res.resource_id)
        res.contexts.add(ctx.ctx_id)
        return wire.Resp.OK_NODATA, b""

    def _ctx_detach(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        ctx, res = self._ctx(f[3]), self.resources.get(f[6])
        if res.resource_id not in ctx.resources:
            raise ResourceError(f"resource {res.resource_id} not attached to context {ctx.ctx_id}")
        ctx.resources.discard(res.resource_id)
        res.contexts.discard(ctx.ctx_id)
        self.lanes.dirty = True
        return wire.Resp.OK_NODATA, b""

    def _create_3d(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        rid, target, fmt, _bind, width, height, depth, array_size = f[6:14]
        if target == PIPE_BUFFER:
            size = width
        else:
            size = width * max(height, 1) * max(depth, 1) * max(array_size, 1) * _BPP_2D
        self.resources.create(Resource(rid, size, True, width, height, fmt))
        return wire.Resp.OK_NODATA, b""

    def _transfer_3d(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        # Resources are guest-backed and the remote GPU copies straight into
        # their pages (COPY records), so a transfer moves nothing; it is checked.
        ctx_id, (x, _y, _z, w, _h, _d), rid = f[3], f[6:12], f[13]
        res = self.resources.get(rid)
        if ctx_id and ctx_id not in res.contexts:
            raise ResourceError(f"resource {rid} not attached to context {ctx_id}")
        if res.backing is None:
            raise ParameterError(f"resource {rid} has no backing")
        if res.is_3d and res.height <= 1 and x + w > res.size:
            raise ParameterError("transfer box outside the buffer")
        return wire.Resp.OK_NODATA, b""

    def _cursor(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        return wire.Resp.OK_NODATA, b""

    # -- SUBMIT_3D ------------------------------------------------------------------
    def _submit(self, f: tuple[Any, ...], rest: bytes) -> tuple[int, bytes]:
        ctx = self._ctx(f[3])
        size = f[6]
        if size != len(rest) or size > MAX_BATCH_BYTES:
            raise ParameterError(f"SUBMIT_3D size {size} but {len(rest)} bytes follow")
        self.stats["submits"] += 1
        checker = self._checker
        if checker is not None and self.binding.target is not None:
            # Most batches: stage 1 in C, no Record objects (the Python path
            # below is the reference, and handles whatever C declines).
            checked = checker.check(rest)
            if checked is not None:
                fast = prepare_checked(checked, self.resources, ctx.resources, self.mem(), rest)
                if fast is not None:
                    self.stats["submits_native"] += 1
                    self._dispatch(ctx, fast)
                    return wire.Resp.OK_NODATA, b""
        spans: list[tuple[int, int]] = []
        try:
            records = decode_batch(rest, spans)
        except ProtocolError as exc:
            self._reject(ctx, ErrorCode.PROTOCOL, [], str(exc))
            raise ParameterError(f"malformed vGPU batch: {exc}") from exc
        try:
            prepared = prepare(records, self.resources, ctx.resources, self.mem(), rest, spans)
        except VgpuError as exc:
            self._reject(ctx, exc.code, records, exc.message, exc.index)
            raise ParameterError(f"vGPU batch refused: {exc}") from exc
        if prepared.fence_page is not None:
            with self.lanes.locked(ctx):
                ctx.fence = FencePage(prepared.fence_page)
            ctx.fence_gpa, ctx.fence_rid = prepared.fence_gpa, prepared.fence_rid
            self.lanes.dirty = True
        self._dispatch(ctx, prepared)
        return wire.Resp.OK_NODATA, b""

    def _reject(
        self, ctx: Context, code: ErrorCode, records: list[Any], message: str, index: int = -1
    ) -> None:
        """A batch refused before anything ran: count it now, end its SIGNALs
        after the work submitted before it."""
        self.stats["rejected"] += 1
        log.info("context %d: batch rejected: %s: %s", ctx.ctx_id, code.name, message)
        if ctx.fence is None:
            return
        with self.lanes.locked(ctx):
            ctx.fence.reject(int(code))
        signals = [
            (r.stream, r.body[0])
            for r in records
            if r.opcode == Opcode.SIGNAL and isinstance(r.body, tuple) and r.stream < MAX_STREAMS
        ]
        if not signals:
            return

        def publish() -> None:
            fence = ctx.fence
            if fence is not None:
                with self.lanes.locked(ctx):
                    for stream, seq in signals:
                        fence.complete(stream, seq, int(code), max(index, 0))

        self._after_earlier(ctx, publish)

    def _after_earlier(
        self, ctx: Context, publish: Callable[[], None], pending: Pending | None = None
    ) -> None:
        """Run ``publish`` (ending ``pending``, if given) once every batch of
        ``ctx`` now in flight has finished (at once when none is)."""
        self.lanes.take_back(ctx)  # the lane's batches become ctx.inflight
        if not ctx.inflight or len(ctx.deferred) >= MAX_DEFERRED:
            publish()
            return
        ctx.deferred.append(Deferred(publish, set(ctx.inflight), pending))

    def _dispatch(self, ctx: Context, prepared: Prepared) -> None:
        # A lent session comes back before Python sends on it, with the lane's
        # batches in flight adopted into ctx.inflight (a SIGNAL waits for them).
        self.lanes.take_back(ctx)
        if not prepared.fwd_index:
            if not (prepared.signals and ctx.inflight):
                self._finish(Pending(prepared, ctx), ErrorCode.OK, NO_INDEX, "", {}, b"")
                return
            # SIGNALs alone while earlier batches are still running: a SIGNAL
            # must not publish before the work queued ahead of it on its
            # stream is done, so a NOP per stream goes to the agent, which
            # orders it behind that work (and completes it after).
            streams = sorted({sig.stream for sig in prepared.signals})
            prepared.forward = [Record(int(Opcode.NOP), 0, s, ()) for s in streams]
            prepared.fwd_index = [0] * len(streams)
        gen = self.binding.generation
        if self.binding.target is None:
            self._answer_unbound(ctx, prepared)
            return
        if ctx.lost_gen == gen:
            self._finish(
                Pending(prepared, ctx),
                ErrorCode.DEVICE_LOST,
                0,
                "the agent session of this context was lost; recreate the context",
                {},
                b"",
            )
            return
        nbytes = len(prepared.raw)
        over = ""
        if len(ctx.inflight) >= MAX_CTX_INFLIGHT:
            over = f"more than {MAX_CTX_INFLIGHT} batches in flight"
        elif self.inflight_bytes + nbytes > MAX_INFLIGHT_BATCH_BYTES:
            over = f"more than {MAX_INFLIGHT_BATCH_BYTES >> 20} MiB of batches in flight"
        if over:
            refused = Pending(prepared, ctx)
            if self.host is not None:  # its reply views stay mapped until it publishes
                refused.mem = self.host.memory.acquire()
            self._after_earlier(
                ctx,
                functools.partial(
                    self._finish, refused, ErrorCode.QUOTA_EXCEEDED, 0, over, {}, b""
                ),
                refused,
            )
            return
        pending = Pending(prepared, ctx, nbytes=nbytes)
        self.inflight_bytes += nbytes
        ctx.inflight.append(pending)
        if self.host is not None:  # its views stay mapped until it completes
            pending.mem = self.host.memory.acquire()
        session = ctx.session
        if (
            session is not None
            and ctx.session_gen == gen
            and not ctx.forwarding
            and (ctx.queue is None or ctx.queue.empty())
            and session.inflight < _window(session)
        ):
            # Fast path: nothing queued ahead of it and room in the agent's
            # window, so it goes on the wire now (saves a task hop).
            self._send(ctx, session, pending)
            return
        if ctx.queue is None:
            ctx.queue = asyncio.Queue()
            ctx.forwarder = asyncio.get_running_loop().create_task(self._forward(ctx))
        ctx.queue.put_nowait(pending)

    def _answer_unbound(self, ctx: Context, prepared: Prepared) -> None:
        """No GPU bound: QUERY says so, everything else fails with NO_DEVICE."""
        results: dict[int, int] = {}
        blob = b""
        for i, r in enumerate(prepared.forward):
            if r.opcode == Opcode.QUERY:
                blob = self.bound_info
            elif r.opcode != Opcode.NOP:
                self._finish(
                    Pending(prepared, ctx),
                    ErrorCode.NO_DEVICE,
                    i,
                    "no GPU is bound to this vGPU",
                    results,
                    blob,
                )
                return
        self._finish(Pending(prepared, ctx), ErrorCode.OK, NO_INDEX, "", results, blob)

    async def _forward(self, ctx: Context) -> None:
        """Send this context's queued batches to its agent session, in order,
        keeping at most the agent's granted in-flight window outstanding."""
        assert ctx.queue is not None
        while True:
            pending = await ctx.queue.get()
            if pending.done:
                continue
            ctx.forwarding = True
            try:
                session = await self._session(ctx)
                while session.inflight >= _window(session) and not pending.done:
                    ctx.window_open.clear()
                    await ctx.window_open.wait()
                if not pending.done:
                    self._send(ctx, session, pending)
            except VgpuError as exc:
                self._finish(pending, exc.code, 0, exc.message, {}, b"")
                if exc.code == ErrorCode.DEVICE_LOST:
                    self._mark_lost(ctx, exc.message)
            finally:
                ctx.forwarding = False

    def _send(self, ctx: Context, session: Session, pending: Pending) -> None:
        p = pending.prepared
        try:
            data = p.encoded()
            p.records, p.spans, p.raw = None, None, b""  # the wire copy is all that is needed
        except ProtocolError as exc:  # over the batch caps once rewritten
            self._finish(pending, ErrorCode.INVALID_ARGUMENT, 0, str(exc), {}, b"")
            return
        h2d_total, d2h_total = p.copy_totals()
        try:
            session.send_encoded(
                data, h2d_total, d2h_total, h2d=p.h2d, d2h=p.d2h,
                on_done=functools.partial(self._done, pending),
            )  # fmt: skip
        except VgpuError as exc:
            self._finish(pending, exc.code, 0, exc.message, {}, b"")
            if exc.code == ErrorCode.DEVICE_LOST:
                self._mark_lost(ctx, exc.message)

    async def _session(self, ctx: Context) -> Session:
        gen = self.binding.generation
        if ctx.session is not None and ctx.session_gen == gen:
            return ctx.session
        if ctx.lost_gen == gen:
            raise VgpuError(ErrorCode.DEVICE_LOST, "agent session lost")
        epoch = ctx.sessions
        if epoch > MAX_HANDLE_EPOCH:  # its handles would repeat: refuse, never wrap
            raise VgpuError(
                ErrorCode.DEVICE_LOST,
                f"context {ctx.ctx_id} has had {epoch} agent sessions (one per binding), "
                "the most its handles can tell apart; recreate the context",
            )
        try:
            session, sgen = await self.binding.open(f"{ctx.name}#{ctx.ctx_id}", epoch)
        except VgpuError:
            raise
        except Exception as exc:  # auth refused, protocol error: the agent is unusable
            raise VgpuError(ErrorCode.DEVICE_LOST, f"cannot open agent session: {exc}") from exc
        if sgen != self.binding.generation or ctx.ctx_id not in self.contexts:
            self._background(session.close())
            raise VgpuError(ErrorCode.DEVICE_LOST, "binding changed while connecting")
        ctx.session, ctx.session_gen = session, sgen
        ctx.sessions = epoch + 1  # handles this session issues carry ``epoch``
        self.bound_info = info_bytes(session.info)
        return session

    def _mark_lost(self, ctx: Context, reason: str = "") -> None:
        if ctx.session_gen == self.binding.generation:
            if ctx.lost_gen != ctx.session_gen:  # the first reason is the one to show
                reason = reason or "the agent session was lost"
                endpoint = getattr(ctx.session, "endpoint", "")
                if endpoint and endpoint not in reason:
                    reason = f"agent {endpoint}: {reason}"
                ctx.lost_reason = reason
            ctx.lost_gen = self.binding.generation
            if ctx.session is not None:
                self._background(ctx.session.close())
            ctx.session = None
        self._fail_inflight(ctx, ErrorCode.DEVICE_LOST, "the agent session was lost")

    def _done(self, pending: Pending, comp: Any) -> None:
        """The agent's Completion (or the tunnel's DEVICE_LOST), synchronously."""
        ctx = pending.ctx
        ctx.window_open.set()
        if pending.done:
            return
        code = ErrorCode(int(comp.status))
        self._finish(pending, code, comp.failed_index, comp.message, comp.results, comp.blob)
        if code == ErrorCode.DEVICE_LOST:
            self._mark_lost(ctx, comp.message)

    def _finish(
        self,
        pending: Pending,
        code: ErrorCode,
        failed_index: int,
        message: str,
        results: dict[int, int],
        blob: bytes,
    ) -> None:
        """Publish a batch's outcome: replies first, then the fence page."""
        if pending.done:
            return
        pending.done = True
        ctx, p = pending.ctx, pending.prepared
        if pending in ctx.inflight:
            ctx.inflight.remove(pending)
            if not ctx.inflight:
                self.lanes.schedule_lend(ctx)
        self.inflight_bytes -= pending.nbytes
        pending.nbytes = 0
        self._release_mem(pending.mem)
        pending.mem = None
        reply, orig_failed = completion_reply(
            p.fwd_index, any(sig.reply for sig in p.signals), code, failed_index, message,
            results, blob,
        )  # fmt: skip
        with self.lanes.locked(ctx):
            for sig in p.signals:
                sig_code = int(code)
                if sig.reply:
                    if len(reply) > sig.reply_size:
                        sig_code = int(ErrorCode.OUT_OF_RANGE)
                    else:
                        _scatter(sig.reply, reply)
                if ctx.fence is not None:
                    failed = orig_failed if orig_failed != NO_INDEX else 0
                    ctx.fence.complete(sig.stream, sig.seq, sig_code, failed)
        if ctx.deferred:
            self._release_deferred(ctx, pending)
        if self._held:
            self._answer_held()

    def _release_deferred(self, ctx: Context, done: Pending) -> None:
        """``done`` has finished: publish, in order, what waited only for it."""
        ready = []
        for d in ctx.deferred:
            d.waiting.discard(done)
            if not d.waiting:
                ready.append(d)
        if ready:
            ctx.deferred = [d for d in ctx.deferred if d.waiting]
            for d in ready:
                d.publish()

    def _fail_inflight(self, ctx: Context, code: ErrorCode, message: str) -> None:
        for pending in list(ctx.inflight):
            self._finish(pending, code, 0, message, {}, b"")
        ctx.window_open.set()

    # -- binding changes ------------------------------------------------------------
    def _binding_changed(self) -> None:
        """Unbind / rebind: every in-flight command ends with DEVICE_LOST now
        (the next session of each context gets a new handle epoch)."""
        if self.binding.target is None:
            self.bound_info = unbound_info()
            why = "the GPU was unbound from this vGPU"
        else:
            why = "this vGPU was bound to another GPU (its device memory is gone)"
        for ctx in self.contexts.values():
            self._drop_session(ctx, why)

    def _drop_session(self, ctx: Context, why: str) -> None:
        self.lanes.take_back(ctx)  # the lane's batches join ctx.inflight
        self._fail_inflight(ctx, ErrorCode.DEVICE_LOST, why)
        if ctx.session is not None:
            session, ctx.session = ctx.session, None
            self._background(session.close())

    # -- batches the lane sent (lanes.py) ------------------------------------------
    def lane_adopt(
        self, ctx: Context, batches: list[BatchParts]
    ) -> list[tuple[int, Callable[[Any], None]]]:
        """Take over the lane's batches in flight of ``ctx`` (its session is
        coming back): they join ``ctx.inflight`` ahead of Python's own and end
        like them. Returns each one's COMMAND seq and completion callback."""
        adopted: list[Pending] = []
        out: list[tuple[int, Callable[[Any], None]]] = []
        for parts in batches:
            mem = self.host.memory.acquire() if self.host is not None else None
            signals, rids = [], set()
            for stream, seq, size, segs, rid in parts.signals:
                views: list[memoryview] = []
                try:
                    for gpa, length in segs:
                        views += mem.views(gpa, length) if mem is not None else []
                except GuestError:  # checked when sent; gone with a new table since
                    views = []
                signals.append(Signal(stream, seq, views, size))
                if rid:
                    rids.add(rid)
            prepared = Prepared([], parts.fwd_index, signals=signals, rids=rids)
            pending = Pending(prepared, ctx, mem=mem)
            adopted.append(pending)
            out.append((parts.seq, functools.partial(self._done, pending)))
        ctx.inflight[0:0] = adopted
        return out

    # -- a resource's backing going away while batches still use it --------------
    def _backing_gone(self, rid: int) -> None:
        """RESOURCE_UNREF / DETACH_BACKING of ``rid``: nothing may touch its
        pages once the guest has the answer (Linux frees them then). A fence
        page on it is dropped now; batches still reading or writing it (SIGNAL
        replies, copies) make the answer wait for them (``_hold``)."""
        if self.lanes.leases:  # the lane writes nothing more (its batches join ctx.inflight)
            self.lanes.take_back_all()
        busy = False
        for ctx in self.contexts.values():
            if ctx.fence_rid == rid and ctx.fence is not None:
                ctx.fence, ctx.fence_gpa, ctx.fence_rid = None, 0, 0
            busy = busy or rid in self._busy_rids(ctx)
        if busy:
            self._withhold.append(rid)

    @staticmethod
    def _busy_rids(ctx: Context) -> set[int]:
        """The resources ``ctx``'s unfinished batches read or write."""
        busy: set[int] = set()
        for p in ctx.inflight:
            busy |= p.prepared.rids
        for d in ctx.deferred:
            if d.pending is not None:
                busy |= d.pending.prepared.rids
        return busy

    def _hold(self, response: bytes) -> Withheld:
        rids, self._withhold = set(self._withhold), []
        log.info("resource(s) %s still in use by batches in flight: answer held", sorted(rids))
        return withheld(response, functools.partial(self._keep, rids, response))

    def _keep(self, rids: set[int], response: bytes, chain: DescChain) -> None:
        mem = self.host.memory.acquire() if self.host is not None else None
        self._held.append(HeldUnref(rids, chain, response, mem))

    def _answer_held(self) -> None:
        """Answer the held UNREFs whose resources no batch uses any more."""
        host = self.host
        vq = host.queue(CONTROL_QUEUE) if host is not None else None
        if vq is None:  # the ring is stopped: answered once it runs again
            return
        busy: set[int] = set()
        for ctx in self.contexts.values():
            busy |= self._busy_rids(ctx)
        ready = [h for h in self._held if not h.rids & busy]
        if not ready:
            return
        self._held = [h for h in self._held if h.rids & busy]
        assert host is not None
        with self.lanes.ring_locked():  # the lane may be using the ring meanwhile
            for h in ready:
                try:
                    vq.answer(h.chain, h.response)
                except (GuestError, ValueError) as exc:  # a reset ring, a bad chain
                    log.warning("held answer to chain %d dropped: %s", h.chain.head, exc)
                self._release_mem(h.mem)
            host.notify(CONTROL_QUEUE)

    def _release_mem(self, mem: GuestMemory | None) -> None:
        if mem is not None and self.host is not None:
            self.host.memory.release(mem)

    def _destroy_context(self, ctx: Context) -> None:
        self._drop_session(ctx, "context destroyed")
        if ctx.forwarder is not None:
            ctx.forwarder.cancel()
        for rid in ctx.resources:
            if rid in self.resources:
                self.resources.get(rid).contexts.discard(ctx.ctx_id)
        self.contexts.pop(ctx.ctx_id, None)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (device torn down synchronously)
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notice_lost(self, ctx: Context) -> None:
        """A session the tunnel declared LOST while nothing of the context
        was in flight (no completion told the device): mark it lost now."""
        session = ctx.session
        if session is not None and getattr(session, "state", None) is Runstate.LOST:
            self._mark_lost(ctx, getattr(session, "lost_reason", ""))

    def status(self) -> dict[str, Any]:
        target = self.binding.target
        gen = self.binding.generation
        for c in list(self.contexts.values()):
            self._notice_lost(c)
        return {
            "binding": self.binding.state.value,
            "target": target.describe() if target else None,
            "contexts": [
                {
                    "id": c.ctx_id,
                    "name": c.name,
                    "resources": len(c.resources),
                    "inflight": len(c.inflight),
                    "session": c.session is not None,
                    "lent": self.lanes.leased(c),
                    "lost": c.lost_gen == gen,
                    "lost_reason": c.lost_reason if c.lost_gen == gen else "",
                    "handle_epoch": c.sessions - 1 if c.sessions else None,
                }
                for c in self.contexts.values()
            ],
            "resources": len(self.resources),
            "inflight_bytes": self.inflight_bytes,
            "unrefs_held": len(self._held),
            **self.stats,
            **self.lanes.stats(),
        }

    Handler = Callable[["GpuDevice", tuple[Any, ...], bytes], tuple[int, bytes]]
    _handlers: dict[int, Handler] = {
        wire.Cmd.GET_DISPLAY_INFO: _display_info,
        wire.Cmd.GET_EDID: _edid,
        wire.Cmd.RESOURCE_CREATE_2D: _create_2d,
        wire.Cmd.RESOURCE_UNREF: _unref,
        wire.Cmd.SET_SCANOUT: _set_scanout,
        wire.Cmd.RESOURCE_FLUSH: _flush,
        wire.Cmd.TRANSFER_TO_HOST_2D: _transfer_2d,
        wire.Cmd.RESOURCE_ATTACH_BACKING: _attach_backing,
        wire.Cmd.RESOURCE_DETACH_BACKING: _detach_backing,
        wire.Cmd.GET_CAPSET_INFO: _capset_info,
        wire.Cmd.GET_CAPSET: _capset,
        wire.Cmd.CTX_CREATE: _ctx_create,
        wire.Cmd.CTX_DESTROY: _ctx_destroy,
        wire.Cmd.CTX_ATTACH_RESOURCE: _ctx_attach,
        wire.Cmd.CTX_DETACH_RESOURCE: _ctx_detach,
        wire.Cmd.RESOURCE_CREATE_3D: _create_3d,
        wire.Cmd.TRANSFER_TO_HOST_3D: _transfer_3d,
        wire.Cmd.TRANSFER_FROM_HOST_3D: _transfer_3d,
        wire.Cmd.SUBMIT_3D: _submit,
        wire.Cmd.UPDATE_CURSOR: _cursor,
        wire.Cmd.MOVE_CURSOR: _cursor,
    }


_U32 = struct.Struct("<I")
_HDR_PACK = wire.HDR.pack
_PAD3 = b"\0\0\0"
_ECHO_FLAGS = wire.FLAG_FENCE | wire.FLAG_INFO_RING_IDX
_PLAIN_HEAD = {int(r): wire.response(r, 0, 0, 0, 0) for r in wire.Resp}
_DISPATCH: dict[int, tuple[Any, Any]] = {
    int(cmd): (wire.FAST[int(cmd)], handler) for cmd, handler in GpuDevice._handlers.items()
}


def _window(session: Session) -> int:
    return max(1, int(getattr(session.info, "max_inflight", 0) or 1))


def _scatter(views: list[memoryview], data: bytes) -> None:
    pos = 0
    for v in views:
        if pos >= len(data):
            break
        k = min(len(v), len(data) - pos)
        v[:k] = data[pos : pos + k]
        pos += k
