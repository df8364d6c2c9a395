"""The guest ABI: what a guest program and the backend agree on beyond the
vGPU batch itself (docs/GUEST_ABI.md; a test checks that page's tables
against this module).

- The capset (DESIGN.md: id 17, cached by the guest kernel after GET_CAPS): a
  QUERY_INFO (``vpcie/protocol/frames.py``) zero-padded to CAPSET_SIZE:
  protocol version, limits, executor kind and the GPU bound when it was read.
- The fence page: a guest buffer the backend writes and the guest polls,
  because a virtio fence only means "accepted". Little-endian::

      header  magic u32 "VFP1", version u16, nslots u16, rejected u32,
              last_reject u32 (ErrorCode of the latest rejected submission)
      slot[nslots] (one per stream)
              completed_seq u64, error_seq u64, error_code u32, failed_index u32

  A SIGNAL(seq) on stream s publishes ``completed_seq = seq`` in slot s once
  the records before it are done; if the batch failed, ``error_seq = seq``,
  ``error_code`` and ``failed_index`` are written first. A submission refused
  before anything runs increments ``rejected`` and sets ``last_reject``.
- Reply slots: each SIGNAL names REPLY_SLOT bytes of a reply buffer where the
  batch's COMPLETION lands; guest_tools keeps REPLY_SLOTS of them.

Both sides import this module: the backend (``vpcie/gpu/capset.py``,
``fencepage.py``) and the guest (``guest_tools/vgpu.py``; the guest image
ships ``vpcie/protocol``). So it imports only ``vpcie.protocol``, the error
vocabulary and the stdlib (+ construct, as every wire definition does).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

import construct as c

from vpcie.errors import ErrorCode, VgpuError
from vpcie.protocol.codes import MAX_STREAMS, ExecutorKind
from vpcie.protocol.fastcodec import FastStruct
from vpcie.protocol.frames import FAST

# ------------------------------------------------------------------ capset
CAPSET_ID = 17
CAPSET_VERSION = 1
CAPSET_SIZE = 256


def capset_payload(info: bytes) -> bytes:
    """The capset bytes: a QUERY_INFO, zero-padded (or cut) to CAPSET_SIZE."""
    if len(info) > CAPSET_SIZE:
        info = info[:CAPSET_SIZE]
    return info + bytes(CAPSET_SIZE - len(info))


def decode_capset(payload: bytes | memoryview) -> tuple[Any, ...]:
    """QUERY_INFO fields from capset bytes (the zero padding is ignored)."""
    values, _end = FAST["QUERY_INFO"].decode(payload, 0)
    return tuple(values)


class VgpuInfo(NamedTuple):
    """The capset (or a QUERY's blob): a QUERY_INFO of the bound GPU, or of none."""

    proto_version: int
    executor: int
    flags: int
    mem_total: int
    mem_free: int
    mem_quota: int
    mem_used: int
    max_inflight: int
    max_batch_bytes: int
    max_streams: int
    sm_count: int
    cc_major: int
    cc_minor: int
    name: str
    uuid: str
    agent: str

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> VgpuInfo:
        return cls(*decode_capset(payload))

    @property
    def executor_kind(self) -> ExecutorKind:
        return ExecutorKind(self.executor)

    def describe(self) -> str:
        kind = self.executor_kind
        if kind is ExecutorKind.NONE:
            return "no GPU bound to this vGPU"
        what = "NOT a GPU (CPU executor)" if kind is ExecutorKind.CPU else "GPU"
        return f"{self.name} [{what}] via agent {self.agent!r}"


# -------------------------------------------------------------- fence page
FENCE_MAGIC = 0x31504656  # b"VFP1"
FENCE_VERSION = 1

FENCE_HEADER = c.Struct(
    "magic" / c.Int32ul,
    "version" / c.Int16ul,
    "nslots" / c.Int16ul,
    "rejected" / c.Int32ul,
    "last_reject" / c.Int32ul,
)
FENCE_SLOT = c.Struct(
    "completed_seq" / c.Int64ul,
    "error_seq" / c.Int64ul,
    "error_code" / c.Int32ul,
    "failed_index" / c.Int32ul,
)
HEADER_ST = FastStruct(FENCE_HEADER).fixed_struct()
SLOT_ST = FastStruct(FENCE_SLOT).fixed_struct()
FENCE_HEADER_SIZE = HEADER_ST.size
FENCE_SLOT_SIZE = SLOT_ST.size
FENCE_SLOTS = MAX_STREAMS  # one slot per stream
FENCE_PAGE_SIZE = FENCE_HEADER_SIZE + FENCE_SLOTS * FENCE_SLOT_SIZE


def fence_slot_offset(stream: int) -> int:
    """Byte offset of ``stream``'s slot (its completed_seq) in the fence page."""
    return FENCE_HEADER_SIZE + stream * FENCE_SLOT_SIZE


# ------------------------------------------------------------- reply slots
REPLY_SLOT = 4096  # bytes of COMPLETION per SIGNAL in flight
REPLY_SLOTS = 16  # reply slots guest_tools keeps (and so batches it waits for)


@dataclass
class Reply:
    """A batch's COMPLETION: status, failing record, results by record index."""

    status: ErrorCode
    failed_index: int
    message: str
    results: dict[int, int]
    blob: bytes

    @property
    def ok(self) -> bool:
        return self.status == ErrorCode.OK

    def check(self) -> Reply:
        if not self.ok:
            raise VgpuError(self.status, f"record {self.failed_index}: {self.message}")
        return self

    def value(self, index: int) -> int:
        return self.results[index]

    def value_f64(self, index: int) -> float:
        return float(struct.unpack("<d", struct.pack("<Q", self.results[index]))[0])


def decode_reply(raw: bytes | memoryview) -> tuple[Any, ...]:
    """(status, failed_index, message, nresults, results, blob) of the COMPLETION
    at the start of ``raw`` (a reply slot); ProtocolError when there is none."""
    values, _end = FAST["COMPLETION"].decode(raw, 0)
    return tuple(values)
