"""FrameReader.stop_after: the agent acts on a COMMAND before the header of the
DATA behind it is parsed, so that DATA lands straight in its destination."""

from __future__ import annotations

from vpcie.protocol.codes import FrameType
from vpcie.protocol.frames import FrameReader, data_frame_header, encode_frame


def test_pause_after_command_lets_the_sink_see_the_command_first() -> None:
    payload = bytes(range(200)) * 5
    stream = (
        encode_frame(FrameType.COMMAND, b"cmd-1", session=1, seq=1)
        + data_frame_header(1, 1, 0, len(payload), last=True)
        + payload
        + encode_frame(FrameType.COMMAND, b"cmd-2", session=1, seq=2)
        + encode_frame(FrameType.PING, bytes(8), session=1, seq=0)
    )
    landing: dict[int, bytearray] = {}
    seen: list[int] = []

    def sink(session: int, seq: int, offset: int, n: int) -> list[memoryview] | None:
        if seq not in seen:  # the COMMAND has not been handled: nowhere to land
            return None
        landing[seq] = bytearray(n)
        return [memoryview(landing[seq])]

    r = FrameReader(sink, stop_after=frozenset({FrameType.COMMAND}))
    buf = r.get_buffer()
    buf[: len(stream)] = stream
    frames = r.buffer_updated(len(stream))
    assert [f.seq for f in frames] == [1] and r.more
    seen.append(1)
    frames = r.buffer_updated(0)
    assert [(f.type, f.seq) for f in frames] == [(FrameType.DATA, 1), (FrameType.COMMAND, 2)]
    assert frames[0].payload == b"" and bytes(landing[1]) == payload  # sunk, not copied
    assert r.more
    frames = r.buffer_updated(0)
    assert [f.type for f in frames] == [FrameType.PING] and not r.more


def test_without_stop_after_everything_comes_at_once() -> None:
    stream = b"".join(encode_frame(FrameType.COMMAND, b"x", session=1, seq=i) for i in range(5))
    r = FrameReader()
    r.get_buffer()[: len(stream)] = stream
    assert len(r.buffer_updated(len(stream))) == 5 and not r.more
