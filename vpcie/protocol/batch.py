"""The vGPU command batch: what a guest puts inside SUBMIT_3D and what the
tunnel carries in a COMMAND frame.

Layout (little-endian)::

    BatchHeader  magic u32 "VGB1", version u16, flags u16, length u32 (whole
                 batch in bytes), count u32 (records)
    Record * count
      RecordHeader  opcode u16, flags u16, length u32 (header + body), stream u32
      body          per opcode, see BODIES

Records are length-prefixed so an unknown opcode is well formed and answered
with NOT_SUPPORTED. Fixed bodies must have exactly their size.

``BATCH`` / ``RECORD`` (construct) are the definitions; ``decode_batch`` and
``encode_batch`` are derived from them via FastStruct and proven equal to them
by differential tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import construct as c

from vpcie.errors import ProtocolError
from vpcie.protocol.codes import (
    BATCH_MAGIC,
    BATCH_VERSION,
    MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS,
    Opcode,
)
from vpcie.protocol.fastcodec import FastStruct

u8, u16, u32, u64 = c.Int8ul, c.Int16ul, c.Int32ul, c.Int64ul
f32, f64 = c.Float32l, c.Float64l

BATCH_HEADER = c.Struct(
    "magic" / u32, "version" / u16, "flags" / u16, "length" / u32, "count" / u32
)
RECORD_HEADER = c.Struct("opcode" / u16, "flags" / u16, "length" / u32, "stream" / u32)

EMPTY = c.Struct()
MEM_ALLOC = c.Struct("size" / u64, "flags" / u32)
MEM_FREE = c.Struct("handle" / u32)
# Copies between device memory and the "host side": in the tunnel the host side
# is the DATA frames of this command (resource 0); inside SUBMIT_3D it is a
# guest resource's backing pages (resource id + offset): that is the DMA.
COPY_HOST = c.Struct(
    "handle" / u32, "resource" / u32, "dev_offset" / u64, "host_offset" / u64, "size" / u64
)
COPY_D2D = c.Struct("dst" / u32, "src" / u32, "dst_offset" / u64, "src_offset" / u64, "size" / u64)
MEMSET = c.Struct("handle" / u32, "value" / u32, "offset" / u64, "size" / u64)
MODULE_LOAD = c.Struct(
    "kind" / u8, "name" / c.PascalString(u8, "utf8"), "code" / c.Prefixed(u32, c.GreedyBytes)
)
MODULE_FREE = c.Struct("handle" / u32)
LAUNCH_ARG = c.Struct("kind" / u8, "handle" / u32, "value" / u64)
LAUNCH = c.Struct(
    "module" / u32,
    "grid_x" / u32, "grid_y" / u32, "grid_z" / u32,
    "block_x" / u32, "block_y" / u32, "block_z" / u32,
    "shared_mem" / u32,
    "kernel" / c.PascalString(u8, "utf8"),
    "nargs" / u16,
    "args" / c.Array(c.this.nargs, LAUNCH_ARG),
)  # fmt: skip
# Row-major C[m,n] = alpha * op(A)[m,k] @ op(B)[k,n] + beta * C.
GEMM = c.Struct(
    "dtype" / u8, "trans_a" / u8, "trans_b" / u8,
    "m" / u32, "n" / u32, "k" / u32,
    "alpha" / f32, "beta" / f32,
    "a" / u32, "b" / u32, "c" / u32,
    "a_offset" / u64, "b_offset" / u64, "c_offset" / u64,
)  # fmt: skip
AXPY = c.Struct(  # y = alpha * x + y
    "dtype" / u8, "x" / u32, "y" / u32, "alpha" / f64, "n" / u64, "x_offset" / u64, "y_offset" / u64
)
REDUCE_SUM = c.Struct(  # out[0] = sum(x[:n]) in dtype; also returned as the record's value
    "dtype" / u8, "x" / u32, "out" / u32, "n" / u64, "x_offset" / u64, "out_offset" / u64
)
EVENT = c.Struct("event" / u32)
FENCE_PAGE_SET = c.Struct("resource" / u32, "offset" / u64)
# When the batch's earlier records are done: write the COMPLETION payload
# (frames.COMPLETION) into ``size`` bytes of guest resource ``resource`` at
# ``offset`` (resource 0: no reply), then publish ``seq`` in the fence page slot
# of the record's stream.
SIGNAL = c.Struct("seq" / u64, "resource" / u32, "offset" / u64, "size" / u32)

# Live migration (codes.MIGRATION_OPCODES; backend -> agent only).
# ALLOC_AT / MODULE_LOAD_AT create exactly ``handle`` (this session's epoch,
# index nonzero, not live); SESSION_RESTORE sets the next handle index and
# marks the events of the bitmap (frames.STATE_SUMMARY's) recorded.
HANDLE = c.Struct("handle" / u32)
ALLOC_AT = c.Struct("handle" / u32, "size" / u64, "flags" / u32)
MODULE_LOAD_AT = c.Struct("handle" / u32, *MODULE_LOAD.subcons)
SESSION_RESTORE = c.Struct("next_index" / u32, "events_set" / c.Prefixed(u16, c.GreedyBytes))

BODIES: dict[Opcode, c.Struct] = {
    Opcode.NOP: EMPTY,
    Opcode.QUERY: EMPTY,
    Opcode.MEM_ALLOC: MEM_ALLOC,
    Opcode.MEM_FREE: MEM_FREE,
    Opcode.COPY_H2D: COPY_HOST,
    Opcode.COPY_D2H: COPY_HOST,
    Opcode.COPY_D2D: COPY_D2D,
    Opcode.MEMSET: MEMSET,
    Opcode.MODULE_LOAD: MODULE_LOAD,
    Opcode.MODULE_FREE: MODULE_FREE,
    Opcode.LAUNCH: LAUNCH,
    Opcode.GEMM: GEMM,
    Opcode.AXPY: AXPY,
    Opcode.REDUCE_SUM: REDUCE_SUM,
    Opcode.EVENT_RECORD: EVENT,
    Opcode.EVENT_WAIT: EVENT,
    Opcode.SYNC: EMPTY,
    Opcode.STATE_EXPORT: EMPTY,
    Opcode.ALLOC_AT: ALLOC_AT,
    Opcode.MODULE_LOAD_AT: MODULE_LOAD_AT,
    Opcode.SESSION_RESTORE: SESSION_RESTORE,
    Opcode.MODULE_EXPORT: HANDLE,
    Opcode.FENCE_PAGE_SET: FENCE_PAGE_SET,
    Opcode.SIGNAL: SIGNAL,
}

RECORD = c.Struct(
    "opcode" / u16,
    "flags" / u16,
    "length" / u32,
    "stream" / u32,
    c.Check(c.this.length >= RECORD_HEADER.sizeof()),
    "body"
    / c.FixedSized(
        c.this.length - RECORD_HEADER.sizeof(),
        c.Switch(
            c.this.opcode,
            {int(op): c.Struct(*body.subcons, c.Terminated) for op, body in BODIES.items()},
            default=c.GreedyBytes,
        ),
    ),
)

BATCH = c.Struct(
    "magic" / c.Const(BATCH_MAGIC, u32),
    "version" / c.Const(BATCH_VERSION, u16),
    "flags" / u16,
    "length" / u32,
    "count" / u32,
    c.Check(c.this.length <= MAX_BATCH_BYTES),
    c.Check(c.this.count <= MAX_BATCH_RECORDS),
    "records"
    / c.FixedSized(
        c.this.length - BATCH_HEADER.sizeof(),
        c.Struct("items" / c.Array(c.this._.count, RECORD), c.Terminated),
    ),
)


class Record(NamedTuple):
    """One decoded record. ``body`` is a tuple in the order of BODIES[opcode]
    (see ``fields``), or raw bytes for an unknown opcode."""

    opcode: int
    flags: int
    stream: int
    body: tuple[Any, ...] | bytes

    def field(self, name: str) -> Any:
        """Body field by name (slow path; executors index ``body`` directly)."""
        fast = FAST_BODIES[Opcode(self.opcode)]
        assert isinstance(self.body, tuple)
        return self.body[fast.names.index(name)]


_new_tuple = tuple.__new__  # Record(...) without NamedTuple's keyword handling (hot path)
FAST_BODIES: dict[Opcode, FastStruct] = {op: FastStruct(body) for op, body in BODIES.items()}
_FAST_BY_INT: dict[int, FastStruct] = {int(op): fs for op, fs in FAST_BODIES.items()}
_BATCH_HDR = FastStruct(BATCH_HEADER)
_RECORD_HDR = FastStruct(RECORD_HEADER)
_HDR_ST = _BATCH_HDR.fixed_struct()
_REC_ST = _RECORD_HDR.fixed_struct()
BATCH_HEADER_SIZE = _HDR_ST.size
RECORD_HEADER_SIZE = _REC_ST.size


def fields(opcode: Opcode) -> tuple[str, ...]:
    """Names of a body's fields, in wire order."""
    return FAST_BODIES[opcode].names


def decode_batch(
    data: bytes | bytearray | memoryview, spans: list[tuple[int, int]] | None = None
) -> list[Record]:
    """Parse a batch; ProtocolError on anything malformed (never another error).

    ``spans``, if given, gets each record's (start, end) in ``data``, so a
    caller can forward records unchanged without encoding them again."""
    n = len(data)
    if n < BATCH_HEADER_SIZE:
        raise ProtocolError(f"batch truncated: {n} bytes < header {BATCH_HEADER_SIZE}")
    magic, version, _flags, length, count = _HDR_ST.unpack_from(data, 0)
    if magic != BATCH_MAGIC:
        raise ProtocolError(f"batch magic {magic:#x} != {BATCH_MAGIC:#x}")
    if version != BATCH_VERSION:
        raise ProtocolError(f"batch version {version} not supported")
    if length > MAX_BATCH_BYTES:
        raise ProtocolError(f"batch length {length} over cap {MAX_BATCH_BYTES}")
    if count > MAX_BATCH_RECORDS:
        raise ProtocolError(f"batch count {count} over cap {MAX_BATCH_RECORDS}")
    if length < BATCH_HEADER_SIZE or length > n:
        raise ProtocolError(f"batch length {length} does not fit {n} bytes")
    pos = BATCH_HEADER_SIZE
    out: list[Record] = []
    unpack_rec = _REC_ST.unpack_from
    for i in range(count):
        if pos + RECORD_HEADER_SIZE > length:
            raise ProtocolError(f"record {i}: header truncated")
        opcode, rflags, rlen, stream = unpack_rec(data, pos)
        if rlen < RECORD_HEADER_SIZE or pos + rlen > length:
            raise ProtocolError(f"record {i}: length {rlen} out of range")
        body_start = pos + RECORD_HEADER_SIZE
        end = pos + rlen
        fast = _FAST_BY_INT.get(opcode)
        if fast is None:
            body: tuple[Any, ...] | bytes = bytes(data[body_start:end])
        elif fast.fixed_size == 0:  # NOP, QUERY, SYNC: nothing to decode
            if end != body_start:
                raise ProtocolError(f"record {i}: {end - body_start} trailing bytes in body")
            body = ()
        else:
            body, used = fast.decode(memoryview(data)[:end], body_start)
            if used != end:
                raise ProtocolError(f"record {i}: {end - used} trailing bytes in body")
        out.append(_new_tuple(Record, (opcode, rflags, stream, body)))
        if spans is not None:
            spans.append((pos, end))
        pos = end
    if pos != length:
        raise ProtocolError(f"batch has {length - pos} trailing bytes")
    return out


def encode_record(
    opcode: int, body: Sequence[Any] | bytes = (), *, stream: int = 0, flags: int = 0
) -> bytes:
    fast = _FAST_BY_INT.get(opcode)
    if fast is None:
        if not isinstance(body, bytes | bytearray):
            raise ProtocolError(f"unknown opcode {opcode} needs a raw body")
        raw = bytes(body)
    else:
        raw = fast.encode(body)
    return _REC_ST.pack(opcode, flags, RECORD_HEADER_SIZE + len(raw), stream) + raw


def encode_batch(records: Iterable[Record | bytes], *, flags: int = 0) -> bytes:
    """Build a batch from Records (or already-encoded records)."""
    parts = [
        r
        if isinstance(r, bytes)
        else encode_record(r.opcode, r.body, stream=r.stream, flags=r.flags)
        for r in records
    ]
    length = BATCH_HEADER_SIZE + sum(len(p) for p in parts)
    if length > MAX_BATCH_BYTES or len(parts) > MAX_BATCH_RECORDS:
        raise ProtocolError(f"batch of {len(parts)} records, {length} bytes is over the caps")
    return _HDR_ST.pack(BATCH_MAGIC, BATCH_VERSION, flags, length, len(parts)) + b"".join(parts)


def rec(opcode: Opcode, *body: Any, stream: int = 0, flags: int = 0) -> Record:
    """Convenience: ``rec(Opcode.MEM_ALLOC, size, 0)``."""
    return Record(int(opcode), flags, stream, tuple(body))
