"""virtio-gpu control and cursor queue messages (virtio 1.2 §5.7.6).

construct definitions are the source of truth; the device model decodes with
the structs FastStruct derives from them (vpcie/protocol/fastcodec.py) into
named tuples named after their fields (``DECODERS``).
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable
from enum import IntEnum
from typing import Any

import construct as c

from vpcie.protocol.fastcodec import FastStruct

u8, u32, u64 = c.Int8ul, c.Int32ul, c.Int64ul


class Cmd(IntEnum):
    """virtio 1.2 §5.7.6.7: enum virtio_gpu_ctrl_type."""

    GET_DISPLAY_INFO = 0x0100
    RESOURCE_CREATE_2D = 0x0101
    RESOURCE_UNREF = 0x0102
    SET_SCANOUT = 0x0103
    RESOURCE_FLUSH = 0x0104
    TRANSFER_TO_HOST_2D = 0x0105
    RESOURCE_ATTACH_BACKING = 0x0106
    RESOURCE_DETACH_BACKING = 0x0107
    GET_CAPSET_INFO = 0x0108
    GET_CAPSET = 0x0109
    GET_EDID = 0x010A
    RESOURCE_ASSIGN_UUID = 0x010B
    RESOURCE_CREATE_BLOB = 0x010C
    SET_SCANOUT_BLOB = 0x010D
    CTX_CREATE = 0x0200
    CTX_DESTROY = 0x0201
    CTX_ATTACH_RESOURCE = 0x0202
    CTX_DETACH_RESOURCE = 0x0203
    RESOURCE_CREATE_3D = 0x0204
    TRANSFER_TO_HOST_3D = 0x0205
    TRANSFER_FROM_HOST_3D = 0x0206
    SUBMIT_3D = 0x0207
    RESOURCE_MAP_BLOB = 0x0208
    RESOURCE_UNMAP_BLOB = 0x0209
    UPDATE_CURSOR = 0x0300
    MOVE_CURSOR = 0x0301


class Resp(IntEnum):
    OK_NODATA = 0x1100
    OK_DISPLAY_INFO = 0x1101
    OK_CAPSET_INFO = 0x1102
    OK_CAPSET = 0x1103
    OK_EDID = 0x1104
    ERR_UNSPEC = 0x1200
    ERR_OUT_OF_MEMORY = 0x1201
    ERR_INVALID_SCANOUT_ID = 0x1202
    ERR_INVALID_RESOURCE_ID = 0x1203
    ERR_INVALID_CONTEXT_ID = 0x1204
    ERR_INVALID_PARAMETER = 0x1205


FLAG_FENCE = 1
FLAG_INFO_RING_IDX = 2
MAX_SCANOUTS = 16
EDID_SIZE = 1024

CTRL_HDR = c.Struct(
    "type" / u32, "flags" / u32, "fence_id" / u64, "ctx_id" / u32, "ring_idx" / u8,
    "pad" / c.Bytes(3),
)  # fmt: skip
RECT = ("x", "y", "width", "height")


def _with_hdr(*fields: c.Construct) -> c.Struct:
    return c.Struct(*CTRL_HDR.subcons, *fields)


def _rect(prefix: str = "r_") -> list[c.Construct]:
    return [(prefix + n) / u32 for n in RECT]


RESOURCE_CREATE_2D = _with_hdr("resource_id" / u32, "format" / u32, "width" / u32, "height" / u32)
RESOURCE_ID = _with_hdr("resource_id" / u32, "padding" / u32)  # UNREF, DETACH, CTX_ATTACH/DETACH
SET_SCANOUT = _with_hdr(*_rect(), "scanout_id" / u32, "resource_id" / u32)
RESOURCE_FLUSH = _with_hdr(*_rect(), "resource_id" / u32, "padding" / u32)
TRANSFER_TO_HOST_2D = _with_hdr(*_rect(), "offset" / u64, "resource_id" / u32, "padding" / u32)
ATTACH_BACKING = _with_hdr("resource_id" / u32, "nr_entries" / u32)
MEM_ENTRY = c.Struct("addr" / u64, "length" / u32, "padding" / u32)
GET_CAPSET_INFO = _with_hdr("capset_index" / u32, "padding" / u32)
RESP_CAPSET_INFO = _with_hdr(
    "capset_id" / u32, "capset_max_version" / u32, "capset_max_size" / u32, "padding" / u32
)
GET_CAPSET = _with_hdr("capset_id" / u32, "capset_version" / u32)
GET_EDID = _with_hdr("scanout" / u32, "padding" / u32)
RESP_EDID = _with_hdr("size" / u32, "padding" / u32, "edid" / c.Bytes(EDID_SIZE))
CTX_CREATE = _with_hdr("nlen" / u32, "context_init" / u32, "debug_name" / c.Bytes(64))
CTX_DESTROY = CTRL_HDR
# The spec's ``flags`` field is ``create_flags`` here: every name in a
# definition must be unique (the device reads fields by name, and construct
# would let it shadow the header's ``flags``). The bytes are the spec's.
RESOURCE_CREATE_3D = _with_hdr(
    "resource_id" / u32, "target" / u32, "format" / u32, "bind" / u32,
    "width" / u32, "height" / u32, "depth" / u32, "array_size" / u32,
    "last_level" / u32, "nr_samples" / u32, "create_flags" / u32, "padding" / u32,
)  # fmt: skip
TRANSFER_HOST_3D = _with_hdr(
    "box_x" / u32, "box_y" / u32, "box_z" / u32, "box_w" / u32, "box_h" / u32, "box_d" / u32,
    "offset" / u64, "resource_id" / u32, "level" / u32, "stride" / u32, "layer_stride" / u32,
)  # fmt: skip
SUBMIT_3D = _with_hdr("size" / u32, "num_in_fences" / u32)
DISPLAY_ONE = c.Struct(*_rect(""), "enabled" / u32, "flags" / u32)
UPDATE_CURSOR = _with_hdr(
    "scanout_id" / u32, "x" / u32, "y" / u32, "pos_padding" / u32,
    "resource_id" / u32, "hot_x" / u32, "hot_y" / u32, "padding" / u32,
)  # fmt: skip

REQUESTS: dict[Cmd, c.Struct] = {
    Cmd.GET_DISPLAY_INFO: CTRL_HDR,
    Cmd.RESOURCE_CREATE_2D: RESOURCE_CREATE_2D,
    Cmd.RESOURCE_UNREF: RESOURCE_ID,
    Cmd.SET_SCANOUT: SET_SCANOUT,
    Cmd.RESOURCE_FLUSH: RESOURCE_FLUSH,
    Cmd.TRANSFER_TO_HOST_2D: TRANSFER_TO_HOST_2D,
    Cmd.RESOURCE_ATTACH_BACKING: ATTACH_BACKING,
    Cmd.RESOURCE_DETACH_BACKING: RESOURCE_ID,
    Cmd.GET_CAPSET_INFO: GET_CAPSET_INFO,
    Cmd.GET_CAPSET: GET_CAPSET,
    Cmd.GET_EDID: GET_EDID,
    Cmd.CTX_CREATE: CTX_CREATE,
    Cmd.CTX_DESTROY: CTX_DESTROY,
    Cmd.CTX_ATTACH_RESOURCE: RESOURCE_ID,
    Cmd.CTX_DETACH_RESOURCE: RESOURCE_ID,
    Cmd.RESOURCE_CREATE_3D: RESOURCE_CREATE_3D,
    Cmd.TRANSFER_TO_HOST_3D: TRANSFER_HOST_3D,
    Cmd.TRANSFER_FROM_HOST_3D: TRANSFER_HOST_3D,
    Cmd.SUBMIT_3D: SUBMIT_3D,
    Cmd.UPDATE_CURSOR: UPDATE_CURSOR,
    Cmd.MOVE_CURSOR: UPDATE_CURSOR,
}
# A decoded request, its fields by name (``f.resource_id``): a namedtuple per
# command, named after the fields of its construct definition above. mypy
# sees ``Any``: the names exist only once, in the definitions.
Fields = Any


class RequestDecoder:
    """How the device decodes one command: the definition's one struct (all
    requests are fixed-size) unpacked straight into its named tuple."""

    __slots__ = ("fields", "size", "unpack_from")

    def __init__(self, cmd: Cmd, definition: c.Struct) -> None:
        st = FastStruct(definition).fixed_struct()
        self.unpack_from: Callable[..., tuple[Any, ...]] = st.unpack_from
        self.size = st.size
        name = "".join(w.title() for w in cmd.name.split("_"))
        self.fields: type[tuple[Any, ...]] = namedtuple(  # type: ignore[misc]
            name, [sub.name for sub in definition.subcons]
        )

    def decode(self, buf: bytes) -> Fields:
        """The request's fields (``buf`` holds at least ``size`` bytes)."""
        return tuple.__new__(self.fields, self.unpack_from(buf, 0))


DECODERS: dict[int, RequestDecoder] = {int(k): RequestDecoder(k, v) for k, v in REQUESTS.items()}
HDR = FastStruct(CTRL_HDR).fixed_struct()
HDR_SIZE = HDR.size
MEM_ENTRY_ST = FastStruct(MEM_ENTRY).fixed_struct()
RESP_CAPSET_INFO_ST = FastStruct(RESP_CAPSET_INFO).fixed_struct()
RESP_EDID_ST = FastStruct(RESP_EDID).fixed_struct()
DISPLAY_ONE_ST = FastStruct(DISPLAY_ONE).fixed_struct()


def response(rtype: int, req_flags: int, fence_id: int, ctx_id: int, ring_idx: int) -> bytes:
    """A bare response header; echoes the fence (virtio 1.2 §5.7.6.8: a
    response to a fenced request carries FLAG_FENCE and the same fence_id)."""
    flags = req_flags & (FLAG_FENCE | FLAG_INFO_RING_IDX)
    if flags & FLAG_FENCE:
        return HDR.pack(rtype, flags, fence_id, ctx_id, ring_idx, b"\0\0\0")
    return HDR.pack(rtype, 0, 0, 0, 0, b"\0\0\0")
