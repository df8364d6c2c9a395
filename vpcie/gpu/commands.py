"""The virtio-gpu command table: each control/cursor command, decoded and checked.

``CommandHandlers.handle(request) -> response`` is the sans-IO core of the
device: one command in (a chain's readable bytes), its response out, never an
exception. Each handler reads its command's named fields (wire.py) and
answers from the device's state: 2D resources and the null scanout, capsets,
contexts, 3D resources and SUBMIT_3D (handed to forwarding.py). What the
Linux guest sends and in which order is in DESIGN.md ("What the guest kernel
sends, per ioctl").
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

from vpcie._native.batchcheck import BatchChecker
from vpcie.errors import ErrorCode, GuestError, ProtocolError, VgpuError
from vpcie.gpu.binding import Binding
from vpcie.gpu.capset import CAPSET_SIZE, VGPU_CAPSET_ID, VGPU_CAPSET_VERSION, capset_payload
from vpcie.gpu.context import Context, ContextError
from vpcie.gpu.fencepage import FencePage
from vpcie.gpu.forwarding import Forwarding
from vpcie.gpu.holding import UnrefHolds
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
from vpcie.gpu.submit import prepare, prepare_checked
from vpcie.memory import GuestMemory
from vpcie.protocol import virtio_gpu as wire
from vpcie.protocol.batch import decode_batch
from vpcie.protocol.codes import MAX_BATCH_BYTES
from vpcie.protocol.virtio_gpu import Fields

# The device's logger: its records are under the guest log budget (logbudget.py).
log = logging.getLogger("vpcie.gpu.device")

MAX_REQUEST_BYTES = wire.SUBMIT_3D.sizeof() + MAX_BATCH_BYTES
MAX_CONTEXTS = 1024
SCANOUT_W, SCANOUT_H = 1024, 768
_BPP_2D = 4  # every virtio-gpu 2D format is 32 bits per pixel
PIPE_BUFFER = 0  # gallium pipe_texture_target for buffers

_RESP_FOR_ERROR: list[tuple[type[GuestError], wire.Resp]] = [
    (ResourceError, wire.Resp.ERR_INVALID_RESOURCE_ID),
    (ContextError, wire.Resp.ERR_INVALID_CONTEXT_ID),
    (ParameterError, wire.Resp.ERR_INVALID_PARAMETER),
]


class CommandHandlers:
    """The handlers of GpuDevice (device.py), one per virtio-gpu command, and
    ``handle`` that picks one. The state they read and change is declared
    here and set up by GpuDevice."""

    binding: Binding
    resources: ResourceTable
    contexts: dict[int, Context]
    scanout_resource: int
    stats: dict[str, int]
    edid: bytes
    bound_info: bytes
    lanes: Lanes
    forwarding: Forwarding
    holds: UnrefHolds
    _withhold: list[int]  # holds.pending_rids, the same list (read per command)
    _checker: BatchChecker | None

    def mem(self) -> GuestMemory:
        raise NotImplementedError

    def _destroy_context(self, ctx: Context) -> None:
        raise NotImplementedError

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
        unpack_from, end, named, handler = entry
        if end > len(request):
            return self._error_reply(request, wire.Resp.ERR_INVALID_PARAMETER)
        f = _NEW(named, unpack_from(request, 0))  # named fields, one object
        try:
            rtype, payload = handler(self, f, request[end:] if end < len(request) else b"")
        except GuestError as exc:
            stats["errors"] += 1
            log.info("virtio-gpu command %#x refused: %s", ctype, exc)
            for cls, resp in _RESP_FOR_ERROR:
                if isinstance(exc, cls):
                    return self._error_reply(request, resp)
            return self._error_reply(request, wire.Resp.ERR_UNSPEC)
        flags = f.flags
        if flags & wire.FLAG_FENCE:  # virtio 1.2 §5.7.6.8: echo the fence
            head = _HDR_PACK(rtype, flags & _ECHO_FLAGS, f.fence_id, f.ctx_id, f.ring_idx, _PAD3)
        else:
            head = _PLAIN_HEAD.get(rtype) or wire.response(rtype, 0, 0, 0, 0)
        out = head + payload if payload else head
        if self._withhold:  # an UNREF of a busy resource: answer later
            return self.holds.hold(out)
        return out

    def _error_reply(self, request: bytes, rtype: wire.Resp) -> bytes:
        self.stats["errors"] += 1
        if len(request) >= wire.HDR_SIZE:
            _t, flags, fence_id, ctx_id, ring_idx, _pad = wire.HDR.unpack_from(request, 0)
            return wire.response(rtype, flags, fence_id, ctx_id, ring_idx)
        return wire.response(rtype, 0, 0, 0, 0)

    # -- 2D and display -------------------------------------------------------------
    def _display_info(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        out = [wire.DISPLAY_ONE_ST.pack(0, 0, SCANOUT_W, SCANOUT_H, 1, 0)]
        out += [bytes(wire.DISPLAY_ONE_ST.size)] * (wire.MAX_SCANOUTS - 1)
        return wire.Resp.OK_DISPLAY_INFO, b"".join(out)

    def _edid(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        if f.scanout != 0:
            raise ParameterError(f"scanout {f.scanout} does not exist")
        edid = self.edid + bytes(wire.EDID_SIZE - len(self.edid))
        return wire.Resp.OK_EDID, struct.pack("<II", len(self.edid), 0) + edid

    def _create_2d(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        rid, fmt, width, height = f.resource_id, f.format, f.width, f.height
        if not (0 < width <= MAX_2D_DIMENSION and 0 < height <= MAX_2D_DIMENSION):
            raise ParameterError(f"2D size {width}x{height} out of range")
        self.resources.create(Resource(rid, width * height * _BPP_2D, False, width, height, fmt))
        return wire.Resp.OK_NODATA, b""

    def _unref(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        self.lanes.dirty = True
        res = self.resources.unref(f.resource_id)
        for cid in res.contexts:
            ctx = self.contexts.get(cid)
            if ctx is not None:
                ctx.resources.discard(res.resource_id)
        if self.scanout_resource == res.resource_id:
            self.scanout_resource = 0
        if self.contexts:  # else no batch, fence page or lane can be using it
            self.holds.backing_gone(res.resource_id)
        return wire.Resp.OK_NODATA, b""

    def _set_scanout(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        scanout, rid = f.scanout_id, f.resource_id
        if scanout != 0:
            raise ParameterError(f"scanout {scanout} does not exist")
        if rid:
            self.resources.get(rid)
        self.scanout_resource = rid
        return wire.Resp.OK_NODATA, b""

    def _flush(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        self.resources.get(f.resource_id)  # null scanout: nothing to show, but the id must exist
        self.stats["flushes"] += 1
        return wire.Resp.OK_NODATA, b""

    def _transfer_2d(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        x, y, w, h = f.r_x, f.r_y, f.r_width, f.r_height
        offset, rid = f.offset, f.resource_id
        res = self.resources.get(rid)
        if res.backing is None:
            raise ParameterError(f"resource {rid} has no backing")
        if x + w > res.width or y + h > res.height or offset > res.size:
            raise ParameterError("transfer box outside the resource")
        return wire.Resp.OK_NODATA, b""

    def _attach_backing(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        rid, nr = f.resource_id, f.nr_entries
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

    def _detach_backing(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        res = self.resources.get(f.resource_id)
        if res.backing is None:
            raise ParameterError(f"resource {res.resource_id} has no backing")
        res.backing, res.backing_bytes = None, 0
        self.lanes.dirty = True
        if self.contexts:
            self.holds.backing_gone(res.resource_id)
        return wire.Resp.OK_NODATA, b""

    # -- capsets ----------------------------------------------------------------
    def _capset_info(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        if f.capset_index != 0:
            raise ParameterError(f"capset index {f.capset_index} does not exist")
        return wire.Resp.OK_CAPSET_INFO, struct.pack(
            "<IIII", VGPU_CAPSET_ID, VGPU_CAPSET_VERSION, CAPSET_SIZE, 0
        )

    def _capset(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        if f.capset_id != VGPU_CAPSET_ID or f.capset_version > VGPU_CAPSET_VERSION:
            raise ParameterError(f"capset {f.capset_id} v{f.capset_version} not offered")
        return wire.Resp.OK_CAPSET, capset_payload(self.bound_info)

    # -- contexts and 3D resources ---------------------------------------------------
    def _ctx(self, ctx_id: int) -> Context:
        ctx = self.contexts.get(ctx_id)
        if ctx is None:
            raise ContextError(f"unknown context {ctx_id}")
        return ctx

    def _ctx_create(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        ctx_id, nlen, context_init, raw = f.ctx_id, f.nlen, f.context_init, f.debug_name
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

    def _ctx_destroy(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        self._destroy_context(self._ctx(f.ctx_id))
        return wire.Resp.OK_NODATA, b""

    def _ctx_attach(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        ctx, res = self._ctx(f.ctx_id), self.resources.get(f.resource_id)
        self.lanes.dirty = True
        ctx.resources.add(res.resource_id)
        res.contexts.add(ctx.ctx_id)
        return wire.Resp.OK_NODATA, b""

    def _ctx_detach(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        ctx, res = self._ctx(f.ctx_id), self.resources.get(f.resource_id)
        if res.resource_id not in ctx.resources:
            raise ResourceError(f"resource {res.resource_id} not attached to context {ctx.ctx_id}")
        ctx.resources.discard(res.resource_id)
        res.contexts.discard(ctx.ctx_id)
        self.lanes.dirty = True
        return wire.Resp.OK_NODATA, b""

    def _create_3d(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        rid, target, fmt = f.resource_id, f.target, f.format
        width, height, depth, array_size = f.width, f.height, f.depth, f.array_size
        if target == PIPE_BUFFER:
            size = width
        else:
            size = width * max(height, 1) * max(depth, 1) * max(array_size, 1) * _BPP_2D
        self.resources.create(Resource(rid, size, True, width, height, fmt))
        return wire.Resp.OK_NODATA, b""

    def _transfer_3d(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        # Resources are guest-backed and the remote GPU copies straight into
        # their pages (COPY records), so a transfer moves nothing; it is checked.
        ctx_id, x, w, rid = f.ctx_id, f.box_x, f.box_w, f.resource_id
        res = self.resources.get(rid)
        if ctx_id and ctx_id not in res.contexts:
            raise ResourceError(f"resource {rid} not attached to context {ctx_id}")
        if res.backing is None:
            raise ParameterError(f"resource {rid} has no backing")
        if res.is_3d and res.height <= 1 and x + w > res.size:
            raise ParameterError("transfer box outside the buffer")
        return wire.Resp.OK_NODATA, b""

    def _cursor(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        return wire.Resp.OK_NODATA, b""

    # -- SUBMIT_3D ------------------------------------------------------------------
    def _submit(self, f: Fields, rest: bytes) -> tuple[int, bytes]:
        ctx = self._ctx(f.ctx_id)
        size = f.size
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
                    self.forwarding.dispatch(ctx, fast)
                    return wire.Resp.OK_NODATA, b""
        spans: list[tuple[int, int]] = []
        try:
            records = decode_batch(rest, spans)
        except ProtocolError as exc:
            self.forwarding.reject(ctx, ErrorCode.PROTOCOL, [], str(exc))
            raise ParameterError(f"malformed vGPU batch: {exc}") from exc
        try:
            prepared = prepare(records, self.resources, ctx.resources, self.mem(), rest, spans)
        except VgpuError as exc:
            self.forwarding.reject(ctx, exc.code, records, exc.message, exc.index)
            raise ParameterError(f"vGPU batch refused: {exc}") from exc
        if prepared.fence_page is not None:
            with self.lanes.locked(ctx):
                ctx.fence = FencePage(prepared.fence_page)
            ctx.fence_gpa, ctx.fence_rid = prepared.fence_gpa, prepared.fence_rid
            self.lanes.dirty = True
        self.forwarding.dispatch(ctx, prepared)
        return wire.Resp.OK_NODATA, b""

    Handler = Callable[["CommandHandlers", Fields, bytes], tuple[int, bytes]]
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
_NEW = tuple.__new__
_HDR_PACK = wire.HDR.pack
_PAD3 = b"\0\0\0"
_ECHO_FLAGS = wire.FLAG_FENCE | wire.FLAG_INFO_RING_IDX
_PLAIN_HEAD = {int(r): wire.response(r, 0, 0, 0, 0) for r in wire.Resp}
# Per command: the decoder's parts (a tuple: the hot path unpacks it at once) and the handler.
_DISPATCH: dict[int, tuple[Any, int, Any, Any]] = {
    int(cmd): (dec.unpack_from, dec.size, dec.fields, handler)
    for cmd, handler in CommandHandlers._handlers.items()
    for dec in (wire.DECODERS[int(cmd)],)
}
