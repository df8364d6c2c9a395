"""Record builders for the convenience calls, and the copy-stream scan.

TunnelClient's one-record calls (alloc, memset, gemm, ...) are these builders
sent: they take the builder's parameters, so a field is added here only.

The scan finds how many bytes a batch's resource-0 COPY_H2D / COPY_D2H
records move through the tunnel (docs/PROTOCOL.md "Copies in the tunnel"),
so the client can check the caller's scatter lists before anything is sent.
Field positions come from the construct definitions (batch.fields), never
written twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from vpcie.errors import ErrorCode, ProtocolError, VgpuError
from vpcie.protocol.batch import (
    BATCH_HEADER_SIZE,
    FAST_BODIES,
    RECORD_HEADER_SIZE,
    Record,
    decode_batch,
    fields,
    rec,
)
from vpcie.protocol.codes import DType, Opcode

_COPY_FIELDS = fields(Opcode.COPY_H2D)
_RESOURCE = _COPY_FIELDS.index("resource")
_SIZE = _COPY_FIELDS.index("size")
_COPY_ST = FAST_BODIES[Opcode.COPY_H2D].fixed_struct()
_H2D, _D2H = int(Opcode.COPY_H2D), int(Opcode.COPY_D2H)


def copy_stream_sizes(batch: bytes | Sequence[Record]) -> tuple[int, int]:
    """(H2D bytes, D2H bytes) the batch moves through the tunnel.

    A bytes batch is decoded (VgpuError INVALID_ARGUMENT when malformed: the
    agent would only answer with a protocol error and close the session).
    """
    if isinstance(batch, bytes | bytearray | memoryview):
        try:
            records: Sequence[Record] = decode_batch(batch)
        except ProtocolError as exc:
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"malformed batch: {exc}") from exc
    else:
        records = batch
    h2d = d2h = 0
    for r in records:
        if r.opcode == _H2D or r.opcode == _D2H:
            body = r.body
            if not isinstance(body, tuple) or len(body) != len(_COPY_FIELDS):
                raise VgpuError(ErrorCode.INVALID_ARGUMENT, "copy record with a bad body")
            if body[_RESOURCE] == 0:
                if r.opcode == _H2D:
                    h2d += body[_SIZE]
                else:
                    d2h += body[_SIZE]
    return h2d, d2h


def single_record_batch_size(body_size: int) -> int:
    return BATCH_HEADER_SIZE + RECORD_HEADER_SIZE + body_size


# -- builders (body fields in the order of vpcie/protocol/batch.py) -----------
def nop(stream: int = 0) -> Record:
    return rec(Opcode.NOP, stream=stream)


def query() -> Record:
    return rec(Opcode.QUERY)


def mem_alloc(size: int, flags: int = 0) -> Record:
    """Device memory of ``size`` bytes; its handle is the record's result."""
    return rec(Opcode.MEM_ALLOC, size, flags)


def mem_free(handle: int) -> Record:
    return rec(Opcode.MEM_FREE, handle)


def copy_h2d(
    handle: int, dev_offset: int, size: int, *, host_offset: int = 0, stream: int = 0
) -> Record:
    """A tunnel copy (resource 0): the bytes come from the command's DATA frames."""
    return rec(Opcode.COPY_H2D, handle, 0, dev_offset, host_offset, size, stream=stream)


def copy_d2h(
    handle: int, dev_offset: int, size: int, *, host_offset: int = 0, stream: int = 0
) -> Record:
    return rec(Opcode.COPY_D2H, handle, 0, dev_offset, host_offset, size, stream=stream)


def copy_d2d(
    dst: int, src: int, size: int, *, dst_offset: int = 0, src_offset: int = 0, stream: int = 0
) -> Record:
    return rec(Opcode.COPY_D2D, dst, src, dst_offset, src_offset, size, stream=stream)


def memset(handle: int, value: int, offset: int, size: int, *, stream: int = 0) -> Record:
    return rec(Opcode.MEMSET, handle, value, offset, size, stream=stream)


def gemm(
    a: int,
    b: int,
    c: int,
    m: int,
    n: int,
    k: int,
    *,
    alpha: float = 1.0,
    beta: float = 0.0,
    dtype: DType = DType.F32,
    trans_a: bool = False,
    trans_b: bool = False,
    a_offset: int = 0,
    b_offset: int = 0,
    c_offset: int = 0,
    stream: int = 0,
) -> Record:
    """Row-major C[m,n] = alpha * op(A) @ op(B) + beta * C."""
    return rec(
        Opcode.GEMM,
        int(dtype), int(trans_a), int(trans_b),
        m, n, k, alpha, beta, a, b, c, a_offset, b_offset, c_offset,
        stream=stream,
    )  # fmt: skip


def axpy(
    x: int,
    y: int,
    alpha: float,
    n: int,
    *,
    dtype: DType = DType.F32,
    x_offset: int = 0,
    y_offset: int = 0,
    stream: int = 0,
) -> Record:
    """y = alpha * x + y over n elements."""
    return rec(Opcode.AXPY, int(dtype), x, y, alpha, n, x_offset, y_offset, stream=stream)


def reduce_sum(
    x: int,
    out: int,
    n: int,
    *,
    dtype: DType = DType.F32,
    x_offset: int = 0,
    out_offset: int = 0,
    stream: int = 0,
) -> Record:
    return rec(Opcode.REDUCE_SUM, int(dtype), x, out, n, x_offset, out_offset, stream=stream)


def event_record(event: int, *, stream: int = 0) -> Record:
    return rec(Opcode.EVENT_RECORD, event, stream=stream)


def event_wait(event: int, *, stream: int = 0) -> Record:
    return rec(Opcode.EVENT_WAIT, event, stream=stream)


def sync(stream: int = 0) -> Record:
    return rec(Opcode.SYNC, stream=stream)


# -- session state (live migration; docs/PROTOCOL.md "Session state") ----------
def state_export() -> Record:
    """The session's STATE_SUMMARY, once all its device work is done."""
    return rec(Opcode.STATE_EXPORT)


def module_export(handle: int) -> Record:
    """A module's code as it was loaded (the record's blob)."""
    return rec(Opcode.MODULE_EXPORT, handle)


def alloc_at(handle: int, size: int, flags: int = 0) -> Record:
    """MEM_ALLOC creating exactly ``handle`` (this session's epoch, not live)."""
    return rec(Opcode.ALLOC_AT, handle, size, flags)


def module_load_at(handle: int, kind: int, name: str, code: bytes) -> Record:
    """MODULE_LOAD (compiled on this device) creating exactly ``handle``."""
    return rec(Opcode.MODULE_LOAD_AT, handle, kind, name, code)


def session_restore(next_index: int, events_set: bytes) -> Record:
    """The next handle index, and the events (bitmap) to mark recorded."""
    return rec(Opcode.SESSION_RESTORE, next_index, events_set)
