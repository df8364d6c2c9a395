"""Wire formats of vhost-user messages: construct is the single definition.

vhost-user.rst "Message types" / "Front-end message types". Every payload kind
has one construct definition; typed dataclasses are what the rest of vpcie
sees. The control path is not hot, so construct alone parses and builds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import construct as cs

from vpcie.errors import ProtocolError
from vpcie.vhost_user.constants import (
    MAX_CONFIG_SIZE,
    MAX_MEM_REGIONS,
    VRING_INDEX_MASK,
    VRING_NOFD_MASK,
    Request,
)

# vhost-user.rst "Header"
HEADER = cs.Struct("request" / cs.Int32ul, "flags" / cs.Int32ul, "size" / cs.Int32ul)

U64 = cs.Struct("u64" / cs.Int64ul, cs.Terminated)

# "A vring state description"
VRING_STATE = cs.Struct("index" / cs.Int32ul, "num" / cs.Int32ul, cs.Terminated)

# "A vring address description"
VRING_ADDR = cs.Struct(
    "index" / cs.Int32ul,
    "flags" / cs.Int32ul,
    "descriptor" / cs.Int64ul,
    "used" / cs.Int64ul,
    "available" / cs.Int64ul,
    "log" / cs.Int64ul,
    cs.Terminated,
)

# "Memory region description"
MEMORY_REGION = cs.Struct(
    "guest_address" / cs.Int64ul,
    "size" / cs.Int64ul,
    "user_address" / cs.Int64ul,
    "mmap_offset" / cs.Int64ul,
)

# "Multiple Memory regions description": exactly nregions entries follow.
MEMORY_TABLE = cs.Struct(
    "nregions" / cs.Int32ul,
    cs.Check(cs.this.nregions <= MAX_MEM_REGIONS),
    "padding" / cs.Int32ul,
    "regions" / cs.Array(cs.this.nregions, MEMORY_REGION),
    cs.Terminated,
)

# "Single memory region description" (ADD_MEM_REG / REM_MEM_REG)
SINGLE_MEMORY_REGION = cs.Struct("padding" / cs.Int64ul, "region" / MEMORY_REGION, cs.Terminated)

# "Log description" (SET_LOG_BASE)
LOG_DESCRIPTION = cs.Struct("mmap_size" / cs.Int64ul, "mmap_offset" / cs.Int64ul, cs.Terminated)

# "Device config space": offset, size, flags, then size bytes.
CONFIG_SPACE = cs.Struct(
    "offset" / cs.Int32ul,
    "size" / cs.Int32ul,
    cs.Check(cs.this.size <= MAX_CONFIG_SIZE),
    "flags" / cs.Int32ul,
    "payload" / cs.Bytes(cs.this.size),
    cs.Terminated,
)


class PayloadKind(Enum):
    """Which payload format a message carries."""

    NONE = "none"
    U64 = "u64"
    VRING_STATE = "vring_state"
    VRING_ADDR = "vring_addr"
    VRING_FILE = "vring_file"
    MEM_TABLE = "mem_table"
    MEM_REG = "mem_reg"
    LOG = "log"
    CONFIG = "config"
    RAW = "raw"


_K = PayloadKind
# Payload of each front-end request (vhost-user.rst "Front-end message types").
REQUEST_PAYLOAD: dict[Request, PayloadKind] = {
    Request.GET_FEATURES: _K.NONE,
    Request.SET_FEATURES: _K.U64,
    Request.SET_OWNER: _K.NONE,
    Request.RESET_OWNER: _K.NONE,
    Request.SET_MEM_TABLE: _K.MEM_TABLE,
    Request.SET_LOG_BASE: _K.LOG,
    Request.SET_LOG_FD: _K.NONE,
    Request.SET_VRING_NUM: _K.VRING_STATE,
    Request.SET_VRING_ADDR: _K.VRING_ADDR,
    Request.SET_VRING_BASE: _K.VRING_STATE,
    Request.GET_VRING_BASE: _K.VRING_STATE,
    Request.SET_VRING_KICK: _K.VRING_FILE,
    Request.SET_VRING_CALL: _K.VRING_FILE,
    Request.SET_VRING_ERR: _K.VRING_FILE,
    Request.GET_PROTOCOL_FEATURES: _K.NONE,
    Request.SET_PROTOCOL_FEATURES: _K.U64,
    Request.GET_QUEUE_NUM: _K.NONE,
    Request.SET_VRING_ENABLE: _K.VRING_STATE,
    Request.SET_VRING_ENDIAN: _K.VRING_STATE,
    Request.GET_CONFIG: _K.CONFIG,
    Request.SET_CONFIG: _K.CONFIG,
    Request.GPU_SET_SOCKET: _K.NONE,
    Request.RESET_DEVICE: _K.NONE,
    Request.VRING_KICK: _K.VRING_STATE,
    Request.GET_MAX_MEM_SLOTS: _K.NONE,
    Request.ADD_MEM_REG: _K.MEM_REG,
    Request.REM_MEM_REG: _K.MEM_REG,
    Request.SET_STATUS: _K.U64,
    Request.GET_STATUS: _K.NONE,
}

# Payload of the back-end's reply where the request defines one; any other
# reply is the REPLY_ACK u64 (vhost-user.rst "REPLY_ACK").
REPLY_PAYLOAD: dict[Request, PayloadKind] = {
    Request.GET_FEATURES: _K.U64,
    Request.GET_PROTOCOL_FEATURES: _K.U64,
    Request.GET_QUEUE_NUM: _K.U64,
    Request.GET_MAX_MEM_SLOTS: _K.U64,
    Request.GET_STATUS: _K.U64,
    Request.SET_LOG_BASE: _K.U64,
    Request.GET_VRING_BASE: _K.VRING_STATE,
    Request.GET_CONFIG: _K.CONFIG,
}


@dataclass(frozen=True)
class VringState:
    index: int
    num: int


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    descriptor: int
    used: int
    available: int
    log: int


@dataclass(frozen=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR: ring index and "no fd follows" (polling) bit."""

    index: int
    nofd: bool


@dataclass(frozen=True)
class MemRegion:
    guest_address: int
    size: int
    user_address: int
    mmap_offset: int


@dataclass(frozen=True)
class MemTable:
    regions: tuple[MemRegion, ...]
    padding: int = 0


@dataclass(frozen=True)
class SingleMemRegion:
    region: MemRegion
    padding: int = 0


@dataclass(frozen=True)
class LogDescription:
    mmap_size: int
    mmap_offset: int


@dataclass(frozen=True)
class ConfigSpace:
    offset: int
    size: int
    flags: int
    payload: bytes


Payload = (
    None
    | int
    | VringState
    | VringAddr
    | VringFile
    | MemTable
    | SingleMemRegion
    | LogDescription
    | ConfigSpace
    | bytes
)


@dataclass(frozen=True)
class Message:
    """One vhost-user message; ``fds`` arrived with it (SCM_RIGHTS)."""

    request: int
    flags: int
    payload: Payload = None
    fds: tuple[int, ...] = field(default=(), compare=False)

    @property
    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"UNKNOWN_{self.request}"


def payload_kind(request: int, reply: bool) -> PayloadKind:
    """The payload format of ``request`` (or of its reply)."""
    try:
        req = Request(request)
    except ValueError:
        # Unknown requests: opaque bytes; our answer to one is a failure ack.
        return _K.U64 if reply else _K.RAW
    if reply:
        return REPLY_PAYLOAD.get(req, _K.U64)
    return REQUEST_PAYLOAD.get(req, _K.RAW)


def _region(c: Any) -> MemRegion:
    return MemRegion(int(c.guest_address), int(c.size), int(c.user_address), int(c.mmap_offset))


def _region_dict(r: MemRegion) -> dict[str, int]:
    return {
        "guest_address": r.guest_address,
        "size": r.size,
        "user_address": r.user_address,
        "mmap_offset": r.mmap_offset,
    }


def parse_payload(kind: PayloadKind, data: bytes) -> Payload:
    """Parse one payload of ``kind``; any malformation is a ProtocolError."""
    try:
        if kind is _K.NONE:
            if data:
                raise ProtocolError(f"unexpected {len(data)}-byte payload")
            return None
        if kind is _K.RAW:
            return bytes(data)
        if kind is _K.U64:
            return int(U64.parse(data).u64)
        if kind is _K.VRING_FILE:
            value = int(U64.parse(data).u64)
            if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
                raise ProtocolError(f"vring file u64 {value:#x} has reserved bits set")
            return VringFile(value & VRING_INDEX_MASK, bool(value & VRING_NOFD_MASK))
        if kind is _K.VRING_STATE:
            c = VRING_STATE.parse(data)
            return VringState(int(c.index), int(c.num))
        if kind is _K.VRING_ADDR:
            c = VRING_ADDR.parse(data)
            return VringAddr(
                int(c.index),
                int(c.flags),
                int(c.descriptor),
                int(c.used),
                int(c.available),
                int(c.log),
            )
        if kind is _K.MEM_TABLE:
            if len(data) < 4:
                raise ProtocolError("memory table shorter than its count")
            c = MEMORY_TABLE.parse(data)
            return MemTable(tuple(_region(r) for r in c.regions), int(c.padding))
        if kind is _K.MEM_REG:
            c = SINGLE_MEMORY_REGION.parse(data)
            return SingleMemRegion(_region(c.region), int(c.padding))
        if kind is _K.LOG:
            c = LOG_DESCRIPTION.parse(data)
            return LogDescription(int(c.mmap_size), int(c.mmap_offset))
        if kind is _K.CONFIG:
            c = CONFIG_SPACE.parse(data)
            return ConfigSpace(int(c.offset), int(c.size), int(c.flags), bytes(c.payload))
    except cs.ConstructError as exc:
        raise ProtocolError(f"malformed {kind.value} payload ({len(data)} bytes): {exc}") from None
    raise AssertionError(kind)  # pragma: no cover - every kind is handled above


def build_payload(kind: PayloadKind, payload: Payload) -> bytes:
    """Build the bytes of ``payload`` as ``kind`` (the inverse of parse_payload)."""
    if kind is _K.NONE:
        if payload is not None:
            raise ValueError("payload given for a message without one")
        return b""
    if kind is _K.RAW:
        assert isinstance(payload, bytes)
        return payload
    if kind is _K.U64:
        assert isinstance(payload, int)
        return bytes(U64.build({"u64": payload}))
    if kind is _K.VRING_FILE:
        assert isinstance(payload, VringFile)
        value = payload.index | (VRING_NOFD_MASK if payload.nofd else 0)
        return bytes(U64.build({"u64": value}))
    if kind is _K.VRING_STATE:
        assert isinstance(payload, VringState)
        return bytes(VRING_STATE.build({"index": payload.index, "num": payload.num}))
    if kind is _K.VRING_ADDR:
        assert isinstance(payload, VringAddr)
        return bytes(VRING_ADDR.build(payload.__dict__))
    if kind is _K.MEM_TABLE:
        assert isinstance(payload, MemTable)
        return bytes(
            MEMORY_TABLE.build(
                {
                    "nregions": len(payload.regions),
                    "padding": payload.padding,
                    "regions": [_region_dict(r) for r in payload.regions],
                }
            )
        )
    if kind is _K.MEM_REG:
        assert isinstance(payload, SingleMemRegion)
        return bytes(
            SINGLE_MEMORY_REGION.build(
                {"padding": payload.padding, "region": _region_dict(payload.region)}
            )
        )
    if kind is _K.LOG:
        assert isinstance(payload, LogDescription)
        return bytes(LOG_DESCRIPTION.build(payload.__dict__))
    if kind is _K.CONFIG:
        assert isinstance(payload, ConfigSpace)
        return bytes(CONFIG_SPACE.build(payload.__dict__))
    raise AssertionError(kind)  # pragma: no cover
