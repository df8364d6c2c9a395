"""Encoder properties: the batch caps (MAX_BATCH_BYTES, MAX_BATCH_RECORDS) and
frame caps raise ProtocolError exactly when crossed, the decoder enforces the
same caps, out-of-range values are refused, and the derived batch decoder is
much faster than construct (why it exists)."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit._protocol_samples import TYPICAL_BATCH, construct_batch
from vpcie.errors import ProtocolError
from vpcie.protocol import batch, frames
from vpcie.protocol.codes import (
    BATCH_MAGIC,
    BATCH_VERSION,
    MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS,
    MAX_PAYLOAD,
    FrameType,
    ModuleKind,
    Opcode,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HDR, REC = batch.BATCH_HEADER_SIZE, batch.RECORD_HEADER_SIZE
_NAME = "k.ptx"
# MODULE_LOAD body: kind u8 + name (u8 + bytes) + code (u32 + bytes)
_MODULE_OVERHEAD = HDR + REC + 1 + 1 + len(_NAME) + 4


@SETTINGS
@given(over=st.integers(-64, 64), extra_nops=st.integers(0, 3))
def test_batch_byte_cap(over: int, extra_nops: int) -> None:
    """A batch of exactly MAX_BATCH_BYTES encodes; one byte more raises."""
    total = MAX_BATCH_BYTES + over
    code_len = total - _MODULE_OVERHEAD - extra_nops * REC
    records = [batch.rec(Opcode.NOP)] * extra_nops + [
        batch.rec(Opcode.MODULE_LOAD, int(ModuleKind.PTX), _NAME, b"\x00" * code_len)
    ]
    if total > MAX_BATCH_BYTES:
        with pytest.raises(ProtocolError):
            batch.encode_batch(records)
        return
    raw = batch.encode_batch(records)
    assert len(raw) == total
    decoded = batch.decode_batch(raw)
    assert decoded[-1].body[2] == b"\x00" * code_len  # type: ignore[index]


@settings(max_examples=20, deadline=None)
@given(over=st.integers(-3, 3), raw=st.booleans())
def test_batch_record_cap(over: int, raw: bool) -> None:
    n = MAX_BATCH_RECORDS + over
    nop = batch.encode_record(Opcode.NOP)
    records: list[batch.Record | bytes] = [nop if raw else batch.rec(Opcode.NOP)] * n
    if n > MAX_BATCH_RECORDS:
        with pytest.raises(ProtocolError):
            batch.encode_batch(records)
        return
    data = batch.encode_batch(records)
    assert len(batch.decode_batch(data)) == n


@pytest.mark.parametrize(
    ("length", "count", "ok"),
    [
        (MAX_BATCH_BYTES, 0, False),  # length fine, but then the bytes are missing
        (MAX_BATCH_BYTES + 1, 0, False),
        (HDR, MAX_BATCH_RECORDS + 1, False),
        (HDR, 0, True),
        (HDR - 1, 0, False),
    ],
)
def test_decoder_caps(length: int, count: int, ok: bool) -> None:
    """decode_batch and construct enforce the same caps on a hostile header."""
    hdr = struct.pack("<IHHII", BATCH_MAGIC, BATCH_VERSION, 0, length, count)
    data = hdr + bytes(max(0, min(length, MAX_BATCH_BYTES + 64) - HDR))
    if ok:
        assert batch.decode_batch(data) == []
        assert construct_batch(data) == (0, [])
    else:
        with pytest.raises(ProtocolError):
            batch.decode_batch(data)
        with pytest.raises(ProtocolError):
            construct_batch(data)


def test_decoder_caps_with_full_bytes() -> None:
    """Over the byte cap is refused even when every byte is present and the
    records would parse; at the cap it is accepted."""
    for total in (MAX_BATCH_BYTES, MAX_BATCH_BYTES + 1):
        code_len = total - _MODULE_OVERHEAD
        body = batch.FAST_BODIES[Opcode.MODULE_LOAD].encode((1, _NAME, b"\x00" * code_len))
        rec = struct.pack("<HHII", int(Opcode.MODULE_LOAD), 0, REC + len(body), 0) + body
        data = struct.pack("<IHHII", BATCH_MAGIC, BATCH_VERSION, 0, HDR + len(rec), 1) + rec
        assert len(data) == total
        if total <= MAX_BATCH_BYTES:
            assert len(batch.decode_batch(data)) == 1
            assert len(construct_batch(data)[1]) == 1
        else:
            with pytest.raises(ProtocolError):
                batch.decode_batch(data)
            with pytest.raises(ProtocolError):
                construct_batch(data)


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_frame_caps(ftype: FrameType) -> None:
    cap = MAX_PAYLOAD[ftype]
    assert len(frames.encode_header(ftype, cap)) == frames.HEADER_SIZE
    with pytest.raises(ProtocolError):
        frames.encode_header(ftype, cap + 1)


def test_unknown_frame_type_not_sendable() -> None:
    with pytest.raises(ProtocolError):
        frames.encode_header(0, 0)


def test_data_frame_header_cap() -> None:
    n = MAX_PAYLOAD[FrameType.DATA] - 8
    assert len(frames.data_frame_header(1, 1, 0, n, last=True)) == frames.HEADER_SIZE + 8
    with pytest.raises(ProtocolError):
        frames.data_frame_header(1, 1, 0, n + 1, last=True)


@pytest.mark.parametrize(
    ("opcode", "body"),
    [
        (Opcode.MEM_FREE, (1 << 32,)),
        (Opcode.MEM_FREE, (-1,)),
        (Opcode.MEM_ALLOC, (1, 2, 3)),
        (Opcode.MODULE_LOAD, (1, "x" * 256, b"")),
        (Opcode.LAUNCH, (1, 1, 1, 1, 1, 1, 1, 0, "k", 2, [(1, 1, 1)])),
        (Opcode.GEMM, (1, 0, 0, 1, 1, 1, 1e300, 0.0, 1, 2, 3, 0, 0, 0)),
    ],
    ids=["u32_over", "negative", "arity", "name_over_u8", "nargs_mismatch", "f32_overflow"],
)
def test_out_of_range_values_refused(opcode: Opcode, body: tuple[object, ...]) -> None:
    with pytest.raises(ProtocolError):
        batch.encode_record(opcode, body)


def test_unknown_opcode_needs_raw_body() -> None:
    with pytest.raises(ProtocolError):
        batch.encode_record(0x4242, (1, 2))
    raw = batch.encode_record(0x4242, b"abc", stream=3, flags=1)
    assert raw == struct.pack("<HHII", 0x4242, 1, REC + 3, 3) + b"abc"


def test_decode_batch_5x_faster_than_construct() -> None:
    """decode_batch exists because construct is slow; keep it that way
    (generous margin: measured ~20-40x on a quiet machine)."""
    data = batch.encode_batch(TYPICAL_BATCH)
    assert batch.decode_batch(data) == TYPICAL_BATCH

    def best(fn: object, n: int) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                fn(data)  # type: ignore[operator]
            times.append((time.perf_counter() - t0) / n)
        return min(times)

    fast = best(batch.decode_batch, 2000)
    slow = best(batch.BATCH.parse, 200)
    print(f"decode_batch {fast * 1e6:.1f} us, BATCH.parse {slow * 1e6:.1f} us, x{slow / fast:.1f}")
    assert slow >= 5 * fast
