"""FrameReader property tests: random frame sequences (DATA with and without
sinks returning scatter lists of random segment sizes, payloads larger than
the reader's buffer) cut into random chunks reassemble exactly."""

from __future__ import annotations

import array
from dataclasses import dataclass, field
from itertools import cycle, pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vpcie.errors import ProtocolError
from vpcie.protocol import frames
from vpcie.protocol.codes import MAX_PAYLOAD, FrameFlag, FrameType

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Spec:
    """One frame to send; ``cuts`` (DATA only) splits the sink's scatter list,
    None means the sink declines (payload comes back in Frame.payload)."""

    type: int
    flags: int
    session: int
    seq: int
    payload: bytes  # DATA: the copy bytes, without the offset field
    offset: int = 0
    cuts: list[int] | None = None

    def wire(self) -> bytes:
        if self.type == FrameType.DATA:
            last = bool(self.flags & FrameFlag.LAST)
            hdr = frames.data_frame_header(
                self.session, self.seq, self.offset, len(self.payload), last=last
            )
            if self.flags & ~int(FrameFlag.LAST):  # other flag bits too
                hdr = frames.encode_header(
                    self.type, 8 + len(self.payload), session=self.session, seq=self.seq,
                    flags=self.flags,
                ) + hdr[frames.HEADER_SIZE :]  # fmt: skip
            return hdr + self.payload
        return frames.encode_frame(
            self.type, self.payload, session=self.session, seq=self.seq, flags=self.flags
        )


@st.composite
def specs(draw: st.DrawFn, big: int) -> Spec:
    ftype = draw(st.sampled_from(list(FrameType)))
    cap = MAX_PAYLOAD[ftype] - (8 if ftype == FrameType.DATA else 0)
    size = draw(st.one_of(st.integers(0, 40), st.integers(0, min(big, cap))))
    payload = draw(st.binary(min_size=size, max_size=size))
    spec = Spec(
        int(ftype),
        draw(st.integers(0, 0xFFFF)),
        draw(st.integers(0, 0xFFFFFFFF)),
        draw(st.integers(0, (1 << 64) - 1)),
        payload,
    )
    if ftype == FrameType.DATA:
        spec.offset = draw(st.integers(0, (1 << 64) - 1))
        if draw(st.booleans()):
            cuts = draw(st.lists(st.integers(0, size), max_size=5))
            spec.cuts = sorted(cuts)
    return spec


@dataclass
class Sinker:
    """A sink handing out scatter lists per the specs' cuts, in DATA order."""

    specs: list[Spec]
    calls: list[tuple[int, int, int, int]] = field(default_factory=list)
    given: list[list[bytearray] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._data = iter([s for s in self.specs if s.type == FrameType.DATA])

    def __call__(self, session: int, seq: int, offset: int, length: int) -> list[memoryview] | None:
        self.calls.append((session, seq, offset, length))
        spec = next(self._data)
        if spec.cuts is None:
            self.given.append(None)
            return None
        bounds = [0, *spec.cuts, length]
        bufs = [bytearray(b - a) for a, b in pairwise(bounds)]
        self.given.append(bufs)
        return [memoryview(b) for b in bufs]


def feed(reader: frames.FrameReader, stream: bytes, chunks: list[int]) -> list[frames.Frame]:
    out: list[frames.Frame] = []
    pos = 0
    sizes = cycle(chunks)
    while pos < len(stream):
        want = next(sizes)
        while want and pos < len(stream):
            buf = reader.get_buffer()
            n = min(len(buf), want, len(stream) - pos)
            assert n > 0, "reader offered an empty buffer"
            buf[:n] = stream[pos : pos + n]
            pos += n
            want -= n
            out.extend(reader.buffer_updated(n))
    return out


def check(frames_out: list[frames.Frame], sent: list[Spec], sinker: Sinker | None) -> None:
    assert len(frames_out) == len(sent)
    data_i = 0
    for f, s in zip(frames_out, sent, strict=True):
        assert (f.type, f.flags, f.session, f.seq) == (s.type, s.flags, s.session, s.seq)
        if s.type != FrameType.DATA:
            assert bytes(f.payload) == s.payload
            assert (f.data_offset, f.data_len) == (0, 0)
            continue
        assert (f.data_offset, f.data_len) == (s.offset, len(s.payload))
        bufs = sinker.given[data_i] if sinker is not None else None
        if sinker is not None:
            assert sinker.calls[data_i] == (s.session, s.seq, s.offset, len(s.payload))
        data_i += 1
        if bufs is None:
            assert bytes(f.payload) == s.payload
        else:
            assert bytes(f.payload) == b""
            assert b"".join(bufs) == s.payload
    if sinker is not None:
        assert len(sinker.calls) == data_i


@SETTINGS
@given(
    data=st.data(),
    buffer_size=st.sampled_from([32, 33, 64, 100, 257, 4096]),
    chunks=st.lists(st.integers(1, 700), min_size=1, max_size=8),
    use_sink=st.booleans(),
)
def test_random_frames_random_chunks(
    data: st.DataObject, buffer_size: int, chunks: list[int], use_sink: bool
) -> None:
    sent = data.draw(st.lists(specs(big=3 * buffer_size), max_size=8))
    sinker = Sinker(sent) if use_sink else None
    reader = frames.FrameReader(sinker, buffer_size=buffer_size)
    stream = b"".join(s.wire() for s in sent)
    check(feed(reader, stream, chunks), sent, sinker)
    assert not reader.dead


@settings(max_examples=10, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 200_000), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 600_000), max_size=4),
)
def test_large_payloads_over_default_buffer(chunks: list[int], cuts: list[int]) -> None:
    """COMMAND payload over the 256 KiB internal buffer and DATA frames of
    600 KB, sunk and not, with the reader's default buffer."""
    big = bytes(range(256)) * 1200  # 300 KiB
    sent = [
        Spec(int(FrameType.COMMAND), 0, 7, 1, big),
        Spec(int(FrameType.DATA), 0, 7, 1, big + big[::-1], offset=0, cuts=sorted(cuts)),
        Spec(int(FrameType.PING), 0, 7, 0, b"\x01" * 8),
        Spec(int(FrameType.DATA), int(FrameFlag.LAST), 7, 1, big[::-1] * 2, offset=600 * 1024),
        Spec(int(FrameType.COMMAND), 0, 7, 2, big[:1000]),
    ]
    sinker = Sinker(sent)
    reader = frames.FrameReader(sinker)
    check(feed(reader, b"".join(s.wire() for s in sent), chunks), sent, sinker)


def test_sink_must_cover_exactly() -> None:
    spec = Spec(int(FrameType.DATA), 0, 1, 1, b"x" * 100)
    for wrong in ([memoryview(bytearray(99))], [memoryview(bytearray(60))] * 2, []):
        reader = frames.FrameReader(lambda *a, w=wrong: w)  # type: ignore[misc]
        with pytest.raises(ProtocolError):
            feed(reader, spec.wire(), [1000])
        assert reader.dead


def test_sink_views_of_other_formats() -> None:
    """A sink may hand out typed views (e.g. float32 arrays): sizes are bytes."""
    payload = bytes(range(256)) * 4
    spec = Spec(int(FrameType.DATA), 0, 1, 1, payload)
    target = array.array("f", bytes(len(payload)))
    reader = frames.FrameReader(lambda *a: [memoryview(target)])
    (frame,) = feed(reader, spec.wire(), [100])
    assert frame.data_len == len(payload)
    assert target.tobytes() == payload


def test_empty_data_frame_with_empty_scatter_list() -> None:
    sent = [Spec(int(FrameType.DATA), 0, 1, 1, b"", cuts=[0, 0]),
            Spec(int(FrameType.PING), 0, 1, 1, b"12345678")]  # fmt: skip
    sinker = Sinker(sent)
    check(feed(frames.FrameReader(sinker), b"".join(s.wire() for s in sent), [5]), sent, sinker)


def test_buffer_too_small_for_a_data_header_is_refused() -> None:
    """Below header + DATA offset the reader could never make progress."""
    with pytest.raises(ValueError):
        frames.FrameReader(buffer_size=frames.HEADER_SIZE + 7)
    frames.FrameReader(buffer_size=frames.HEADER_SIZE + 8)
