"""Scatter lists: DATA ranges mapped onto caller segments, chunking for H2D."""

from __future__ import annotations

import random

import pytest

from vpcie.errors import ProtocolError, VgpuError
from vpcie.tunnel import commands as cmds
from vpcie.tunnel.scatter import Scatter, byte_views


def test_slices_cover_exactly_the_range() -> None:
    rnd = random.Random(1)
    for _ in range(200):
        sizes = [rnd.choice([0, 1, 7, 4096, 5000]) for _ in range(rnd.randint(1, 8))]
        bufs = [bytearray(n) for n in sizes]
        sc = Scatter(byte_views(bufs, writable=True))
        total = sum(sizes)
        assert sc.total == total
        if total == 0:
            continue
        off = rnd.randrange(total)
        n = rnd.randint(0, total - off)
        views = sc.slice(off, n)
        assert sum(len(v) for v in views) == n
        pattern = bytes(rnd.randrange(256) for _ in range(n))
        pos = 0
        for v in views:
            v[:] = pattern[pos : pos + len(v)]
            pos += len(v)
        assert b"".join(bytes(b) for b in bufs)[off : off + n] == pattern


def test_out_of_range_is_a_protocol_error() -> None:
    sc = Scatter(byte_views([bytearray(10)], writable=True))
    with pytest.raises(ProtocolError):
        sc.slice(5, 6)


def test_chunks_split_at_the_limit() -> None:
    data = [bytes(range(256)) * 3, b"x" * 1000, b"y"]
    sc = Scatter(byte_views(data, writable=False))
    pieces = list(sc.chunks(300))
    assert [o for o, _n, _v in pieces] == list(range(0, sc.total, 300))
    assert b"".join(bytes(v) for _o, _n, vs in pieces for v in vs) == b"".join(data)
    assert sc.got == 0


def test_byte_views_refuses_readonly_for_d2h() -> None:
    with pytest.raises(VgpuError):
        byte_views([b"abc"], writable=True)


def test_copy_stream_sizes_counts_only_resource_0() -> None:
    recs = [
        cmds.copy_h2d(1, 0, 10),
        cmds.copy_d2h(1, 0, 7),
        cmds.nop(),
        cmds.copy_h2d(1, 0, 5),
    ]
    assert cmds.copy_stream_sizes(recs) == (15, 7)
    from vpcie.protocol.batch import encode_batch, rec
    from vpcie.protocol.codes import Opcode

    guest = rec(Opcode.COPY_H2D, 1, 9, 0, 0, 100)  # a guest resource: not tunnel data
    assert cmds.copy_stream_sizes(encode_batch([*recs, guest])) == (15, 7)
