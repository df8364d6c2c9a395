"""Split virtqueue, device side against driver side; hostile chains give clean GuestErrors.

Every test runs on both walkers (pure Python and, when built, native C).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from vpcie._native import native_available
from vpcie.errors import GuestError
from vpcie.memory import GuestMemory
from vpcie.protocol.virtq import (
    REQUEST_PREFIX,
)
from vpcie.protocol.virtq import (
    VIRTQ_DESC_F_INDIRECT as INDIRECT,
)
from vpcie.protocol.virtq import (
    VIRTQ_DESC_F_NEXT as NEXT,
)
from vpcie.protocol.virtq import (
    VIRTQ_DESC_F_WRITE as WRITE,
)
from vpcie.virtqueue import (
    MAX_CHAIN_SEGMENTS,
    MAX_INDIRECT_ENTRIES,
    ChainError,
    ChainFault,
    DriverQueue,
    GuestAllocator,
    VirtQueue,
)
from vpcie.virtqueue.chain import DescChain
from vpcie.virtqueue.reply import withheld

MiB = 1 << 20
RAM = 4 * MiB
IMPLS = [
    "python",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(
            not native_available(), reason="native module not built: python -m vpcie._native._build"
        ),
    ),
]


class Pair:
    def __init__(self, impl: str, num: int = 16, event_idx: bool = False) -> None:
        self.mem = GuestMemory.anonymous([(0, RAM)])
        self.alloc = GuestAllocator(self.mem, 0x1000, RAM - 0x1000)
        self.drv = DriverQueue(self.mem, num, self.alloc, event_idx=event_idx)
        self.dev = VirtQueue(
            self.mem,
            num,
            self.drv.desc_gpa,
            self.drv.avail_gpa,
            self.drv.used_gpa,
            event_idx=event_idx,
            impl=impl,  # type: ignore[arg-type]
        )
        assert self.dev.impl == impl

    def buf(self, n: int) -> tuple[int, int]:
        return (self.alloc.alloc(n), n)

    def table(self, descs: list[tuple[int, int, int, int]]) -> int:
        gpa = self.alloc.alloc(16 * len(descs))
        self.mem.write(gpa, b"".join(struct.pack("<QIHH", *d) for d in descs))
        return gpa

    def pop_error(self) -> ChainError:
        self.drv.kick()
        with pytest.raises(ChainError) as info:
            self.dev.pop()
        assert isinstance(info.value, GuestError)
        return info.value


@pytest.fixture(params=IMPLS)
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    p = Pair(request.param)
    yield p
    p.mem.close()


@pytest.mark.parametrize("indirect", [False, True])
def test_roundtrip_request_response(pair: Pair, indirect: bool) -> None:
    resp = pair.buf(64)
    resp2 = pair.buf(8)
    head = pair.drv.add([b"GET ", b"/index"], [resp, resp2], indirect=indirect)
    assert pair.dev.pop() is None  # not published yet
    assert pair.drv.kick()
    chain = pair.dev.pop()
    assert chain is not None and chain.head == head
    assert chain.read_len == 10 and chain.write_len == 72
    assert chain.read_all() == b"GET /index"
    assert [n for _, n in chain.readable] == [4, 6]
    assert chain.writable == [resp, resp2]
    buf = bytearray(4)
    assert chain.read_into(buf, offset=3) == 4 and buf == b" /in"
    assert chain.write(b"A" * 70) == 70
    assert chain.write(b"xyz", offset=70) == 2  # only 2 bytes left: truncated
    pair.dev.push(chain.head, 72)
    assert pair.dev.pop() is None
    assert pair.drv.get_used() == [(head, 72)]
    assert pair.mem.read(resp[0], 64) == b"A" * 64
    assert pair.mem.read(resp2[0], 8) == b"A" * 6 + b"xy"
    assert pair.drv.num_free == 16


def test_large_request_not_inlined(pair: Pair) -> None:
    payload = bytes(range(256)) * 40  # 10 KiB: above the native inline gather size
    head = pair.drv.add([payload[:5000], payload[5000:]], [pair.buf(4)])
    pair.drv.kick()
    chain = pair.dev.pop()
    assert chain is not None and chain.head == head
    assert chain.read_all() == payload
    buf = bytearray(100)
    assert chain.read_into(buf, 4990) == 100 and bytes(buf) == payload[4990:5090]


def test_used_ring_content_and_wraparound(pair: Pair) -> None:
    """Run the 16-bit indices through 65535 -> 0 on both sides."""
    start = 0xFFF0
    pair.dev.last_avail_idx = start
    pair.drv._avail_idx = pair.drv._published = pair.drv._last_used = start
    pair.mem.write_u16(pair.drv.used_gpa + 2, start)
    pair.dev = VirtQueue(
        pair.mem,
        16,
        pair.drv.desc_gpa,
        pair.drv.avail_gpa,
        pair.drv.used_gpa,
        impl=pair.dev.impl,  # type: ignore[arg-type]
    )
    pair.dev.last_avail_idx = start
    assert pair.dev.used_idx == start
    seen = 0
    for round_ in range(5):
        heads = [pair.drv.add([bytes([round_, i])], [pair.buf(4)]) for i in range(7)]
        pair.drv.kick()
        for i, head in enumerate(heads):
            chain = pair.dev.pop()
            assert chain is not None and chain.head == head
            assert chain.read_all() == bytes([round_, i])
            slot = pair.dev.used_idx % 16
            pair.dev.push(chain.head, 100 + i)
            elem = pair.mem.read(pair.drv.used_gpa + 4 + 8 * slot, 8)
            assert struct.unpack("<II", elem) == (head, 100 + i)
        assert pair.drv.get_used() == [(h, 100 + i) for i, h in enumerate(heads)]
        seen += 7
    assert pair.dev.last_avail_idx == (start + seen) & 0xFFFF
    assert pair.mem.read_u16(pair.drv.used_gpa + 2) == (start + seen) & 0xFFFF
    assert pair.dev.last_avail_idx < start  # really wrapped


def test_avail_idx_too_far_ahead(pair: Pair) -> None:
    pair.mem.write_u16(pair.drv.avail_gpa + 2, 17)
    with pytest.raises(GuestError, match="more than queue size"):
        pair.dev.pop()


def test_head_out_of_range(pair: Pair) -> None:
    pair.drv.add_raw_head(16)
    err = pair.pop_error()
    assert err.kind is ChainFault.HEAD_OUT_OF_RANGE and err.head == 16


def test_loop_in_table(pair: Pair) -> None:
    a = pair.buf(8)
    pair.drv.write_desc(0, a[0], 8, NEXT, 1)
    pair.drv.write_desc(1, a[0], 8, NEXT, 2)
    pair.drv.write_desc(2, a[0], 8, NEXT, 0)  # back to 0
    pair.drv.add_raw_head(0)
    err = pair.pop_error()
    assert err.kind is ChainFault.LOOP and err.head == 0
    assert "loops" in str(err)


def test_self_loop_in_indirect_table(pair: Pair) -> None:
    a = pair.buf(8)
    t = pair.table([(a[0], 8, NEXT, 1), (a[0], 8, NEXT, 1)])
    pair.drv.write_desc(3, t, 32, INDIRECT, 0)
    pair.drv.add_raw_head(3)
    err = pair.pop_error()
    assert err.kind is ChainFault.LOOP and err.indirect


def test_chain_longer_than_segment_cap(pair: Pair) -> None:
    a = pair.buf(8)
    n = MAX_INDIRECT_ENTRIES
    t = pair.table([(a[0], 8, NEXT, i + 1) for i in range(n - 1)] + [(a[0], 8, 0, 0)])
    pair.drv.write_desc(0, t, 16 * n, INDIRECT, 0)
    pair.drv.add_raw_head(0)
    pair.drv.kick()
    chain = pair.dev.pop()
    assert chain is not None and len(chain.readable) == n  # exactly the cap is fine
    # a direct descriptor before the full indirect table pushes it over the cap
    pair.drv.write_desc(1, a[0], 8, NEXT, 2)
    pair.drv.write_desc(2, t, 16 * n, INDIRECT, 0)
    pair.drv.add_raw_head(1)
    err = pair.pop_error()
    assert err.kind is ChainFault.TOO_MANY_SEGMENTS and MAX_CHAIN_SEGMENTS == n


@pytest.mark.parametrize(
    ("descs", "kind"),
    [
        # indirect inside an indirect table (§2.7.5.3.1)
        ("nested", ChainFault.NESTED_INDIRECT),
        ("indirect_next", ChainFault.INDIRECT_WITH_NEXT),
        ("indirect_len0", ChainFault.INDIRECT_BAD_LEN),
        ("indirect_len17", ChainFault.INDIRECT_BAD_LEN),
        ("indirect_huge", ChainFault.INDIRECT_TOO_LARGE),
        ("indirect_oob", ChainFault.INDIRECT_OUT_OF_RANGE),
        ("buffer_oob", ChainFault.BUFFER_OUT_OF_RANGE),
        ("buffer_wrap", ChainFault.BUFFER_OUT_OF_RANGE),
        ("read_after_write", ChainFault.READABLE_AFTER_WRITABLE),
        ("next_oob", ChainFault.NEXT_OUT_OF_RANGE),
        ("indirect_next_oob", ChainFault.NEXT_OUT_OF_RANGE),
    ],
)
def test_hostile_chains(pair: Pair, descs: str, kind: ChainFault) -> None:
    a = pair.buf(64)
    w = pair.drv.write_desc
    if descs == "nested":
        inner = pair.table([(a[0], 8, 0, 0)])
        t = pair.table([(a[0], 8, NEXT, 1), (inner, 16, INDIRECT, 0)])
        w(0, t, 32, INDIRECT, 0)
    elif descs == "indirect_next":
        t = pair.table([(a[0], 8, 0, 0)])
        w(0, t, 16, INDIRECT | NEXT, 1)
        w(1, a[0], 8, 0, 0)
    elif descs == "indirect_len0":
        w(0, a[0], 0, INDIRECT, 0)
    elif descs == "indirect_len17":
        w(0, a[0], 17, INDIRECT, 0)
    elif descs == "indirect_huge":
        w(0, a[0], 16 * (MAX_INDIRECT_ENTRIES + 1), INDIRECT, 0)
    elif descs == "indirect_oob":
        w(0, RAM - 16, 32, INDIRECT, 0)
    elif descs == "buffer_oob":
        w(0, a[0], 8, NEXT, 1)
        w(1, RAM - 4, 8, WRITE, 0)
    elif descs == "buffer_wrap":
        w(0, (1 << 64) - 8, 0xFFFF_FFFF, 0, 0)
    elif descs == "read_after_write":
        w(0, a[0], 8, WRITE | NEXT, 1)
        w(1, a[0], 8, 0, 0)
    elif descs == "next_oob":
        w(0, a[0], 8, NEXT, 16)
    elif descs == "indirect_next_oob":
        t = pair.table([(a[0], 8, NEXT, 1), (a[0], 8, NEXT, 2)])
        w(0, t, 32, INDIRECT, 0)
    pair.drv.add_raw_head(0)
    err = pair.pop_error()
    assert err.kind is kind, str(err)
    assert err.head == 0
    # the queue keeps serving: hand the head back, then a good chain works
    pair.dev.push(0, 0)
    good = pair.drv.add([b"ok"], [])
    pair.drv.kick()
    chain = pair.dev.pop()
    assert chain is not None and chain.head == good and chain.read_all() == b"ok"


def test_zero_length_buffers_allowed(pair: Pair) -> None:
    pair.drv.write_desc(0, RAM + 0x1000, 0, NEXT, 1)  # zero length: never touched
    pair.drv.write_desc(1, 0x2000, 4, WRITE, 0)
    pair.drv.add_raw_head(0)
    pair.drv.kick()
    chain = pair.dev.pop()
    assert chain is not None and chain.read_all() == b"" and chain.write_len == 4


def test_indirect_write_flag_on_table_descriptor_ignored(pair: Pair) -> None:
    a = pair.buf(4)
    t = pair.table([(a[0], 4, 0, 0)])
    pair.drv.write_desc(0, t, 16, INDIRECT | WRITE, 0)  # §2.7.5.3.1: device ignores WRITE
    pair.drv.add_raw_head(0)
    pair.drv.kick()
    chain = pair.dev.pop()
    assert chain is not None and chain.readable == [a]


@pytest.mark.parametrize(
    ("num", "desc", "avail", "used"),
    [
        (3, 0x1000, 0x2000, 0x3000),
        (16, 0x1008, 0x2000, 0x3000),
        (16, 0x1000, 0x2001, 0x3000),
        (16, 0x1000, 0x2000, 0x3002),
        (16, RAM - 16, 0x2000, 0x3000),
        (65536, 0, 0x100000, 0x200000),
    ],
)
def test_bad_queue_setup(num: int, desc: int, avail: int, used: int) -> None:
    with GuestMemory.anonymous([(0, RAM)]) as mem, pytest.raises(GuestError):
        VirtQueue(mem, num, desc, avail, used, impl="python")


def test_from_uva_and_reset() -> None:
    with GuestMemory.anonymous([(0, RAM)]) as mem:
        alloc = GuestAllocator(mem, 0x1000, RAM - 0x1000)
        drv = DriverQueue(mem, 8, alloc)
        uva = mem.table[0].user_addr
        dev = VirtQueue.from_uva(
            mem, 8, uva + drv.desc_gpa, uva + drv.avail_gpa, uva + drv.used_gpa, impl="python"
        )
        assert (dev.desc_gpa, dev.avail_gpa, dev.used_gpa) == (
            drv.desc_gpa,
            drv.avail_gpa,
            drv.used_gpa,
        )
        drv.add([b"x"], [])
        drv.kick()
        assert dev.pop() is not None
        assert dev.last_avail_idx == 1
        dev.reset()
        assert dev.last_avail_idx == 0 and dev.used_idx == 0
        with pytest.raises(GuestError):
            VirtQueue.from_uva(mem, 8, uva + RAM - 16, uva, uva + 0x1000, impl="python")


def test_closed_memory_chain_refuses(pair: Pair) -> None:
    pair.drv.add([b"abc"], [pair.buf(8)])
    pair.drv.kick()
    chain = pair.dev.pop()
    assert chain is not None
    pair.mem.close()
    with pytest.raises(GuestError):
        chain.write(b"late")
    pair.mem = GuestMemory.anonymous([(0, MiB)])  # for the fixture's close()


# -- serve(): a whole kick, request bytes in, response bytes out -------------------------
def test_serve_answers_each_request(pair: Pair) -> None:
    seen: list[tuple[bytes, int]] = []

    def handle(request: bytes, read_len: int) -> bytes:
        seen.append((request, read_len))
        return request.upper() + b"!"

    bufs = [pair.buf(8) for _ in range(3)]
    heads = [
        pair.drv.add([b"ab", b"c"], [bufs[0]]),
        pair.drv.add([b"hello"], [bufs[1]], indirect=True),
        pair.drv.add([b"x"], [bufs[2]]),
    ]
    pair.drv.kick()
    assert pair.dev.serve(handle, 2, 100) == 2  # the limit holds
    assert pair.dev.serve(handle, 10, 100) == 1
    assert pair.dev.serve(handle, 10, 100) == 0
    assert seen == [(b"abc", 3), (b"hello", 5), (b"x", 1)]
    assert pair.drv.get_used() == list(zip(heads, [4, 6, 2], strict=True))
    assert pair.mem.read(bufs[1][0], 6) == b"HELLO!"
    assert pair.dev.needs_notify()


def test_serve_withholds_a_response_and_answers_it_later(pair: Pair) -> None:
    """A Withheld response leaves its chain out of the used ring (the next
    chains are returned past it); VirtQueue.answer returns it later, with
    the response written into the chain's own buffers."""
    kept: list[DescChain] = []

    def handle(request: bytes, read_len: int) -> bytes:
        if request == b"later":
            return withheld(b"done", kept.append)
        return b"now"

    bufs = [pair.buf(8), pair.buf(8)]
    first = pair.drv.add([b"later"], [bufs[0]], indirect=True)
    second = pair.drv.add([b"x"], [bufs[1]])
    pair.drv.kick()
    assert pair.dev.serve(handle, 8, 64) == 2
    assert pair.drv.get_used() == [(second, 3)]
    assert len(kept) == 1 and kept[0].head == first
    pair.dev.answer(kept[0], b"done")
    assert pair.drv.get_used() == [(first, 4)]
    assert pair.mem.read(bufs[0][0], 4) == b"done"


def test_serve_truncates_long_requests_and_responses(pair: Pair) -> None:
    big = bytes(range(256)) * 20
    out = pair.buf(10)
    head = pair.drv.add([big[:3000], big[3000:]], [out])
    pair.drv.kick()
    got: list[tuple[bytes, int]] = []

    def handle(request: bytes, read_len: int) -> bytes:
        got.append((request, read_len))
        return b"R" * 50  # more than the chain can take

    assert pair.dev.serve(handle, 4, 4096) == 1
    assert got == [(big[:REQUEST_PREFIX], len(big))]  # over max_request: the prefix only
    assert pair.drv.get_used() == [(head, 10)]
    assert pair.mem.read(out[0], 10) == b"R" * 10
    # Under the limit the whole request arrives, also past the inline gather size.
    head = pair.drv.add([big], [pair.buf(4)])
    pair.drv.kick()
    got.clear()
    assert pair.dev.serve(handle, 4, 1 << 20) == 1 and got == [(big, len(big))]


def test_serve_returns_bad_chains_and_keeps_going(pair: Pair) -> None:
    # Head 0: an indirect table whose only entry is itself indirect (nested).
    table = pair.table([(0, 16, INDIRECT, 0)])
    pair.drv.write_desc(0, table, 16, INDIRECT, 0)
    pair.drv._free.remove(0)
    pair.drv._chains[0] = [0]
    pair.drv.add_raw_head(0)
    good = pair.drv.add([b"ok"], [pair.buf(4)])
    pair.drv.kick()
    assert pair.dev.serve(lambda req, n: b"fine", 8, 64) == 2
    assert pair.drv.get_used() == [(0, 0), (good, 4)]


def test_serve_gives_the_chain_back_when_the_handler_fails(pair: Pair) -> None:
    head = pair.drv.add([b"boom"], [pair.buf(4)])
    pair.drv.kick()

    def handle(request: bytes, read_len: int) -> bytes:
        raise RuntimeError("device bug")

    with pytest.raises(RuntimeError):
        pair.dev.serve(handle, 8, 64)
    assert pair.drv.get_used() == [(head, 0)]


def test_serve_refuses_avail_too_far_ahead(pair: Pair) -> None:
    pair.mem.write_u16(pair.drv.avail_gpa + 2, 17)
    with pytest.raises(GuestError, match="more than queue size"):
        pair.dev.serve(lambda req, n: b"", 8, 64)
    assert pair.dev.last_avail_idx == 0  # nothing consumed


def test_native_and_python_rings_agree() -> None:
    """The same driver traffic through both implementations leaves the same
    used ring, indices and avail_event behind (EVENT_IDX on)."""
    if not native_available():
        pytest.skip("native module not built")
    outcomes = []
    for impl in ("python", "native"):
        p = Pair(impl, num=8, event_idx=True)
        trace: list[object] = []
        for round_ in range(40):  # wraps the 8-entry ring many times
            for i in range(round_ % 5 + 1):
                p.drv.add([bytes([round_, i]) * (i + 1)], [p.buf(3)], indirect=bool(i % 2))
            p.drv.kick()
            served = p.dev.serve(lambda req, n: req[::-1], 3, 64)
            trace.append((served, p.dev.needs_notify(), p.dev.last_avail_idx, p.dev.used_idx))
            trace.append(p.mem.read(p.drv.used_gpa, 6 + 8 * 8))
            trace.append(p.drv.get_used())
            while p.dev.serve(lambda req, n: req, 8, 64):
                pass
            trace.append(p.drv.get_used())
        outcomes.append(trace)
        p.mem.close()
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("impl", IMPLS)
def test_indirect_table_across_two_regions(impl: str) -> None:
    """The driver writes an indirect table with one store when it lies in one
    region and piecewise when it crosses two; the device reads both alike."""
    half = RAM // 2
    with GuestMemory.anonymous([(0, half), (half, half)]) as mem:
        # Rings low; tables and buffers from just below the boundary, so the
        # first 16-entry (256-byte) table crosses into the second region.
        drv = DriverQueue(mem, 16, GuestAllocator(mem, 0x1000, 0x10000))
        dev = VirtQueue(
            mem,
            16,
            drv.desc_gpa,
            drv.avail_gpa,
            drv.used_gpa,
            impl=impl,  # type: ignore[arg-type]
        )
        drv.alloc = GuestAllocator(mem, half - 0x80, 0x10000)
        resp = (half + 0x1000, 32)
        for want in (b"crossing", b"after"):
            head = drv.add([want], [resp], indirect=True)
            assert drv.kick()
            chain = dev.pop()
            assert chain is not None and chain.head == head and chain.read_all() == want
            assert chain.writable == [resp]
            dev.push(head, 0)
            assert drv.get_used() == [(head, 0)]
        table, cap, view = drv._tables[head]
        assert table < half < table + 16 * cap and view is None  # the piecewise path ran
