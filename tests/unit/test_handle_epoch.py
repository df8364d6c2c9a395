"""Handle epochs: a guest context's k-th agent session (one per binding)
issues handles with k in their top byte (codes.HANDLE_EPOCH_SHIFT), so a
handle kept across a rebind is refused as STALE_HANDLE, never taken for a
buffer of the new session; and a context never wraps to an epoch it used."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from host_agent.executors.base import MAX_HANDLES, DeviceIdentity, SessionLimits
from host_agent.executors.cpu import CpuExecutor
from tests.unit.test_gpu_device import MEM, _HeldSession
from vpcie.errors import ErrorCode, VgpuError
from vpcie.gpu.binding import AgentTarget, Binding
from vpcie.gpu.device import GpuDevice
from vpcie.memory import GuestMemory
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import HANDLE_EPOCH_SHIFT, HANDLE_INDEX_MASK, MAX_HANDLE_EPOCH, Opcode
from vpcie.testing.guest_driver import DirectTransport, GuestGpu
from vpcie.virtqueue.driver import GuestAllocator


def executor(epoch: int) -> CpuExecutor:
    ex = CpuExecutor(SessionLimits(1 << 30, 16), DeviceIdentity())
    ex.set_handle_epoch(epoch)
    return ex


def test_handles_carry_the_epoch_and_earlier_ones_are_stale() -> None:
    ex = executor(3)
    h = ex.mem_alloc(64)
    assert h == 3 << HANDLE_EPOCH_SHIFT | 1
    assert ex.buffer(h).size == 64
    for old in (1, 2 << HANDLE_EPOCH_SHIFT | 1, (3 << HANDLE_EPOCH_SHIFT) - 1):
        with pytest.raises(VgpuError) as err:
            ex.buffer(old)
        assert err.value.code == ErrorCode.STALE_HANDLE
        assert f"handle {old} belongs to an earlier binding of this vGPU" in err.value.message
        with pytest.raises(VgpuError) as err:
            ex.mem_free(old)
        assert err.value.code == ErrorCode.STALE_HANDLE
        with pytest.raises(VgpuError) as err:
            ex.module_free(old)
        assert err.value.code == ErrorCode.STALE_HANDLE
    # Never issued (this epoch, or a later one): INVALID_HANDLE as before.
    for unknown in (h + 1, 4 << HANDLE_EPOCH_SHIFT | 1, 0xFFFFFFFF):
        with pytest.raises(VgpuError) as err:
            ex.buffer(unknown)
        assert err.value.code == ErrorCode.INVALID_HANDLE
    # Epoch 0 (a context's first session) numbers from 1, as always; 0 is never a handle.
    first = executor(0)
    assert first.mem_alloc(8) == 1
    with pytest.raises(VgpuError) as err:
        first.buffer(0)
    assert err.value.code == ErrorCode.INVALID_HANDLE


def test_numbers_wrap_inside_the_epoch_skipping_live_handles() -> None:
    ex = executor(MAX_HANDLE_EPOCH)
    base = MAX_HANDLE_EPOCH << HANDLE_EPOCH_SHIFT
    live = ex.mem_alloc(8)  # base | 1, kept
    ex._next_index = HANDLE_INDEX_MASK
    last = ex.mem_alloc(8)
    assert last == base | HANDLE_INDEX_MASK == 0xFFFFFFFF
    # Past the last number: back to the start of the same epoch, live 1 skipped.
    assert ex.mem_alloc(8) == base | 2
    assert live == base | 1 and ex.buffer(live).size == 8
    with pytest.raises(VgpuError) as err:
        ex.set_handle_epoch(1)  # only before the session holds anything
    assert err.value.code == ErrorCode.INVALID_ARGUMENT
    assert MAX_HANDLES < HANDLE_INDEX_MASK


class _QuickSession(_HeldSession):
    """An agent session that completes every batch OK on the next loop turn."""

    def send_encoded(self, data: bytes, h2d_total: int, d2h_total: int, **kw: Any) -> object:
        done = SimpleNamespace(status=0, failed_index=0xFFFFFFFF, message="", results={}, blob=b"")
        asyncio.get_running_loop().call_soon(kw["on_done"], done)
        return None


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, MEM)])
    yield m
    m.close()


async def test_each_session_of_a_context_gets_the_next_epoch_and_none_wraps(
    mem: GuestMemory,
) -> None:
    opened: list[tuple[str, int]] = []

    async def factory(target: AgentTarget, name: str, handle_epoch: int) -> _QuickSession:
        opened.append((name.split("#")[0], handle_epoch))
        return _QuickSession()

    binding = Binding(factory)  # type: ignore[arg-type]
    dev = GpuDevice(binding, memory=lambda: mem, lane=False)
    heap = GuestAllocator(mem, 0x1000, MEM - 0x1000)
    gpu = GuestGpu(DirectTransport(dev), mem, heap.alloc)
    target = AgentTarget("127.0.0.1", 9, psk=b"k" * 16)
    binding.bind(target)
    ctx = await gpu.open("long")
    for _ in range(MAX_HANDLE_EPOCH + 1):
        assert (await ctx.run([rec(Opcode.NOP)])).status == ErrorCode.OK
        binding.bind(target)  # a rebind: the next batch opens a new session
    assert opened == [("long", e) for e in range(MAX_HANDLE_EPOCH + 1)]
    # A 257th session would reuse epoch 0's handles: refused, no session opened.
    reply = await ctx.run([rec(Opcode.NOP)])
    assert reply.status == ErrorCode.DEVICE_LOST
    assert "recreate the context" in reply.message
    assert len(opened) == MAX_HANDLE_EPOCH + 1
    # Another context has its own count.
    other = await gpu.open("other")
    assert (await other.run([rec(Opcode.NOP)])).status == ErrorCode.OK
    assert opened[-1] == ("other", 0)
    dev.close()
