"""GuestMemory: every access range-checked, cross-region rules, UVA, offset mmaps."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator

import pytest

from vpcie.errors import GuestError, ProtocolError
from vpcie.memory import PAGE_SIZE, GuestMemory, MemoryRegion, MemoryTable

MiB = 1 << 20


@pytest.fixture
def contiguous() -> Iterator[GuestMemory]:
    # two regions back to back in GPA: [0, 1M) and [1M, 2M), plus a far one
    mem = GuestMemory.anonymous([(0, MiB), (MiB, MiB), (8 * MiB, MiB)])
    yield mem
    mem.close()


def test_read_write_roundtrip(contiguous: GuestMemory) -> None:
    contiguous.write(0x1234, b"hello guest")
    assert contiguous.read(0x1234, 11) == b"hello guest"
    buf = bytearray(5)
    assert contiguous.read_into(0x1234, buf) == 5
    assert buf == b"hello"


def test_int_helpers_little_endian(contiguous: GuestMemory) -> None:
    contiguous.write_u16(0x10, 0xBEEF)
    contiguous.write_u32(0x20, 0xDEADBEEF)
    contiguous.write_u64(0x30, 0x0123456789ABCDEF)
    assert contiguous.read(0x10, 2) == b"\xef\xbe"
    assert contiguous.read_u16(0x10) == 0xBEEF
    assert contiguous.read_u32(0x20) == 0xDEADBEEF
    assert contiguous.read_u64(0x30) == 0x0123456789ABCDEF
    # an integer straddling the contiguous boundary still works
    contiguous.write_u64(MiB - 4, 0x1122334455667788)
    assert contiguous.read_u64(MiB - 4) == 0x1122334455667788


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (2 * MiB - 1, 2),  # runs off the end of the contiguous pair
        (2 * MiB, 1),  # hole
        (9 * MiB - 8, 16),  # off the end of the far region
        (8 * MiB - 1, 2),  # starts in the hole
        (-1, 1),
        ((1 << 64) - 4, 8),  # wraps past 2**64
        (0, -1),
    ],
)
def test_out_of_range_rejected_everywhere(contiguous: GuestMemory, gpa: int, length: int) -> None:
    assert not contiguous.contains(gpa, length)
    ops: list[Callable[[], object]] = [
        lambda: contiguous.read(gpa, length),
        lambda: contiguous.views(gpa, length),
        lambda: contiguous.view(gpa, length),
    ]
    if length > 0:
        ops.append(lambda: contiguous.write(gpa, b"x" * length))
        ops.append(lambda: contiguous.read_into(gpa, bytearray(length)))
    if length == 2:
        ops.append(lambda: contiguous.read_u16(gpa))
        ops.append(lambda: contiguous.write_u16(gpa, 1))
    for op in ops:
        with pytest.raises(GuestError):
            op()


def test_cross_region_contiguous(contiguous: GuestMemory) -> None:
    data = bytes(range(256)) * 4
    contiguous.write(MiB - 100, data)
    assert contiguous.read(MiB - 100, len(data)) == data
    views = contiguous.views(MiB - 100, len(data))
    assert [len(v) for v in views] == [100, len(data) - 100]
    assert b"".join(bytes(v) for v in views) == data
    with pytest.raises(GuestError, match="spans two regions"):
        contiguous.view(MiB - 100, len(data))


def test_cross_region_not_contiguous() -> None:
    with GuestMemory.anonymous([(0, MiB), (MiB + PAGE_SIZE, MiB)]) as mem:
        assert mem.contains(MiB - 8, 8)
        with pytest.raises(GuestError, match="not contiguous"):
            mem.views(MiB - 8, 16)
        with pytest.raises(GuestError):
            mem.write(MiB - 8, bytes(16))


def test_zero_length(contiguous: GuestMemory) -> None:
    assert contiguous.read(0, 0) == b""
    assert contiguous.read(2 * MiB, 0) == b""  # nothing touched, always valid
    assert contiguous.views(5 * MiB, 0) == []
    assert len(contiguous.view(5 * MiB, 0)) == 0
    assert contiguous.write(5 * MiB, b"") == 0


def test_uva_translation(contiguous: GuestMemory) -> None:
    r0, r1, r2 = contiguous.table
    assert contiguous.uva_to_gpa(r1.user_addr + 0x40, 16) == MiB + 0x40
    assert contiguous.uva_to_gpa(r2.user_addr, MiB) == 8 * MiB
    with pytest.raises(GuestError):
        contiguous.uva_to_gpa(r2.user_addr + MiB - 4, 8)  # runs off the region
    with pytest.raises(GuestError):
        contiguous.uva_to_gpa(r0.user_addr - 1, 1)


def test_offset_mmap_unaligned_offset() -> None:
    """A region whose mmap_offset is not page aligned: map aligned-down and slice."""
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4 * PAGE_SIZE)
        marker = b"MARK"
        os.pwrite(fd, marker, PAGE_SIZE + 24)
        region = MemoryRegion(0x10000, 2 * PAGE_SIZE, 0x5000_0000, PAGE_SIZE + 24, fd)
        with GuestMemory([region]) as mem:
            assert mem.read(0x10000, 4) == marker
            mem.write(0x10000 + 4, b"!")
            assert os.pread(fd, 5, PAGE_SIZE + 24) == b"MARK!"
            with pytest.raises(GuestError):
                mem.read(0x10000 + 2 * PAGE_SIZE - 1, 2)
    finally:
        os.close(fd)


def test_shared_mapping_is_visible_through_fd() -> None:
    with GuestMemory.anonymous([(0x4000_0000, MiB)]) as mem:
        (fd,) = mem.fds
        mem.write(0x4000_0010, b"shared")
        with mmap.mmap(fd, MiB) as mm:
            assert mm[0x10:0x16] == b"shared"


@pytest.mark.parametrize(
    "regions",
    [
        [(0, MiB), (MiB // 2, MiB)],  # overlap
        [(0, 0)],  # empty region
        [((1 << 64) - PAGE_SIZE, 2 * PAGE_SIZE)],  # wraps
    ],
)
def test_bad_tables_are_protocol_errors(regions: list[tuple[int, int]]) -> None:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4 * MiB)
        table = [
            MemoryRegion(g, s, 0x1000_0000 + i * 4 * MiB, 0, fd) for i, (g, s) in enumerate(regions)
        ]
        with pytest.raises(ProtocolError):
            GuestMemory(table)
    finally:
        os.close(fd)


def test_closed_memory_refuses_access() -> None:
    mem = GuestMemory.anonymous([(0, MiB)])
    mem.close()
    assert mem.closed
    with pytest.raises(GuestError):
        mem.read(0, 1)
    assert not mem.contains(0, 1)
    mem.close()  # idempotent


def test_memory_table_retires_a_table_in_use() -> None:
    """A new table (memory hotplug) is installed at once; the old one stays
    mapped for the work that holds it and is closed by its last release."""
    old = GuestMemory.anonymous([(0, MiB)])
    new = GuestMemory.anonymous([(0, 2 * MiB)])
    table = MemoryTable(old)
    with table.chain() as mem:
        assert mem is old and table.in_flight == 1
        held = table.acquire()  # a second user of the same table (a batch on the wire)
        table.replace(new)
        assert table.mem is new and table.retired == 1 and not old.closed
        old.write(0, b"still mapped")
    assert not old.closed  # the batch still holds it
    with table.chain() as cur:
        assert cur is new
    table.release(held)
    assert old.closed and table.retired == 0 and table.in_flight == 0
    with pytest.raises(RuntimeError):
        table.release(held)
    table.close()
    assert new.closed and not table.present
    with pytest.raises(ProtocolError):
        _ = table.mem


def test_memory_table_close_with_users_defers_unmap() -> None:
    mem = GuestMemory.anonymous([(0, MiB)])
    table = MemoryTable(mem)
    held = table.acquire()
    table.close()  # the frontend went away while a batch was on the wire
    assert not table.present and not mem.closed
    table.release(held)
    assert mem.closed
