"""The C walker against the Python walker: identical results, identical faults.

Random and hostile rings (loops, long chains, indirect-in-indirect, out of
bounds, tables crossing a region boundary, wrapped addresses) are walked by
both; successes must give the same segments and bytes, failures the same
ChainError kind, position and message.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vpcie import _native
from vpcie.memory import GuestMemory
from vpcie.virtqueue import ChainError, ChainFault, PythonWalker
from vpcie.virtqueue import impl as vq_impl
from vpcie.virtqueue.chain import DescChain

pytestmark = pytest.mark.skipif(
    not _native.native_available(),
    reason=f"native module not built ({_native.native_error()}): python -m vpcie._native._build",
)

K = 1024
# two regions contiguous in GPA, a hole, a third region
LAYOUT = [(0, 64 * K), (64 * K, 64 * K), (192 * K, 64 * K)]
DESC_GPA = 0x1000
# places indirect tables may live: plain, straddling the contiguous boundary, in the hole edge
TABLE_GPAS = [0x8000, 0x10000 - 0x30, 0x2F000, 0x30000 - 0x20, 192 * K]
ADDRS = [0, 0x4000, 0xFFF8, 0x1FFF0, 0x20000, 192 * K, 256 * K - 8, 256 * K, (1 << 64) - 8]


@pytest.fixture(scope="module")
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous(LAYOUT)
    yield m
    m.close()


def test_fault_numbers_match_c() -> None:
    _, lib = _native.native()
    for kind in ChainFault:
        assert getattr(lib, f"VQ_E_{kind.name}") == kind.value


def test_select_walker_modes() -> None:
    assert vq_impl.select_walker("python").name == "python"
    assert vq_impl.select_walker("native").name == "native"
    assert vq_impl.select_walker("auto").name == "native"
    with pytest.raises(ValueError):
        vq_impl.select_walker("fast")  # type: ignore[arg-type]


def test_fallback_warns_when_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_error", "pretend missing")
    monkeypatch.setattr(vq_impl, "_warned", False)
    with pytest.warns(RuntimeWarning, match="pretend missing"):
        assert vq_impl.select_walker("auto").name == "python"
    with pytest.raises(RuntimeError, match="_build"):
        vq_impl.select_walker("native")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vq_impl.select_walker("auto").name == "python"  # warned once only


flags_st = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]), st.integers(0, 0xFFFF))
addr_st = st.one_of(st.sampled_from(ADDRS), st.integers(0, 300 * K), st.integers(0, (1 << 64) - 1))
len_st = st.one_of(
    st.sampled_from([0, 1, 8, 16, 32, 48, 0x1000, 0xFFFF_FFFF, 16 * 1025]),
    st.integers(0, 0x20000),
)


@st.composite
def descriptor(draw: st.DrawFn, entries: int) -> tuple[int, int, int, int]:
    flags = draw(flags_st)
    if flags & 4 and draw(st.booleans()):
        # an indirect descriptor pointing at one of the tables
        n = draw(st.integers(1, 6))
        return (draw(st.sampled_from(TABLE_GPAS)), 16 * n, flags, draw(st.integers(0, entries + 1)))
    return (draw(addr_st), draw(len_st), flags, draw(st.integers(0, entries + 1)))


@st.composite
def ring(draw: st.DrawFn) -> tuple[int, list[list[tuple[int, int, int, int]]], int, int]:
    num = draw(st.sampled_from([1, 2, 4, 8, 16]))
    # mostly a good table; sometimes one running into the hole or starting in it
    desc_gpa = draw(st.sampled_from([DESC_GPA] * 6 + [0x20000 - 32, 0x20000, (1 << 64) - 16]))
    tables = [draw(st.lists(descriptor(num), min_size=num, max_size=num))]
    for _ in TABLE_GPAS:
        tables.append(draw(st.lists(descriptor(6), min_size=6, max_size=6)))
    max_segs = draw(st.sampled_from([1, 3, 8, 1024]))
    return num, tables, max_segs, desc_gpa


def outcome(walk: object) -> tuple[str, object]:
    try:
        chain = walk()  # type: ignore[operator]
    except ChainError as exc:
        return ("fault", (exc.key(), str(exc)))
    assert isinstance(chain, DescChain)
    return ("ok", chain)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(r=ring(), offset=st.integers(0, 70), data=st.binary(min_size=0, max_size=90))
def test_differential_python_vs_c(
    mem: GuestMemory,
    r: tuple[int, list[list[tuple[int, int, int, int]]], int, int],
    offset: int,
    data: bytes,
) -> None:
    num, tables, max_segs, desc_gpa = r
    for gpa in (0, 64 * K, 192 * K):  # wipe so every example starts from zeros
        mem.write(gpa, bytes(64 * K))
    for gpa, table in zip([desc_gpa, *TABLE_GPAS], tables, strict=True):
        for i, d in enumerate(table):
            if mem.contains(gpa + 16 * i, 16):
                mem.write(gpa + 16 * i, struct.pack("<QIHH", *d))
    py = PythonWalker(max_segs)
    from vpcie.virtqueue.native_walker import NativeWalker

    c = NativeWalker(max_segs, gather_max=64)
    for head in range(num + 1):
        a = outcome(lambda h=head: py.walk(mem, desc_gpa, num, h))  # type: ignore[misc]
        b = outcome(lambda h=head: c.walk(mem, desc_gpa, num, h))  # type: ignore[misc]
        assert a[0] == b[0], (a, b)
        event(a[0] if a[0] == "ok" else str(b[1][0][0]))  # type: ignore[index]
        if a[0] == "fault":
            assert a[1] == b[1]
            continue
        pc, cc = a[1], b[1]
        assert isinstance(pc, DescChain) and isinstance(cc, DescChain)
        assert (pc.head, pc.readable, pc.writable, pc.read_len, pc.write_len) == (
            cc.head,
            cc.readable,
            cc.writable,
            cc.read_len,
            cc.write_len,
        )
        if pc.read_len <= 1 << 20:
            assert pc.read_all() == cc.read_all()
            b1, b2 = bytearray(50), bytearray(50)
            assert pc.read_into(b1, offset) == cc.read_into(b2, offset)
            assert b1 == b2
        if pc.write_len <= 1 << 20:
            snap = [mem.read(g, 64 * K) for g, _ in LAYOUT]
            n1 = pc.write(data, offset)
            after_py = [mem.read(g, 64 * K) for g, _ in LAYOUT]
            for (g, _), s in zip(LAYOUT, snap, strict=True):
                mem.write(g, s)
            n2 = cc.write(data, offset)
            after_c = [mem.read(g, 64 * K) for g, _ in LAYOUT]
            assert n1 == n2 and after_py == after_c


def test_indirect_table_across_contiguous_regions(mem: GuestMemory) -> None:
    """A table straddling two GPA-contiguous regions is valid for both walkers."""
    table_gpa = 0x10000 - 16
    mem.write(
        table_gpa, struct.pack("<QIHH", 0x5000, 4, 1, 1) + struct.pack("<QIHH", 0x6000, 4, 2, 0)
    )
    mem.write(DESC_GPA, struct.pack("<QIHH", table_gpa, 32, 4, 0))
    from vpcie.virtqueue.native_walker import NativeWalker

    for walker in (PythonWalker(), NativeWalker()):
        chain = walker.walk(mem, DESC_GPA, 1, 0)
        assert chain.readable == [(0x5000, 4)] and chain.writable == [(0x6000, 4)]


def test_chain_too_big_needs_4gib() -> None:
    """Two 2 GiB buffers exceed MAX_CHAIN_BYTES (used.len is a u32). Sparse memfd."""
    from vpcie.virtqueue.native_walker import NativeWalker

    size = (1 << 32) + 0x10000
    with GuestMemory.anonymous([(0, size)]) as big:
        big.write(0, struct.pack("<QIHH", 0x10000, 0x8000_0000, 1, 1))
        big.write(16, struct.pack("<QIHH", 0x10000, 0x8000_0000, 0, 0))
        keys = []
        for walker in (PythonWalker(), NativeWalker()):
            with pytest.raises(ChainError) as info:
                walker.walk(big, 0, 2, 0)
            keys.append(info.value.key())
        assert keys[0] == keys[1] and keys[0][0] is ChainFault.CHAIN_TOO_BIG


# -- the ring layer: VirtQueue.serve, Python state vs struct vq_ring ------------------
AVAIL_GPA, USED_GPA = 0x3000, 0x3800


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    r=ring(),
    start=st.sampled_from([0, 5, 0xFFFE, 0xFFFF]),
    ahead=st.one_of(
        st.integers(0, 4), st.integers(0, 4), st.integers(0, 4), st.integers(0, 0xFFFF)
    ),
    heads=st.lists(st.integers(0, 20), min_size=16, max_size=16),
    limit=st.integers(1, 20),
    max_request=st.sampled_from([16, 64, 4096]),
    answer=st.binary(max_size=64),
    event_idx=st.booleans(),
)
def test_serve_differential_python_vs_c(
    mem: GuestMemory,
    r: tuple[int, list[list[tuple[int, int, int, int]]], int, int],
    start: int,
    ahead: int,
    heads: list[int],
    limit: int,
    max_request: int,
    answer: bytes,
    event_idx: bool,
) -> None:
    """Hostile avail rings and descriptor tables through serve() on both
    implementations: the same requests reach the handler, the same bytes land
    in guest memory, the same used ring and indices, the same error."""
    from vpcie.errors import GuestError
    from vpcie.virtqueue import VirtQueue

    num, tables, max_segs, _ = r
    for gpa in (0, 64 * K, 192 * K):
        mem.write(gpa, bytes(64 * K))
    for gpa, table in zip([DESC_GPA, *TABLE_GPAS], tables, strict=True):
        for i, d in enumerate(table):
            if mem.contains(gpa + 16 * i, 16):
                mem.write(gpa + 16 * i, struct.pack("<QIHH", *d))
    for i in range(num):  # avail ring entries (heads may be out of range)
        mem.write(AVAIL_GPA + 4 + 2 * i, struct.pack("<H", heads[i]))
    mem.write(AVAIL_GPA + 2, struct.pack("<H", (start + ahead) & 0xFFFF))
    mem.write(USED_GPA + 2, struct.pack("<H", start))
    snapshot = [mem.read(g, 64 * K) for g, _ in LAYOUT]
    results = []
    for impl in ("python", "native"):
        for (g, _), s in zip(LAYOUT, snapshot, strict=True):
            mem.write(g, s)
        vq = VirtQueue(
            mem, num, DESC_GPA, AVAIL_GPA, USED_GPA, event_idx=event_idx, impl=impl,  # type: ignore[arg-type]
            max_segments=max_segs,
        )  # fmt: skip
        vq.last_avail_idx = start
        calls: list[tuple[bytes, int]] = []

        def handle(request: bytes, read_len: int, calls: list[tuple[bytes, int]] = calls) -> bytes:
            calls.append((request, read_len))
            return request[::-1] + answer

        try:
            outcome: object = vq.serve(handle, limit, max_request)
        except GuestError as exc:
            outcome = ("error", str(exc))
        notify = vq.needs_notify()
        results.append(
            (outcome, calls, vq.last_avail_idx, vq.used_idx, notify,
             [mem.read(g, 64 * K) for g, _ in LAYOUT])
        )  # fmt: skip
        event(f"served {outcome}" if isinstance(outcome, int) else "avail too far ahead")
    assert results[0] == results[1]


@pytest.mark.parametrize(
    "module",
    [
        "vpcie.virtqueue.native_ring",
        "vpcie.virtqueue.native_walker",
        "vpcie.virtqueue.device",
        "vpcie.gpu.device",
    ],
)
def test_modules_import_first(module: str) -> None:
    """No import cycle: each module can be the first one a program imports."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
