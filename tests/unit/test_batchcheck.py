"""The C batch check (batchcheck.c, ``vb_check``) against the Python path.

``vb_check`` may decline any batch. When it accepts, ``decode_batch`` +
``prepare`` + ``Prepared.encoded()`` must accept too and give the same
forwarded bytes, the same record indices and the same SIGNALs. And it declines
nothing needlessly: a batch the Python path accepts that is made only of the
records it handles (kernel names in printable ASCII, something to forward, at
most MAX_FAST_SIGNALS SIGNALs) must be accepted. Inputs: valid batches of every
opcode, and hostile mutations of them (cut, flipped, patched header and record
fields, appended bytes and records).

Every C call is also made on an exact-size copy of the input with guarded
output buffers: no read past ``len`` (AddressSanitizer, scripts/asan_native.sh)
and no write past a cap (the guard bytes).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import construct as c
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.unit._protocol_samples import mutations, values_strategy
from vpcie import _native
from vpcie._native.batchcheck import (
    MAX_FAST_SIGNALS,
    BatchChecker,
    Checked,
    SignalTuple,
    batch_checker,
)
from vpcie.errors import ErrorCode, ProtocolError, VgpuError
from vpcie.gpu.resources import ResourceTable
from vpcie.gpu.submit import prepare
from vpcie.memory import GuestMemory
from vpcie.protocol import batch
from vpcie.protocol.batch import (
    BATCH_HEADER_SIZE,
    BODIES,
    RECORD_HEADER_SIZE,
    Record,
    decode_batch,
    encode_batch,
    fields,
    rec,
)
from vpcie.protocol.codes import (
    ALL_STREAMS,
    BATCH_MAGIC,
    BATCH_VERSION,
    MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS,
    MAX_STREAMS,
    MIGRATION_OPCODES,
    Opcode,
)

pytestmark = pytest.mark.skipif(
    not _native.native_available(),
    reason=f"native module not built ({_native.native_error()}): python -m vpcie._native._build",
)

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The records vb_check handles; everything else it declines.
HANDLED = frozenset(
    {
        Opcode.NOP,
        Opcode.QUERY,
        Opcode.MEM_ALLOC,
        Opcode.MEM_FREE,
        Opcode.COPY_D2D,
        Opcode.MEMSET,
        Opcode.MODULE_FREE,
        Opcode.GEMM,
        Opcode.AXPY,
        Opcode.REDUCE_SUM,
        Opcode.EVENT_RECORD,
        Opcode.EVENT_WAIT,
        Opcode.SYNC,
        Opcode.SIGNAL,
        Opcode.LAUNCH,
    }
)
FIXED = sorted(op for op in HANDLED if op != Opcode.LAUNCH)
KERNEL = fields(Opcode.LAUNCH).index("kernel")
SIGNAL = int(Opcode.SIGNAL)
GUARD = 64  # bytes / entries past each cap that must stay untouched
FILL = 0xA5


@pytest.fixture(scope="module")
def checker() -> BatchChecker:
    return BatchChecker()


@pytest.fixture(scope="module")
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, 4096)])
    yield m
    m.close()


# -- the Python path, the reference ---------------------------------------------
def python_path(data: bytes, mem: GuestMemory) -> tuple[list[Record], Checked] | None:
    """decode_batch + prepare + encoded() as the backend runs them; None: refused.

    SIGNAL reply resources are the caller's to check (vb_check has no resource
    table), so prepare sees every SIGNAL with resource 0; the signals expected
    are the records' own fields."""
    spans: list[tuple[int, int]] = []
    try:
        records = decode_batch(data, spans)
    except ProtocolError:
        return None
    staged = [
        r._replace(body=(r.body[0], 0, r.body[2], r.body[3]))
        if r.opcode == SIGNAL and isinstance(r.body, tuple)
        else r
        for r in records
    ]
    try:
        prepared = prepare(staged, ResourceTable(), set(), mem, data, spans)
    except VgpuError:
        return None
    signals: list[SignalTuple] = []
    for i, r in enumerate(records):
        if r.opcode == SIGNAL and isinstance(r.body, tuple):
            seq, rid, offset, size = r.body
            signals.append((i, r.stream, seq, rid, offset, size))
    assert [(s.stream, s.seq) for s in prepared.signals] == [(s[1], s[2]) for s in signals]
    return records, Checked(prepared.encoded(), prepared.fwd_index, signals)


def _printable(name: str) -> bool:
    return all(0x20 <= ord(ch) <= 0x7E for ch in name)


def must_accept(records: list[Record], forward: bytes, max_forward_bytes: int) -> bool:
    """Whether vb_check must accept a batch the Python path accepted."""
    for r in records:
        if r.opcode not in HANDLED:
            return False
        if r.opcode == Opcode.LAUNCH:
            assert isinstance(r.body, tuple)
            if not _printable(r.body[KERNEL]):
                return False
    nsigs = sum(r.opcode == SIGNAL for r in records)
    if nsigs == len(records) or nsigs > MAX_FAST_SIGNALS:
        return False
    return not max_forward_bytes or len(forward) <= max_forward_bytes


def c_exact(data: bytes, max_forward_bytes: int = 0, **caps: int) -> Checked | None:
    """vb_check on an exact-size copy of ``data``, twice: into buffers followed
    by guard bytes that must come back untouched, and into exact-size buffers
    (where AddressSanitizer sees any access past an end, reads included)."""
    fwd_cap = caps.get("fwd_cap", min(len(data), MAX_BATCH_BYTES))
    sigs_cap = caps.get("sigs_cap", MAX_FAST_SIGNALS)
    index_cap = caps.get("index_cap", MAX_BATCH_RECORDS)
    guarded = _c_call(data, max_forward_bytes, fwd_cap, sigs_cap, index_cap, GUARD)
    assert _c_call(data, max_forward_bytes, fwd_cap, sigs_cap, index_cap, 0) == guarded
    return guarded


def _c_call(
    data: bytes, max_forward_bytes: int, fwd_cap: int, sigs_cap: int, index_cap: int, guard: int
) -> Checked | None:
    ffi, lib = _native.native()
    src = ffi.new("uint8_t[]", len(data))
    ffi.memmove(src, data, len(data))
    fwd = ffi.new("uint8_t[]", fwd_cap + guard)
    sigs = ffi.new("struct vb_signal[]", sigs_cap + guard)
    idx = ffi.new("uint32_t[]", index_cap + guard)
    for buf in (fwd, sigs, idx):
        ffi.memmove(buf, bytes([FILL]) * ffi.sizeof(buf), ffi.sizeof(buf))
    out = ffi.new("struct vb_out *")
    ok = lib.vb_check(
        src, len(data), max_forward_bytes, fwd, fwd_cap, out, sigs, sigs_cap, idx, index_cap
    )
    for buf, cap in ((fwd, fwd_cap), (sigs, sigs_cap), (idx, index_cap)):
        tail = ffi.buffer(buf)[cap * ffi.sizeof(ffi.typeof(buf).item) :]
        assert tail == bytes([FILL]) * len(tail), "vb_check wrote past a cap"
    if not ok:
        assert (out.fwd_len, out.nfwd, out.nsigs) == (0, 0, 0)
        return None
    assert ok == 1
    signals = [
        (s.index, s.stream, s.seq, s.resource, s.offset, s.size)
        for s in (sigs[k] for k in range(out.nsigs))
    ]
    return Checked(bytes(ffi.buffer(fwd, out.fwd_len)), [idx[k] for k in range(out.nfwd)], signals)


def agree(
    checker: BatchChecker,
    mem: GuestMemory,
    data: bytes,
    max_forward_bytes: int = 0,
    *,
    events: bool = False,
) -> Checked | None:
    """The differential check; returns vb_check's answer. ``events``: inside a
    hypothesis test, count the outcomes (pytest --hypothesis-show-statistics)."""
    got = checker.check(data, max_forward_bytes)
    assert c_exact(data, max_forward_bytes) == got
    ref = python_path(data, mem)
    if events:
        event("python accepts" if ref is not None else "python refuses")
        event("vb_check accepts" if got is not None else "vb_check declines")
    if got is not None:
        assert ref is not None, "vb_check accepted a batch the Python path refuses"
        assert got == ref[1]
        assert not max_forward_bytes or len(got.forward) <= max_forward_bytes
    elif ref is not None:
        records, want = ref
        assert not must_accept(records, want.forward, max_forward_bytes), "needless decline"
    return got


# -- strategies -------------------------------------------------------------------
VALID_STREAM = st.integers(0, MAX_STREAMS - 1)
ANY_STREAM = st.one_of(
    VALID_STREAM,
    st.sampled_from([MAX_STREAMS, ALL_STREAMS, ALL_STREAMS - 1, 1 << 31]),
    st.integers(0, 0xFFFFFFFF),
)
ASCII_NAME = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
ANY_NAME = st.one_of(
    ASCII_NAME,
    st.text(st.characters(max_codepoint=0x7F), max_size=12),  # control characters, DEL
    st.text(max_size=20),  # anything UTF-8
)


def record_st(
    ops: list[Opcode], streams: st.SearchStrategy[int], names: st.SearchStrategy[str]
) -> st.SearchStrategy[Record]:
    def build(op: Opcode) -> st.SearchStrategy[Record]:
        body = values_strategy(BODIES[op])
        if op == Opcode.LAUNCH:
            body = st.tuples(body, names).map(lambda t: (*t[0][:KERNEL], t[1], *t[0][KERNEL + 1 :]))
        stream = st.one_of(streams, st.just(ALL_STREAMS)) if op == Opcode.SYNC else streams
        return st.builds(Record, st.just(int(op)), st.integers(0, 0xFFFF), stream, body)

    return st.sampled_from(ops).flatmap(build)


UNKNOWN_RECORD = st.builds(
    Record,
    st.one_of(  # the holes in the opcode numbers and everything above
        st.sampled_from(sorted(set(range(max(BODIES))) - set(BODIES))),
        st.integers(max(BODIES) + 1, 0xFFFF),
    ),
    st.integers(0, 0xFFFF),
    ANY_STREAM,
    st.binary(max_size=24),
)
HANDLED_RECORDS = st.lists(
    record_st(sorted(HANDLED), VALID_STREAM, ASCII_NAME), min_size=1, max_size=10
).filter(lambda rs: any(r.opcode != SIGNAL for r in rs))
ANY_RECORDS = st.lists(
    st.one_of(
        record_st(sorted(HANDLED), VALID_STREAM, ASCII_NAME),
        record_st(list(BODIES), ANY_STREAM, ANY_NAME),
        UNKNOWN_RECORD,
    ),
    max_size=8,
)

# Values that sit on an edge of some check.
EDGES = [0, 1, 11, 12, 13, 15, 16, 17, 32, 33, 45, 63, 64, 65, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF,
         4095, 4096, 4097, MAX_BATCH_BYTES - 1, MAX_BATCH_BYTES, MAX_BATCH_BYTES + 1,
         0x7FFFFFFF, 0x80000000, 0xFFFFFFF0, 0xFFFFFFFF]  # fmt: skip
HEADER_FIELDS = [(0, 4), (4, 2), (6, 2), (8, 4), (12, 4)]  # magic, version, flags, length, count
RECORD_FIELDS = [(0, 2), (2, 2), (4, 4), (8, 4)]  # opcode, flags, length, stream


def _put(raw: bytes, at: int, size: int, value: int) -> bytes:
    at = min(at, max(len(raw) - size, 0))
    word = (value % (1 << (8 * size))).to_bytes(size, "little")
    return raw[:at] + word[: max(len(raw) - at, 0)] + raw[at + size :]


def _value(draw: st.DataObject, current: int) -> int:
    return draw.draw(
        st.one_of(
            st.sampled_from(EDGES),
            st.integers(-16, 16).map(lambda d: current + d),
            st.integers(0, 0xFFFFFFFF),
        )
    )


def mutate(draw: st.DataObject, raw: bytes) -> bytes:
    """0 to 3 hostile changes to a valid batch."""
    spans: list[tuple[int, int]] = []
    decode_batch(raw, spans)
    for _ in range(draw.draw(st.integers(0, 3))):
        how = draw.draw(
            st.sampled_from(
                [
                    "bytes",
                    "header",
                    "record",
                    "inside",
                    "tail",
                    "tail+len",
                    "records+len",
                    "cut+len",
                ]
            )
        )
        if how == "bytes":  # cut, overwrite, insert, extend anywhere
            raw = draw.draw(mutations(raw))
        elif how == "header" and len(raw) >= BATCH_HEADER_SIZE:
            at, size = draw.draw(st.sampled_from(HEADER_FIELDS))
            current = int.from_bytes(raw[at : at + size], "little")
            raw = _put(raw, at, size, _value(draw, current))
        elif how in ("record", "inside") and spans:
            start, end = draw.draw(st.sampled_from(spans))
            if how == "record":
                at, size = draw.draw(st.sampled_from(RECORD_FIELDS))
            else:  # a byte/word in the body: LAUNCH name length, nargs, ...
                at = draw.draw(st.integers(0, max(end - start - 1, 0)))
                size = draw.draw(st.sampled_from([1, 2, 4]))
            current = int.from_bytes(raw[start + at : start + at + size], "little")
            raw = _put(raw, start + at, size, _value(draw, current))
        elif how == "tail":  # bytes after `length`: ignored by both
            raw += draw.draw(st.binary(min_size=1, max_size=16))
        elif how == "tail+len" and len(raw) >= BATCH_HEADER_SIZE:  # trailing bytes in the batch
            raw += draw.draw(st.binary(min_size=1, max_size=16))
            raw = _put(raw, 8, 4, len(raw))
        elif how == "records+len" and len(raw) >= BATCH_HEADER_SIZE:  # more records, fixed up
            extra = draw.draw(ANY_RECORDS)
            raw += encode_batch(extra)[BATCH_HEADER_SIZE:]
            count = int.from_bytes(raw[12:16], "little")
            raw = _put(_put(raw, 8, 4, len(raw)), 12, 4, count + len(extra))
        elif how == "cut+len" and len(raw) > BATCH_HEADER_SIZE:  # a record cut short, length fixed
            raw = raw[: draw.draw(st.integers(BATCH_HEADER_SIZE, len(raw) - 1))]
            raw = _put(raw, 8, 4, len(raw))
    return raw


# -- differential tests -------------------------------------------------------------
@SETTINGS
@given(records=HANDLED_RECORDS, flags=st.integers(0, 0xFFFF))
def test_handled_batches_are_accepted_and_agree(
    checker: BatchChecker, mem: GuestMemory, records: list[Record], flags: int
) -> None:
    raw = encode_batch(records, flags=flags)
    got = agree(checker, mem, raw)
    assert got is not None
    # independently of prepare: the non-SIGNAL records, encoded again, flags 0
    assert got.forward == encode_batch([r for r in records if r.opcode != SIGNAL])
    assert got.fwd_index == [i for i, r in enumerate(records) if r.opcode != SIGNAL]
    # the input may be any buffer; bytes after `length` are not looked at
    assert checker.check(bytearray(raw)) == got
    assert checker.check(memoryview(raw + b"\xff" * 7)[: len(raw) + 3]) == got
    assert checker.check(raw + b"\x00" * 5) == got


@SETTINGS
@given(records=ANY_RECORDS, flags=st.integers(0, 0xFFFF), data=st.data())
def test_hostile_batches_agree(
    checker: BatchChecker,
    mem: GuestMemory,
    records: list[Record],
    flags: int,
    data: st.DataObject,
) -> None:
    raw = mutate(data, encode_batch(records, flags=flags))
    limit = data.draw(st.one_of(st.just(0), st.integers(0, 400)))
    agree(checker, mem, raw, limit, events=True)


@SETTINGS
@given(records=HANDLED_RECORDS, flags=st.integers(0, 0xFFFF), data=st.data())
def test_mutated_handled_batches_agree(
    checker: BatchChecker,
    mem: GuestMemory,
    records: list[Record],
    flags: int,
    data: st.DataObject,
) -> None:
    agree(checker, mem, mutate(data, encode_batch(records, flags=flags)), events=True)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=96))
def test_random_bytes_agree(checker: BatchChecker, mem: GuestMemory, raw: bytes) -> None:
    agree(checker, mem, raw, events=True)
    header = struct.pack("<IHHII", BATCH_MAGIC, BATCH_VERSION, 0, 16 + len(raw), len(raw) // 12)
    agree(checker, mem, header + raw, events=True)


# -- the C tables against Python -------------------------------------------------------
def test_constants_match_python() -> None:
    _, lib = _native.native()
    assert lib.VPCIE_BATCH_MAGIC == BATCH_MAGIC
    assert lib.VPCIE_BATCH_VERSION == BATCH_VERSION
    assert lib.VPCIE_MAX_BATCH_BYTES == MAX_BATCH_BYTES
    assert lib.VPCIE_MAX_BATCH_RECORDS == MAX_BATCH_RECORDS
    assert lib.VPCIE_MAX_STREAMS == MAX_STREAMS
    assert lib.VPCIE_ALL_STREAMS == ALL_STREAMS
    assert lib.VPCIE_BATCH_HEADER_SIZE == BATCH_HEADER_SIZE == batch.BATCH_HEADER.sizeof()
    assert lib.VPCIE_RECORD_HEADER_SIZE == RECORD_HEADER_SIZE == batch.RECORD_HEADER.sizeof()
    assert lib.VPCIE_OP_LAUNCH == Opcode.LAUNCH
    assert lib.VPCIE_OP_SYNC == Opcode.SYNC
    assert lib.VPCIE_OP_SIGNAL == Opcode.SIGNAL
    assert lib.VPCIE_OPCODES == max(Opcode) + 1


def test_launch_layout_matches_construct(checker: BatchChecker) -> None:
    """LAUNCH: fixed prefix, PascalString(u8) kernel, u16 nargs, LAUNCH_ARG * nargs."""
    _, lib = _native.native()
    members = [(m.name, m.subcon) for m in batch.LAUNCH.subcons]
    names = [n for n, _ in members]
    assert names[KERNEL:] == ["kernel", "nargs", "args"]
    prefix = c.Struct(*batch.LAUNCH.subcons[:KERNEL])
    assert lib.VPCIE_LAUNCH_OFF_KERNEL == prefix.sizeof()
    kernel = members[KERNEL][1]
    assert isinstance(kernel, c.StringEncoded) and isinstance(kernel.subcon, c.Prefixed)
    assert kernel.subcon.lengthfield.sizeof() == 1
    assert members[KERNEL + 1][1].sizeof() == 2
    assert lib.VPCIE_LAUNCH_ARG_SIZE == batch.LAUNCH_ARG.sizeof()
    # and the C walks it the same way: a LAUNCH body built by construct
    arg = {"kind": 1, "handle": 2, "value": 3}
    values = (1, 2, 3, 4, 5, 6, 7, 8, "k", 2, [arg, arg])
    body = batch.LAUNCH.build(dict(zip(names, values, strict=True)))
    assert len(body) == prefix.sizeof() + 1 + 1 + 2 + 2 * batch.LAUNCH_ARG.sizeof()
    raw = _raw_batch(_raw_record(int(Opcode.LAUNCH), body))
    got = checker.check(raw)
    assert got is not None and got.forward == raw
    for cut in (body[:-1], body + b"\0"):
        assert checker.check(_raw_batch(_raw_record(int(Opcode.LAUNCH), cut))) is None


def test_body_table_matches_construct() -> None:
    _, lib = _native.native()
    for op in range(0x10000):
        got = lib.vb_body_size(op)
        if op in HANDLED and op != Opcode.LAUNCH:
            assert got == BODIES[Opcode(op)].sizeof(), Opcode(op).name
        elif op == Opcode.LAUNCH:
            assert got == lib.VB_VARIABLE
        else:
            assert got == lib.VB_DECLINE, op
    assert lib.vb_body_size(0xFFFFFFFF) == lib.VB_DECLINE


def _raw_record(op: int, body: bytes, stream: int = 0, flags: int = 0) -> bytes:
    return struct.pack("<HHII", op, flags, RECORD_HEADER_SIZE + len(body), stream) + body


def _raw_batch(*records: bytes, flags: int = 0, count: int | None = None) -> bytes:
    length = BATCH_HEADER_SIZE + sum(map(len, records))
    n = len(records) if count is None else count
    return struct.pack("<IHHII", BATCH_MAGIC, BATCH_VERSION, flags, length, n) + b"".join(records)


NOP = _raw_record(int(Opcode.NOP), b"")


@pytest.mark.parametrize("op", FIXED, ids=lambda o: o.name)
def test_exact_body_sizes(checker: BatchChecker, mem: GuestMemory, op: Opcode) -> None:
    size = BODIES[op].sizeof()
    body = bytes(range(1, size + 1))
    ok = _raw_batch(NOP, _raw_record(int(op), body, stream=3))
    got = agree(checker, mem, ok)
    assert got is not None
    if op == Opcode.SIGNAL:
        parsed = BODIES[op].parse(body)
        assert got.signals == [(1, 3, parsed.seq, parsed.resource, parsed.offset, parsed.size)]
        assert got.fwd_index == [0]
    else:
        assert got.fwd_index == [0, 1] and got.signals == []
    for bad in (body[:-1], body + b"\0") if size else (b"\0",):
        raw = _raw_batch(NOP, _raw_record(int(op), bad))
        assert python_path(raw, mem) is None
        assert agree(checker, mem, raw) is None


# Valid bodies of the backend's own migration records (docs/PROTOCOL.md "Session state").
MIGRATION_BODIES: dict[Opcode, tuple[object, ...]] = {
    Opcode.STATE_EXPORT: (),
    Opcode.ALLOC_AT: ((1 << 24) | 1, 4096, 0),
    Opcode.MODULE_LOAD_AT: ((1 << 24) | 2, 1, "k", b"code"),
    Opcode.SESSION_RESTORE: (5, b"\x01"),
    Opcode.MODULE_EXPORT: ((1 << 24) | 2,),
}


@pytest.mark.parametrize("op", sorted(MIGRATION_OPCODES), ids=lambda o: o.name)
def test_migration_opcodes_refused_for_guests(
    checker: BatchChecker, mem: GuestMemory, op: Opcode
) -> None:
    """A guest batch naming a migration record is declined by C and refused
    by the Python path with INVALID_ARGUMENT at that record: only the backend
    sends these to an agent, never on a guest's behalf."""
    raw = encode_batch([rec(Opcode.NOP), rec(op, *MIGRATION_BODIES[op], stream=1)])
    assert checker.check(raw) is None
    spans: list[tuple[int, int]] = []
    records = decode_batch(raw, spans)
    with pytest.raises(VgpuError) as err:
        prepare(records, ResourceTable(), set(), mem, raw, spans)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT and err.value.index == 1
    assert op.name in err.value.message
    assert set(MIGRATION_BODIES) == set(MIGRATION_OPCODES)


# -- each decline, next to the batch it spoils ---------------------------------------
SIG = _raw_record(SIGNAL, struct.pack("<QIQI", 7, 0, 0, 0), stream=1)
GOOD = _raw_batch(NOP, SIG)


def _launch(name: bytes, nargs: int, args: bytes | None = None, stream: int = 0) -> bytes:
    prefix = struct.pack("<8I", 1, 1, 1, 1, 32, 1, 1, 0)
    arg_bytes = args if args is not None else struct.pack("<BIQ", 1, 5, 0) * nargs
    return _raw_record(
        int(Opcode.LAUNCH),
        prefix + bytes([len(name)]) + name + struct.pack("<H", nargs) + arg_bytes,
        stream,
    )


def _set(raw: bytes, at: int, fmt: str, value: int) -> bytes:
    return raw[:at] + struct.pack(fmt, value) + raw[at + struct.calcsize(fmt) :]


DECLINED: dict[str, bytes] = {
    "empty": b"",
    "short header": GOOD[:15],
    "bad magic": _set(GOOD, 0, "<I", BATCH_MAGIC ^ 1),
    "bad version": _set(GOOD, 4, "<H", 2),
    "length over cap": _set(GOOD, 8, "<I", MAX_BATCH_BYTES + 1),
    "count over cap": _set(GOOD, 12, "<I", MAX_BATCH_RECORDS + 1),
    "length under header": _set(GOOD, 8, "<I", 15),
    "length past data": _set(GOOD, 8, "<I", len(GOOD) + 1),
    "length huge": _set(GOOD, 8, "<I", 0xFFFFFFFF),
    "no records": _raw_batch(),
    "count short: trailing bytes": _raw_batch(NOP, SIG, count=1),
    "count long: header truncated": _raw_batch(NOP, SIG, count=3),
    "trailing bytes after records": _set(GOOD + b"\0" * 5, 8, "<I", len(GOOD) + 5),
    "record length under header": _raw_batch(NOP[:4] + struct.pack("<I", 11) + NOP[8:], SIG),
    "record length past batch": _raw_batch(NOP, SIG[:4] + struct.pack("<I", 37) + SIG[8:]),
    "record length huge": _raw_batch(NOP[:4] + struct.pack("<I", 0xFFFFFFFF) + NOP[8:], SIG),
    "body too short": _raw_batch(NOP, _raw_record(SIGNAL, b"\0" * 23, 1)),
    "body too long": _raw_batch(_raw_record(int(Opcode.NOP), b"\0"), SIG),
    "COPY_H2D": _raw_batch(_raw_record(int(Opcode.COPY_H2D), struct.pack("<IIQQQ", 1, 0, 0, 0, 8))),
    "COPY_D2H": _raw_batch(_raw_record(int(Opcode.COPY_D2H), struct.pack("<IIQQQ", 1, 0, 0, 0, 8))),
    "FENCE_PAGE_SET": _raw_batch(NOP, _raw_record(int(Opcode.FENCE_PAGE_SET), b"\0" * 12)),
    "MODULE_LOAD": _raw_batch(_raw_record(int(Opcode.MODULE_LOAD), b"\x01\x01k\x00\x00\x00\x00")),
    "unknown opcode 17": _raw_batch(NOP, _raw_record(17, b"")),
    "unknown opcode 34": _raw_batch(NOP, _raw_record(34, b"xy")),
    "unknown opcode 0xffff": _raw_batch(NOP, _raw_record(0xFFFF, b"")),
    "stream = MAX_STREAMS": _raw_batch(_raw_record(int(Opcode.NOP), b"", MAX_STREAMS)),
    "ALL_STREAMS on a NOP": _raw_batch(_raw_record(int(Opcode.NOP), b"", ALL_STREAMS)),
    "SIGNAL on ALL_STREAMS": _raw_batch(NOP, _set(SIG, 8, "<I", ALL_STREAMS)),
    "SIGNAL on MAX_STREAMS": _raw_batch(NOP, _set(SIG, 8, "<I", MAX_STREAMS)),
    "SIGNALs only": _raw_batch(SIG, SIG),
    "too many SIGNALs": _raw_batch(NOP, *[SIG] * (MAX_FAST_SIGNALS + 1)),
    "LAUNCH name not ASCII": _raw_batch(_launch("é".encode(), 0)),
    "LAUNCH name invalid UTF-8": _raw_batch(_launch(b"\xff", 0)),
    "LAUNCH name control char": _raw_batch(_launch(b"a\nb", 0)),
    "LAUNCH name DEL": _raw_batch(_launch(b"\x7f", 0)),
    "LAUNCH name NUL": _raw_batch(_launch(b"\0", 0)),
    "LAUNCH body ends in prefix": _raw_batch(_raw_record(int(Opcode.LAUNCH), b"\0" * 32)),
    "LAUNCH name overruns": _raw_batch(_raw_record(int(Opcode.LAUNCH), b"\0" * 32 + b"\x05abc")),
    "LAUNCH nargs cut": _raw_batch(_raw_record(int(Opcode.LAUNCH), b"\0" * 32 + b"\x01k\0")),
    "LAUNCH args short": _raw_batch(_launch(b"k", 2, struct.pack("<BIQ", 1, 5, 0))),
    "LAUNCH args trailing": _raw_batch(_launch(b"k", 1, struct.pack("<BIQ", 1, 5, 0) + b"\0")),
    "LAUNCH nargs huge": _raw_batch(_launch(b"k", 0xFFFF, b"")),
}


def test_decline_baselines_accepted(checker: BatchChecker, mem: GuestMemory) -> None:
    """The batches the DECLINED cases spoil are accepted as they are."""
    for raw in (GOOD, _raw_batch(NOP), _raw_batch(NOP, *[SIG] * MAX_FAST_SIGNALS)):
        assert agree(checker, mem, raw) is not None
    for name in (b"", b"k", b" ~", bytes(range(0x20, 0x7F)), b"x" * 255):
        for nargs in (0, 1, 64):
            assert agree(checker, mem, _raw_batch(_launch(name, nargs))) is not None
    assert agree(checker, mem, _raw_batch(_raw_record(int(Opcode.SYNC), b"", ALL_STREAMS)))
    assert agree(checker, mem, _raw_batch(_raw_record(int(Opcode.NOP), b"", MAX_STREAMS - 1)))


@pytest.mark.parametrize("raw", DECLINED.values(), ids=list(DECLINED))
def test_declined(checker: BatchChecker, mem: GuestMemory, raw: bytes) -> None:
    assert checker.check(raw) is None
    agree(checker, mem, raw)


def test_declined_where_python_refuses(mem: GuestMemory) -> None:
    """The DECLINED cases that are malformed or not allowed are refused by Python
    too (the rest, handled by the Python path, are only unfamiliar to C)."""
    python_handles = {"no records", "SIGNALs only", "too many SIGNALs", "LAUNCH name not ASCII",
                      "LAUNCH name control char", "LAUNCH name DEL", "LAUNCH name NUL",
                      "FENCE_PAGE_SET", "unknown opcode 17", "unknown opcode 34",
                      "unknown opcode 0xffff", "MODULE_LOAD"}  # fmt: skip
    for name, raw in DECLINED.items():
        if name not in python_handles:
            assert python_path(raw, mem) is None, name


def test_forward_limit(checker: BatchChecker, mem: GuestMemory) -> None:
    raw = _raw_batch(NOP, SIG, _launch(b"kern", 3))
    got = checker.check(raw)
    assert got is not None
    size = len(got.forward)
    assert checker.check(raw, size) == got
    assert checker.check(raw, size + 1) == got
    assert checker.check(raw, size - 1) is None
    for small in (1, 15, 16, 27):
        assert checker.check(raw, small) is None
    with pytest.raises(OverflowError):
        checker.check(raw, -1)
    with pytest.raises(OverflowError):
        checker.check(raw, 1 << 32)


def test_caps_are_never_overrun() -> None:
    """Caps smaller than the batch needs: declined, nothing written past them."""
    raw = _raw_batch(NOP, SIG, _launch(b"k", 2), SIG)
    full = c_exact(raw)
    assert full is not None and len(full.fwd_index) == 2 and len(full.signals) == 2
    assert c_exact(raw, fwd_cap=len(full.forward)) == full
    assert c_exact(raw, fwd_cap=len(full.forward) - 1) is None
    assert c_exact(raw, fwd_cap=0) is None
    assert c_exact(raw, fwd_cap=15) is None
    assert c_exact(raw, index_cap=2) == full
    assert c_exact(raw, index_cap=1) is None
    assert c_exact(raw, index_cap=0) is None
    assert c_exact(raw, sigs_cap=2) == full
    assert c_exact(raw, sigs_cap=1) is None
    assert c_exact(raw, sigs_cap=0) is None
    # caps of zero with NULL buffers: nothing is touched
    ffi, lib = _native.native()
    out = ffi.new("struct vb_out *")
    src = ffi.new("uint8_t[]", raw)
    assert lib.vb_check(src, len(raw), 0, ffi.NULL, 0, out, ffi.NULL, 0, ffi.NULL, 0) == 0


def test_len_bounds_the_read() -> None:
    """vb_check sees only batch[:len]: every prefix answers as the cut bytes."""
    raw = _raw_batch(NOP, SIG, _launch(b"k", 1))
    for k in range(len(raw) + 1):
        assert c_exact(raw[:k]) == (c_exact(raw) if k == len(raw) else None)


def _launch_of(size: int) -> bytes:
    """A LAUNCH record of exactly ``size`` bytes (ASCII name, PTR args)."""
    fixed = RECORD_HEADER_SIZE + 32 + 1 + 2
    name_len = (size - fixed) % 13
    nargs = (size - fixed - name_len) // 13
    raw = _launch(b"n" * name_len, nargs)
    assert len(raw) == size
    return raw


def _fill_batch(total: int, count: int) -> bytes:
    """A handled batch of exactly ``total`` bytes and ``count`` records: NOPs and
    two LAUNCHes that take up the rest (one cannot: nargs is a u16)."""
    rest = total - BATCH_HEADER_SIZE - len(NOP) * (count - 2)
    return _raw_batch(*[NOP] * (count - 2), _launch_of(rest // 2), _launch_of(rest - rest // 2))


def test_largest_batches(checker: BatchChecker, mem: GuestMemory) -> None:
    raw = _fill_batch(MAX_BATCH_BYTES, MAX_BATCH_RECORDS)
    assert len(raw) == MAX_BATCH_BYTES
    got = agree(checker, mem, raw)
    assert got is not None and got.forward == raw and len(got.fwd_index) == MAX_BATCH_RECORDS
    over = _fill_batch(MAX_BATCH_BYTES + 1, MAX_BATCH_RECORDS)
    assert agree(checker, mem, over) is None
    too_many = _raw_batch(*[NOP] * (MAX_BATCH_RECORDS + 1))
    assert agree(checker, mem, too_many) is None
    # over the record cap yet within the wrapper's index and signal caps
    sigs = MAX_FAST_SIGNALS
    assert agree(checker, mem, _raw_batch(*[NOP] * (MAX_BATCH_RECORDS - sigs), *[SIG] * sigs))
    over_count = _raw_batch(*[NOP] * (MAX_BATCH_RECORDS + 1 - sigs), *[SIG] * sigs)
    assert agree(checker, mem, over_count) is None


SAMPLE_BODIES = {
    op: (_launch(b"kernel", 2)[RECORD_HEADER_SIZE:] if op == Opcode.LAUNCH
         else bytes(range(1, BODIES[op].sizeof() + 1)))
    for op in sorted(HANDLED)
}  # fmt: skip


@pytest.mark.parametrize("op", sorted(HANDLED), ids=lambda o: o.name)
def test_every_cut_record_is_declined(checker: BatchChecker, mem: GuestMemory, op: Opcode) -> None:
    """Each handled record, its body cut anywhere (record and batch lengths made
    to match) or its length field under the header, as the last bytes of an
    exact-size buffer: declined, and nothing read past the end (ASan)."""
    body = SAMPLE_BODIES[op]
    assert agree(checker, mem, _raw_batch(NOP, _raw_record(int(op), body))) is not None
    for k in range(len(body)):
        raw = _raw_batch(NOP, _raw_record(int(op), body[:k]))
        assert agree(checker, mem, raw) is None, k
    for rlen in range(RECORD_HEADER_SIZE):
        record = _raw_record(int(op), b"")
        record = record[:4] + struct.pack("<I", rlen) + record[8:]
        for tail in (b"", body[:rlen]):
            raw = _raw_batch(NOP, record + tail)
            assert agree(checker, mem, raw) is None, rlen


def test_forward_is_the_guest_bytes(checker: BatchChecker) -> None:
    """Records go out as the guest wrote them (flags, NaN payloads), the
    header is encode_batch's (flags 0)."""
    nan = struct.pack("<I", 0x7FC0_1234)  # f32 NaN with a payload
    gemm = BODIES[Opcode.GEMM].build(
        dict(dtype=1, trans_a=0, trans_b=0, m=1, n=1, k=1, alpha=0.0, beta=0.0,
             a=1, b=2, c=3, a_offset=0, b_offset=0, c_offset=0)
    )  # fmt: skip
    at = 3 + 12  # alpha
    gemm = gemm[:at] + nan + gemm[at + 4 :]
    rec_bytes = _raw_record(int(Opcode.GEMM), gemm, stream=5, flags=0xBEEF)
    raw = _raw_batch(rec_bytes, SIG, flags=0x1234)
    got = checker.check(raw)
    assert got is not None
    assert got.forward == _raw_batch(rec_bytes)
    assert got.signals == [(1, 1, 7, 0, 0, 0)]


def test_encode_batch_header_matches(checker: BatchChecker) -> None:
    records = [rec(Opcode.MEM_ALLOC, 4096, 0, stream=2), rec(Opcode.SYNC, stream=ALL_STREAMS)]
    got = checker.check(encode_batch(records, flags=0xFFFF))
    assert got is not None and got.forward == encode_batch(records)


def test_batch_checker_factory() -> None:
    made = batch_checker()
    assert isinstance(made, BatchChecker)
    assert made.check(GOOD) == BatchChecker().check(GOOD) is not None
