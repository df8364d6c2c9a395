"""Golden messages: every frame payload, the frame header, every batch record
body and whole frames, parsed to their expected values and rebuilt byte for
byte, with construct and with the derived fast codecs (STYLE.md habit 7)."""

from __future__ import annotations

import struct

import construct as c
import pytest

from tests.unit._protocol_samples import (
    BODY_SAMPLES,
    GOLDEN_DIR,
    HEADER_SAMPLE,
    PAYLOAD_SAMPLES,
    TYPICAL_BATCH,
    batch_samples,
    build_batch_construct,
    build_construct,
    canon,
    construct_batch,
    construct_exact,
    frame_samples,
    golden_files,
    read_golden,
)
from vpcie.protocol import batch, frames
from vpcie.protocol.codes import BATCH_MAGIC, FRAME_MAGIC, FrameType, Opcode
from vpcie.protocol.fastcodec import FastStruct, construct_decode

PAYLOAD_NAMES = sorted(frames.PAYLOADS)
BATCH_NAMES = sorted(batch_samples())
FRAME_NAMES = sorted(frame_samples())


def test_samples_cover_every_definition() -> None:
    assert set(PAYLOAD_SAMPLES) == set(frames.PAYLOADS)
    assert set(BODY_SAMPLES) == set(batch.BODIES) == set(Opcode)
    sent = {fs.type for fs in frame_samples().values()}
    assert sent == {int(t) for t in FrameType}


def test_committed_golden_files_match_catalogue() -> None:
    """The committed files are exactly the catalogue, and the samples still
    build (with construct) to the committed bytes."""
    expected = golden_files()
    on_disk = {p.stem for p in GOLDEN_DIR.glob("*.bin")}
    assert on_disk == set(expected)
    for name, data in expected.items():
        assert read_golden(name) == data, f"{name}.bin differs from its sample"


def test_golden_anchors_written_by_hand() -> None:
    """A few bytes checked without any definition, so a layout change in
    frames.py/batch.py together with a regenerated file is still noticed."""
    hdr = read_golden("frame_header")
    assert hdr[:4] == b"VPCI" and hdr[4] == 2 and len(hdr) == 24  # protocol v2
    assert struct.unpack("<IBBHIQI", hdr) == HEADER_SAMPLE
    assert read_golden("payload_ping") == struct.pack("<Q", PAYLOAD_SAMPLES["PING"][0])
    b = read_golden("batch_mem_alloc")
    assert b[:4] == b"VGB1"
    assert struct.unpack("<IHHII", b[:16]) == (BATCH_MAGIC, 1, 0, len(b), 1)
    assert struct.unpack("<HHII", b[16:28]) == (int(Opcode.MEM_ALLOC), 0, 24, 0)
    assert struct.unpack("<QI", b[28:]) == BODY_SAMPLES[Opcode.MEM_ALLOC]
    # OPEN ends with lease_token and lease_live: the bytes of PrefixedArray(u16, u64).
    op = read_golden("payload_open")
    *_, token, nlive, live = PAYLOAD_SAMPLES["OPEN"]
    tail = struct.pack("<QH", token, nlive) + b"".join(struct.pack("<Q", t) for (t,) in live)
    assert op.endswith(tail) and nlive == len(live) == 3
    prefixed = c.Struct(
        "lease_token" / c.Int64ul, "lease_live" / c.PrefixedArray(c.Int16ul, c.Int64ul)
    )
    assert prefixed.parse(tail) == {"lease_token": token, "lease_live": [t for (t,) in live]}


def test_frame_header_golden() -> None:
    data = read_golden("frame_header")
    values = construct_decode(frames.HEADER)(data)
    assert values == HEADER_SAMPLE
    assert values[0] == FRAME_MAGIC
    fast = FastStruct(frames.HEADER)
    assert fast.decode(data, 0) == (HEADER_SAMPLE, len(data))
    assert fast.encode(HEADER_SAMPLE) == data
    assert frames.HEADER.build(frames.HEADER.parse(data)) == data
    t, flags, session, seq, length = HEADER_SAMPLE[2:]
    assert frames.encode_header(t, length, session=session, seq=seq, flags=flags) == data


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_payload_golden(name: str) -> None:
    data = read_golden(f"payload_{name.lower()}")
    expected = PAYLOAD_SAMPLES[name]
    definition = frames.PAYLOADS[name]
    # construct
    assert construct_decode(definition)(data) == expected
    assert construct_exact(definition)(data) == expected
    assert definition.build(definition.parse(data)) == data
    assert build_construct(definition, expected) == data
    # derived fast codec
    assert frames.decode_payload(name, data) == expected
    assert frames.decode_payload(name, memoryview(data)) == expected
    assert frames.encode_payload(name, *expected) == data
    assert frames.encode_payload(name, *frames.decode_payload(name, data)) == data


def test_encode_completion_matches_golden() -> None:
    status, failed, message, _n, results, blob = PAYLOAD_SAMPLES["COMPLETION"]
    got = frames.encode_completion(
        status, failed_index=failed, message=message, results=results, blob=blob
    )
    assert got == read_golden("payload_completion")


def test_query_info_inside_open_reply() -> None:
    info = frames.decode_payload("OPEN_REPLY", read_golden("payload_open_reply"))[3]
    assert info == read_golden("payload_query_info")
    assert frames.decode_payload("QUERY_INFO", info) == PAYLOAD_SAMPLES["QUERY_INFO"]


@pytest.mark.parametrize("name", BATCH_NAMES)
def test_batch_golden(name: str) -> None:
    data = read_golden(name)
    flags, records = batch_samples()[name]
    # construct
    assert construct_batch(data) == (flags, records)
    assert batch.BATCH.build(batch.BATCH.parse(data)) == data
    assert build_batch_construct(flags, records) == data
    # derived fast codec
    got = batch.decode_batch(data)
    assert canon(got) == canon(records)
    assert batch.encode_batch(records, flags=flags) == data
    assert batch.encode_batch(got, flags=flags) == data
    pre = [batch.encode_record(r.opcode, r.body, stream=r.stream, flags=r.flags) for r in records]
    assert batch.encode_batch(pre, flags=flags) == data


@pytest.mark.parametrize("op", list(Opcode), ids=lambda o: o.name)
def test_each_body_round_trips_alone(op: Opcode) -> None:
    """Body bytes alone, for every opcode: construct and FastStruct agree."""
    body = BODY_SAMPLES[op]
    definition = batch.BODIES[op]
    raw = build_construct(definition, body)
    fast = batch.FAST_BODIES[op]
    assert fast.encode(body) == raw
    assert fast.decode(raw, 0) == (body, len(raw))
    assert construct_exact(definition)(raw) == body
    assert definition.build(definition.parse(raw)) == raw
    assert batch.fields(op) == tuple(m.name for m in definition.subcons)


def test_record_field_by_name() -> None:
    launch = batch.decode_batch(read_golden("batch_launch"))[0]
    assert launch.field("kernel") == "saxpy"
    assert launch.field("nargs") == 4 == len(launch.field("args"))
    gemm = batch.decode_batch(read_golden("batch_gemm"))[0]
    assert (gemm.field("m"), gemm.field("alpha"), gemm.field("beta")) == (64, 1.0, 0.5)


@pytest.mark.parametrize("name", FRAME_NAMES)
def test_frame_golden(name: str) -> None:
    data = read_golden(name)
    fs = frame_samples()[name]
    assert frames.encode_frame(fs.type, fs.payload, session=fs.session, seq=fs.seq,
                               flags=fs.flags) == data  # fmt: skip
    reader = frames.FrameReader()
    buf = reader.get_buffer()
    buf[: len(data)] = data
    (frame,) = reader.buffer_updated(len(data))
    assert (frame.type, frame.flags, frame.session, frame.seq) == (
        fs.type,
        fs.flags,
        fs.session,
        fs.seq,
    )
    if fs.type == FrameType.DATA:
        (offset,) = frames.decode_payload("DATA_HEADER", fs.payload[:8])
        assert (frame.data_offset, frame.data_len) == (offset, len(fs.payload) - 8)
        assert bytes(frame.payload) == fs.payload[8:]
    else:
        assert bytes(frame.payload) == fs.payload
    if fs.type == FrameType.COMMAND:
        assert batch.decode_batch(frame.payload) == TYPICAL_BATCH
