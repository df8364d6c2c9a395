"""atheris fuzz target: the tunnel frame parser (FrameReader) over arbitrary
bytes in arbitrary chunking, with and without a DATA sink.

Input layout: 4 control bytes (buffer size, sink mode, chunking seed), then
the byte stream. The only allowed exception is ProtocolError; and whatever
the chunking, buffer size or sink, a stream yields the same frames (and the
same verdict) as one fed in a single piece.

Bounded run (what CI does via tests/fuzz/test_fuzz_protocol.py)::

    .venv/bin/python tests/fuzz/fuzz_frames.py --seeds /tmp/frames_corpus
    .venv/bin/python tests/fuzz/fuzz_frames.py -runs=10000 -max_total_time=20 /tmp/frames_corpus

Longer by hand (an hour, 2 workers, keep the corpus between runs)::

    .venv/bin/python tests/fuzz/fuzz_frames.py -max_total_time=3600 -jobs=2 /tmp/frames_corpus

A crash leaves ``crash-*`` in the working directory; replay it with
``.venv/bin/python tests/fuzz/fuzz_frames.py crash-<hash>``.
"""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path
from typing import Any

import atheris
import construct  # noqa: F401  (imported first: instrument vpcie, not construct)

with atheris.instrument_imports():
    from vpcie.errors import ProtocolError
    from vpcie.protocol import frames
    from vpcie.protocol.codes import MAX_PAYLOAD, FrameType

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "protocol"
BUFFER_SIZES = (frames.HEADER_SIZE + 8, 64, 256, 4096, 256 * 1024)
FrameRec = tuple[int, int, int, int, bytes, int, int]


def _run(
    stream: bytes, buffer_size: int, sink_mode: int, rng: random.Random | None
) -> tuple[list[FrameRec], bool]:
    """Feed ``stream``; return the frames (sunk bytes filled in) and whether it failed."""
    calls: list[list[bytearray] | None] = []  # one per sink call, in DATA frame order

    def sink(session: int, seq: int, offset: int, length: int) -> list[memoryview] | None:
        assert rng is not None
        if sink_mode == 1 or (sink_mode == 3 and rng.random() < 0.5):
            calls.append(None)
            return None
        cuts = sorted(rng.randrange(length + 1) for _ in range(rng.randrange(4)))
        bounds = [0, *cuts, length]
        bufs = [bytearray(b - a) for a, b in itertools.pairwise(bounds)]
        calls.append(bufs)
        return [memoryview(b) for b in bufs]

    reader = frames.FrameReader(sink if sink_mode else None, buffer_size=buffer_size)
    got: list[frames.Frame] = []
    pos = 0
    try:
        while pos < len(stream):
            buf = reader.get_buffer()
            want = rng.randrange(1, 2 + rng.randrange(600)) if rng else len(stream)
            n = min(len(buf), want, len(stream) - pos)
            assert n > 0, "FrameReader offered an empty buffer"
            buf[:n] = stream[pos : pos + n]
            pos += n
            got.extend(reader.buffer_updated(n))
    except ProtocolError:
        assert reader.dead
        return [], True
    out: list[FrameRec] = []
    data_i = 0
    for f in got:
        assert f.type in MAX_PAYLOAD
        payload = bytes(f.payload)
        if f.type == FrameType.DATA:
            assert f.data_len <= MAX_PAYLOAD[FrameType.DATA] - 8
            bufs = calls[data_i] if sink_mode else None
            data_i += 1
            if bufs is not None:
                assert payload == b""
                payload = b"".join(bufs)
            assert len(payload) == f.data_len
        else:
            assert f.data_len == 0 and f.data_offset == 0
        out.append((f.type, f.flags, f.session, f.seq, payload, f.data_offset, f.data_len))
    if sink_mode:  # one call per DATA frame, +1 for a DATA frame still incomplete
        assert len(calls) in (data_i, data_i + 1)
    return out, False


def test_one_input(data: bytes) -> None:
    if len(data) < 4:
        return
    buffer_size = BUFFER_SIZES[data[0] % len(BUFFER_SIZES)]
    sink_mode = data[1] % 4  # 0 none, 1 declines, 2 scatter, 3 mixed
    rng = random.Random(int.from_bytes(data[2:4], "little"))
    stream = data[4:]
    ref = _run(stream, 256 * 1024, 0, None)
    got = _run(stream, buffer_size, sink_mode, rng)
    assert got == ref, (got[1], ref[1], len(got[0]), len(ref[0]))


def write_seeds(corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    whole = b""
    for i, path in enumerate(sorted(GOLDEN.glob("frame_*.bin"))):
        if path.name == "frame_header.bin":
            continue
        body = path.read_bytes()
        whole += body
        (corpus / f"seed-{path.stem}").write_bytes(bytes([i, i % 4, i, 0]) + body)
    (corpus / "seed-all-frames").write_bytes(b"\x00\x02\x07\x00" + whole)
    (corpus / "seed-all-frames-small-buffer").write_bytes(b"\x01\x03\x09\x00" + whole)


def main(argv: list[str]) -> Any:
    if len(argv) == 3 and argv[1] == "--seeds":
        write_seeds(Path(argv[2]))
        return 0
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
