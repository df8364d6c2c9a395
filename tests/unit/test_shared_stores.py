"""Stores the guest reads while we write them are single stores: never a transient value.

``struct.pack_into`` zero-fills its target before packing, so a vCPU reading
``used.idx`` at that moment sees 0 (Linux then takes a stale used element:
"id N is not a head", a broken ring) and a driver reading ``avail_event``
sees 0 (a missed kick: a hang). A reader in another process watches each
published field while this process updates it as fast as it can; it must
never see a value that was not published (see _watch).

The watcher is a forked child sharing the memfd mapping, so it runs on the
other CPU while the parent writes. The loops are bounded in count and time.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import wait_for
from vpcie._native import native_available
from vpcie.gpu.fencepage import FENCE_PAGE_SIZE, HEADER_ST, SLOT_ST, FencePage
from vpcie.memory import GuestMemory, word_view
from vpcie.protocol.virtq import USED_IDX, avail_event_offset
from vpcie.virtqueue import DriverQueue, GuestAllocator, VirtQueue
from vpcie.virtqueue.impl import Impl

RAM = 1 << 20
NUM = 256
WRITES = 120_000  # per round; each round restarts the value at 1, so no wrap to 0
ROUNDS = 3
WATCH_LIMIT_S = 20.0
_STOP = struct.Struct("<I")


class Watch:
    """A child process that reads a little-endian word at ``gpa`` until told to
    stop (a flag word at ``stop_gpa``) and reports how many transient values it
    saw (see _watch). The word after the flag says the child has started."""

    def __init__(self, mem: GuestMemory, gpa: int, size: int, stop_gpa: int) -> None:
        self.mem, self.stop_gpa = mem, stop_gpa
        mem.write(stop_gpa, _STOP.pack(0) + _STOP.pack(0))
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: only reads, then leaves without running any cleanup
            os.close(rfd)
            code = 1
            try:
                mem.write(stop_gpa + _STOP.size, _STOP.pack(1))
                bad, reads = _watch(mem, gpa, size, stop_gpa)
                os.write(wfd, struct.pack("<QQ", bad, reads))
                code = 0
            finally:
                os._exit(code)
        os.close(wfd)
        self.pid, self.rfd = pid, rfd

    def started(self) -> bool:
        return bool(_STOP.unpack(self.mem.read(self.stop_gpa + _STOP.size, _STOP.size))[0])

    def result(self) -> tuple[int, int]:
        self.mem.write(self.stop_gpa, _STOP.pack(1))
        _, status = os.waitpid(self.pid, 0)
        data = os.read(self.rfd, 16)
        os.close(self.rfd)
        assert os.waitstatus_to_exitcode(status) == 0 and len(data) == 16
        bad, reads = struct.unpack("<QQ", data)
        return bad, reads


def _watch(mem: GuestMemory, gpa: int, size: int, stop_gpa: int) -> tuple[int, int]:
    words = word_view(mem.view(gpa, size), {2: "H", 8: "Q"}[size])
    stop = word_view(mem.view(stop_gpa, 4), "I")
    bad = reads = 0
    prev = 0
    deadline = time.monotonic() + WATCH_LIMIT_S
    # The writers never publish 0 once they have started (16-bit indices
    # restart at 1 instead of wrapping), so a 0 after a non-zero value is a
    # transient: pack_into's zero fill. 16-bit values legitimately go back at
    # each restart (and a descheduled reader can miss one), so only the u64
    # fence sequence, which never goes back, is also checked for order.
    while not stop[0]:
        for _ in range(1000):
            v = words[0]
            if prev and (v == 0 or (size == 8 and v < prev)):
                bad += 1
            prev = v or prev
        reads += 1000
        if time.monotonic() > deadline:
            break
    return bad, reads


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, RAM)])
    yield m
    m.close()


def _watched(mem: GuestMemory, gpa: int, size: int, writer: Callable[[int], None]) -> None:
    watch = Watch(mem, gpa, size, stop_gpa=RAM - 4096)
    try:
        wait_for(watch.started, 10, "the watching child never started")
        for _ in range(ROUNDS):
            for value in range(1, WRITES + 1):
                writer(value)
    finally:
        bad, reads = watch.result()
    assert reads > 0
    assert bad == 0, f"a reader saw {bad} transient value(s) in {reads} reads"


IMPLS = [
    "python",
    pytest.param(
        "native", marks=pytest.mark.skipif(not native_available(), reason="native module not built")
    ),
]


@pytest.mark.parametrize("impl", IMPLS)
def test_used_idx_is_one_store(mem: GuestMemory, impl: Impl) -> None:
    alloc = GuestAllocator(mem, 0x1000, RAM // 2)
    drv = DriverQueue(mem, NUM, alloc, event_idx=True)
    vq = VirtQueue(mem, NUM, drv.desc_gpa, drv.avail_gpa, drv.used_gpa, event_idx=True, impl=impl)
    state = {"n": 0}

    def publish(_value: int) -> None:
        # push() advances used.idx by one; restart at 1 before it would wrap to 0.
        if state["n"] == 0xFFFE:
            vq.reset()
            state["n"] = 0
        vq.push(0, 0)
        state["n"] += 1

    _watched(mem, drv.used_gpa + USED_IDX, 2, publish)


def test_avail_event_is_one_store(mem: GuestMemory) -> None:
    alloc = GuestAllocator(mem, 0x1000, RAM // 2)
    drv = DriverQueue(mem, NUM, alloc, event_idx=True)
    vq = VirtQueue(mem, NUM, drv.desc_gpa, drv.avail_gpa, drv.used_gpa, event_idx=True)

    def publish(value: int) -> None:
        vq.last_avail_idx = value & 0xFFFF or 1
        vq.set_avail_event()

    _watched(mem, drv.used_gpa + avail_event_offset(NUM), 2, publish)


def test_fence_page_sequence_is_one_store(mem: GuestMemory) -> None:
    gpa = 0x8000
    page = FencePage(mem.view(gpa, FENCE_PAGE_SIZE))
    slot = HEADER_ST.size + 3 * SLOT_ST.size
    state = {"seq": 0}

    def publish(_value: int) -> None:
        state["seq"] += 1
        page.complete(3, state["seq"], error_code=state["seq"] & 1)

    _watched(mem, gpa + slot, 8, publish)
    assert page.read_slot(3)[0] == state["seq"]


def test_word_view_refuses_misaligned_or_ragged() -> None:
    buf = memoryview(bytearray(16))
    with pytest.raises(ValueError):
        word_view(buf[1:9], "Q")  # not a whole number of words from an aligned start
    with pytest.raises(ValueError):
        word_view(buf[:3], "H")
