"""SUBMIT_3D: validate a guest's vGPU batch against its context and turn it
into what the agent executes.

Stage 1 (well formed) is decode_batch; stage 2 (allowed for this context) is
``prepare``: every resource a record names must be attached to the submitting
context and the byte range must lie inside its backing. Guest resources in
COPY records become the tunnel's copy stream (resource 0): scatter lists of
checked views over the resource's backing pages, sent from / received into
guest memory with no intermediate copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vpcie._native.batchcheck import Checked
from vpcie.errors import ErrorCode, GuestError, VgpuError
from vpcie.gpu.fencepage import FENCE_PAGE_SIZE
from vpcie.gpu.resources import ResourceTable
from vpcie.memory import GuestMemory, word_view
from vpcie.protocol.batch import Record, encode_batch
from vpcie.protocol.codes import ALL_STREAMS, MAX_STREAMS, MIGRATION_OPCODES, NO_INDEX, Opcode
from vpcie.protocol.frames import encode_completion

_COPY_HOST = (int(Opcode.COPY_H2D), int(Opcode.COPY_D2H))


@dataclass
class Signal:
    stream: int
    seq: int
    reply: list[memoryview]  # checked views for the COMPLETION reply; empty: none
    reply_size: int


@dataclass
class Prepared:
    """A validated batch, ready to forward (or to answer locally)."""

    forward: list[Record]  # non-local records, copies rewritten to resource 0
    fwd_index: list[int]  # forward[i] was record fwd_index[i] of the guest's batch
    h2d: list[memoryview] = field(default_factory=list)
    d2h: list[memoryview] = field(default_factory=list)
    signals: list[Signal] = field(default_factory=list)
    fence_page: memoryview | None = None  # set by FENCE_PAGE_SET
    fence_gpa: int = 0  # its guest address
    fence_rid: int = 0  # and its resource
    # Resources whose backing it reads or writes after SUBMIT_3D is answered
    # (SIGNAL replies, copies): their UNREF is answered once it has finished.
    rids: set[int] = field(default_factory=set)
    # The guest's batch and its records' spans (decode_batch(spans=)): records
    # forwarded unchanged are sent as the guest's bytes, not encoded again.
    records: list[Record] | None = None
    raw: bytes = b""
    spans: list[tuple[int, int]] | None = None
    # The forwarded batch already encoded (the native checker's output); then
    # ``forward`` stays empty and ``fwd_index`` says how many records it holds.
    wire: bytes | None = None

    def encoded(self) -> bytes:
        """The batch to send: ``forward`` encoded (ProtocolError if over the caps)."""
        if self.wire is not None:
            return self.wire
        records, spans, raw = self.records, self.spans, self.raw
        parts: list[Record | bytes] = []
        for r, i in zip(self.forward, self.fwd_index, strict=True):
            if records is not None and spans is not None and r is records[i]:
                start, end = spans[i]
                parts.append(raw[start:end])
            else:
                parts.append(r)
        return encode_batch(parts)

    def copy_totals(self) -> tuple[int, int]:
        """Bytes of the H2D and D2H copy streams (every forwarded copy is one)."""
        return sum(map(len, self.h2d)), sum(map(len, self.d2h))


_OK_REPLY = encode_completion(int(ErrorCode.OK), failed_index=NO_INDEX)


def completion_reply(
    fwd_index: list[int],
    want_reply: bool,
    code: ErrorCode,
    failed_index: int,
    message: str,
    results: dict[int, int],
    blob: bytes,
) -> tuple[bytes, int]:
    """A batch's outcome as its SIGNAL replies carry it (a COMPLETION payload
    whose record indices are the guest's; b"" when no SIGNAL wants one) and
    the failed record's index in the guest's batch (NO_INDEX when it ran)."""

    def original(fwd: int) -> int:
        return fwd_index[fwd] if 0 <= fwd < len(fwd_index) else fwd

    orig_failed = NO_INDEX if code == ErrorCode.OK else original(failed_index)
    if not want_reply:
        return b"", orig_failed
    if code == ErrorCode.OK and not results and not blob and not message:
        return _OK_REPLY, orig_failed
    res = sorted((original(i), v) for i, v in results.items())
    reply = encode_completion(
        int(code), failed_index=orig_failed, message=message[:200], results=res, blob=blob
    )
    return reply, orig_failed


def _attached(table: ResourceTable, ctx_resources: set[int], rid: int, index: int) -> None:
    if rid not in ctx_resources or rid not in table:
        raise VgpuError(
            ErrorCode.INVALID_HANDLE, f"resource {rid} is not attached to this context", index
        )


def _signal(
    table: ResourceTable,
    ctx_resources: set[int],
    mem: GuestMemory,
    stream: int,
    seq: int,
    rid: int,
    offset: int,
    size: int,
    index: int,
) -> Signal:
    """A SIGNAL's reply views: a resource attached to this context, the range
    inside its backing (VgpuError, or GuestError from the resource, if not)."""
    if not rid:
        return Signal(stream, seq, [], 0)
    _attached(table, ctx_resources, rid, index)
    return Signal(stream, seq, table.get(rid).views(mem, offset, size), size)


def prepare(
    records: list[Record],
    table: ResourceTable,
    ctx_resources: set[int],
    mem: GuestMemory,
    raw: bytes = b"",
    spans: list[tuple[int, int]] | None = None,
) -> Prepared:
    """Stage-2 validation; raises VgpuError(code, msg, index) for the first bad
    record. ``raw``/``spans``: the batch bytes and decode_batch's record spans."""
    out = Prepared([], [], records=records, raw=raw, spans=spans)
    for i, r in enumerate(records):
        op = r.opcode
        if r.stream >= MAX_STREAMS and not (op == Opcode.SYNC and r.stream == ALL_STREAMS):
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"stream {r.stream} out of range", i)
        if op in MIGRATION_OPCODES:  # the backend's own migration records, never the guest's
            name = Opcode(op).name
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"opcode {name} is not for guests", i)
        body = r.body
        try:
            if op == Opcode.FENCE_PAGE_SET:
                assert isinstance(body, tuple)
                rid, offset = body
                _attached(table, ctx_resources, rid, i)
                if offset % 8:
                    raise VgpuError(ErrorCode.INVALID_ARGUMENT, "fence page must be 8-aligned", i)
                segs = table.get(rid).segments(offset, FENCE_PAGE_SIZE)
                if len(segs) != 1:
                    raise VgpuError(
                        ErrorCode.INVALID_ARGUMENT, "fence page must not cross backing entries", i
                    )
                out.fence_page = mem.view(*segs[0])
                out.fence_gpa, out.fence_rid = segs[0][0], rid
                try:  # the backing GPA too: fence words are single aligned stores
                    word_view(out.fence_page, "Q")
                except ValueError:
                    raise VgpuError(
                        ErrorCode.INVALID_ARGUMENT, "fence page must be 8-aligned in guest RAM", i
                    ) from None
                continue
            if op == Opcode.SIGNAL:
                assert isinstance(body, tuple)
                seq, rid, offset, size = body
                out.signals.append(
                    _signal(table, ctx_resources, mem, r.stream, seq, rid, offset, size, i)
                )
                if rid:
                    out.rids.add(rid)
                continue
            if op in _COPY_HOST:
                assert isinstance(body, tuple)
                handle, rid, dev_off, host_off, size = body
                if rid == 0:
                    raise VgpuError(
                        ErrorCode.INVALID_ARGUMENT, "a guest copy must name a resource", i
                    )
                _attached(table, ctx_resources, rid, i)
                views = table.get(rid).views(mem, host_off, size)
                (out.h2d if op == Opcode.COPY_H2D else out.d2h).extend(views)
                out.rids.add(rid)
                r = Record(op, r.flags, r.stream, (handle, 0, dev_off, 0, size))
        except GuestError as exc:  # range / backing problems found by the resource
            raise VgpuError(ErrorCode.OUT_OF_RANGE, str(exc), i) from exc
        out.forward.append(r)
        out.fwd_index.append(i)
    return out


def prepare_checked(
    checked: Checked, table: ResourceTable, ctx_resources: set[int], mem: GuestMemory, raw: bytes
) -> Prepared | None:
    """Stage 2 for a batch the native checker accepted (stage 1 done in C, no
    copies or fence page in it): SIGNAL replies must name resources attached
    to this context, inside their backing. None when they do not: the caller
    then runs the Python path, which refuses the batch with the exact error."""
    out = Prepared([], checked.fwd_index, raw=raw, wire=checked.forward)
    try:
        out.signals = [
            _signal(table, ctx_resources, mem, stream, seq, rid, offset, size, index)
            for index, stream, seq, rid, offset, size in checked.signals
        ]
    except (GuestError, VgpuError):  # the Python path answers it
        return None
    out.rids = {sig[3] for sig in checked.signals if sig[3]}
    return out
