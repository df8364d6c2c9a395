"""Every truncation of every golden message is rejected cleanly (aiortc's
habit, STYLE.md habit 7), and header-level corruption kills a FrameReader
with a ProtocolError."""

from __future__ import annotations

import struct

import pytest

from tests.unit._protocol_samples import (
    batch_samples,
    construct_batch,
    construct_exact,
    frame_samples,
    read_golden,
    truncations,
)
from vpcie.errors import ProtocolError
from vpcie.protocol import batch, frames
from vpcie.protocol.codes import MAX_PAYLOAD, PROTOCOL_VERSION, FrameType
from vpcie.protocol.fastcodec import construct_decode

PAYLOAD_NAMES = sorted(frames.PAYLOADS)
BATCH_NAMES = sorted(batch_samples())
FRAME_NAMES = sorted(frame_samples())


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_every_payload_truncation_rejected(name: str) -> None:
    data = read_golden(f"payload_{name.lower()}")
    ref = construct_decode(frames.PAYLOADS[name])
    fast = frames.FAST[name]
    for cut in truncations(data):
        with pytest.raises(ProtocolError):
            frames.decode_payload(name, cut)
        with pytest.raises(ProtocolError):
            fast.decode(cut, 0)
        with pytest.raises(ProtocolError):
            ref(cut)


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_payload_trailing_bytes_rejected(name: str) -> None:
    data = read_golden(f"payload_{name.lower()}") + b"\x00"
    with pytest.raises(ProtocolError, match="trailing"):
        frames.decode_payload(name, data)
    with pytest.raises(ProtocolError):
        construct_exact(frames.PAYLOADS[name])(data)


@pytest.mark.parametrize("name", BATCH_NAMES)
def test_every_batch_truncation_rejected(name: str) -> None:
    data = read_golden(name)
    for cut in truncations(data):
        with pytest.raises(ProtocolError):
            batch.decode_batch(cut)
        with pytest.raises(ProtocolError):
            construct_batch(cut)


@pytest.mark.parametrize("name", BATCH_NAMES)
def test_every_inner_truncation_rejected(name: str) -> None:
    """Cut inside the records and fix the header's length to match, so the
    record-level checks (not the batch length) must catch it."""
    data = read_golden(name)
    for k in range(batch.BATCH_HEADER_SIZE, len(data)):
        cut = data[:8] + struct.pack("<I", k) + data[12:k]
        with pytest.raises(ProtocolError):
            batch.decode_batch(cut)
        with pytest.raises(ProtocolError):
            construct_batch(cut)


def test_record_length_too_short_or_long_rejected() -> None:
    data = bytearray(read_golden("batch_mem_alloc"))
    for rlen in (0, 11, 12, 23, 25, 1000):
        data[20:24] = struct.pack("<I", rlen)
        with pytest.raises(ProtocolError):
            batch.decode_batch(bytes(data))
        with pytest.raises(ProtocolError):
            construct_batch(bytes(data))


def _feed(reader: frames.FrameReader, data: bytes, chunk: int) -> list[frames.Frame]:
    out: list[frames.Frame] = []
    pos = 0
    while pos < len(data):
        buf = reader.get_buffer()
        n = min(len(buf), chunk, len(data) - pos)
        assert n > 0, "reader offered no buffer space"
        buf[:n] = data[pos : pos + n]
        pos += n
        out.extend(reader.buffer_updated(n))
    return out


def _sink(session: int, seq: int, offset: int, length: int) -> list[memoryview]:
    half = length // 2
    return [memoryview(bytearray(half)), memoryview(bytearray(length - half))]


@pytest.mark.parametrize("name", FRAME_NAMES)
@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
@pytest.mark.parametrize("sink", [None, _sink], ids=["nosink", "sink"])
def test_truncated_frame_then_eof_gives_no_frame(
    name: str, chunk: int, sink: frames.Sink | None
) -> None:
    data = read_golden(name)
    step = 1 if chunk == 1 << 20 else max(1, len(data) // 40)  # byte-wise feeds: sample cuts
    for k in range(0, len(data), step):
        reader = frames.FrameReader(sink, buffer_size=256)
        assert _feed(reader, data[:k], chunk) == []  # then EOF: nothing came out
        assert not reader.dead
    # and the whole frame does come out (the test can fail)
    reader = frames.FrameReader(sink, buffer_size=256)
    assert len(_feed(reader, data, chunk)) == 1


def _header(**kw: int) -> bytes:
    fields = dict(magic=0x49435056, version=PROTOCOL_VERSION, type=int(FrameType.PING),
                  flags=0, session=0, seq=0, length=8)  # fmt: skip
    fields.update(kw)
    data: bytes = frames.HEADER.build(fields)
    return data


@pytest.mark.parametrize(
    "bad",
    [
        {"magic": 0x49435057},
        {"magic": 0},
        {"version": 0},
        {"version": PROTOCOL_VERSION - 1},
        {"version": PROTOCOL_VERSION + 1},
        {"type": 0},
        {"type": max(FrameType) + 1},
        {"type": 255},
        {"type": int(FrameType.DATA), "length": 7},
    ]
    + [{"type": int(t), "length": MAX_PAYLOAD[t] + 1} for t in FrameType]
    + [{"type": int(t), "length": 0xFFFFFFFF} for t in FrameType],
    ids=repr,
)
@pytest.mark.parametrize("prefix", [False, True], ids=["first", "after_good_frame"])
def test_header_corruption_raises(bad: dict[str, int], prefix: bool) -> None:
    good = read_golden("frame_ping")
    stream = (good if prefix else b"") + _header(**bad) + bytes(64)
    reader = frames.FrameReader()
    for chunk in (len(stream), 1):
        reader = frames.FrameReader()
        with pytest.raises(ProtocolError):
            _feed(reader, stream, chunk)
        assert reader.dead
        with pytest.raises(ProtocolError):
            reader.buffer_updated(0)


def test_max_payload_accepted_at_cap() -> None:
    """Caps are inclusive: the header of a frame exactly at its cap is fine."""
    for t in FrameType:
        reader = frames.FrameReader(buffer_size=64)
        assert _feed(reader, _header(type=int(t), length=MAX_PAYLOAD[t]) + bytes(8), 64) == []
        assert not reader.dead
