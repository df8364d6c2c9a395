"""Notification suppression: AVAIL_F_NO_INTERRUPT, USED_F_NO_NOTIFY, EVENT_IDX.

virtio 1.2 §2.7.7 and §2.7.10.
"""

from __future__ import annotations

import pytest

from vpcie.memory import GuestMemory
from vpcie.protocol.virtq import vring_need_event
from vpcie.virtqueue import DriverQueue, GuestAllocator, VirtQueue

MiB = 1 << 20


def make(event_idx: bool, num: int = 8) -> tuple[GuestMemory, DriverQueue, VirtQueue]:
    mem = GuestMemory.anonymous([(0, MiB)])
    drv = DriverQueue(mem, num, GuestAllocator(mem, 0x1000, MiB - 0x1000), event_idx=event_idx)
    dev = VirtQueue(
        mem, num, drv.desc_gpa, drv.avail_gpa, drv.used_gpa, event_idx=event_idx, impl="python"
    )
    return mem, drv, dev


def serve(drv: DriverQueue, dev: VirtQueue, n: int) -> None:
    for _ in range(n):
        drv.add([b"r"], [])
    drv.kick()
    for _ in range(n):
        chain = dev.pop()
        assert chain is not None
        dev.push(chain.head, 0)


@pytest.mark.parametrize(
    ("event", "new", "old", "want"),
    [
        (0, 1, 0, True),
        (0, 2, 1, False),
        (5, 10, 3, True),
        (5, 5, 3, False),
        (0xFFFF, 0, 0xFFFE, True),
        (0xFFFE, 0, 0xFFFF, False),
        (7, 7, 7, False),
    ],
)
def test_vring_need_event(event: int, new: int, old: int, want: bool) -> None:
    assert vring_need_event(event, new, old) is want


def test_no_interrupt_flag_without_event_idx() -> None:
    mem, drv, dev = make(False)
    with mem:
        serve(drv, dev, 1)
        assert dev.needs_notify()
        drv.set_interrupts(False)
        serve(drv, dev, 1)
        assert not dev.needs_notify()
        drv.set_interrupts(True)
        assert dev.needs_notify()


def test_event_idx_used_event() -> None:
    mem, drv, dev = make(True)
    with mem:
        serve(drv, dev, 1)
        assert dev.needs_notify()  # first decision is always "notify"
        assert not dev.needs_notify()  # nothing new since
        drv.get_used()  # sets used_event = 1: interrupt when used passes index 1
        serve(drv, dev, 1)
        assert dev.needs_notify()
        drv.get_used()
        drv.set_used_event(10)  # driver: not before entry 10
        serve(drv, dev, 3)  # used 2 -> 5
        assert not dev.needs_notify()
        drv.get_used()
        drv.set_used_event(10)
        serve(drv, dev, 6)  # used 5 -> 11 crosses 10
        assert dev.needs_notify()


def test_event_idx_avail_event_and_kick() -> None:
    mem, drv, dev = make(True)
    with mem:
        drv.add([b"a"], [])
        assert drv.kick()  # avail_event 0, idx 0 -> 1: kick
        assert dev.pop() is not None
        # pop() published avail_event = 1: the device wants a kick for entry 1
        assert mem.read_u16(drv.used_gpa + 4 + 8 * 8) == 1
        drv.add([b"b"], [])
        drv.add([b"c"], [])
        assert drv.kick()
        # device has not popped: avail_event stays 1, no new kick needed
        drv.add([b"d"], [])
        assert not drv.kick()
        for _ in range(3):
            assert dev.pop() is not None
        drv.add([b"e"], [])
        assert drv.kick()


def test_used_no_notify_without_event_idx() -> None:
    mem, drv, dev = make(False)
    with mem:
        drv.add([b"a"], [])
        assert drv.kick()
        dev.set_no_notify(True)
        drv.add([b"b"], [])
        assert not drv.kick()
        dev.set_no_notify(False)
        drv.add([b"c"], [])
        assert drv.kick()
