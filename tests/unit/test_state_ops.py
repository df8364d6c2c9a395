"""The state opcodes through the agent's batch runner, without sockets
(host_agent/state_ops.py, docs/PROTOCOL.md "Session state"). Modules need a
device that compiles: ``CompilingCpu`` stands in for CUDA's module loader
(the hardware boundary); the GPU run is tests/gpu/test_gpu_state.py."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from host_agent import state_ops
from host_agent.executors.base import DeviceIdentity, Executor, SessionLimits
from host_agent.executors.cpu import CpuExecutor
from host_agent.runner import BatchRun, Command, EventGates, lane_of
from vpcie.errors import ErrorCode, VgpuError
from vpcie.protocol.batch import Record, rec
from vpcie.protocol.codes import HANDLE_EPOCH_SHIFT, MAX_EVENTS, ModuleKind, Opcode
from vpcie.protocol.frames import decode_payload

EPOCH = 4


class CompilingCpu(CpuExecutor):
    """The CPU executor with a module loader: "compiling" keeps the code."""

    def __init__(self) -> None:
        super().__init__(SessionLimits(1 << 20, 8), DeviceIdentity(agent="unit"))
        self.compiled = 0
        self.syncs = 0

    def module_load(self, kind: int, name: str, code: bytes) -> int:
        self.compiled += 1
        h = self._new_handle()
        self.modules[h] = ("built", code)
        return h

    def sync(self, stream: int | None) -> None:
        self.syncs += 1


def _runner(ex: Executor) -> tuple[BatchRun, EventGates]:
    gates = EventGates()
    return BatchRun(ex, gates, 0.2, lambda off, v, last: None), gates


def run(br: BatchRun, *records: Record) -> tuple[int, int, str, dict[int, int], bytes]:
    cmd = Command(1, list(records), lane_of(list(records)))
    status, index, message, _n, res, blob = decode_payload("COMPLETION", br.run(cmd))
    return status, index, message, dict(res), blob


def ok(br: BatchRun, *records: Record) -> tuple[dict[int, int], bytes]:
    status, _i, message, res, blob = run(br, *records)
    assert status == ErrorCode.OK, message
    return res, blob


@given(st.sets(st.integers(0, MAX_EVENTS - 1), max_size=50))
def test_event_bitmap_round_trip(events: set[int]) -> None:
    bits = state_ops.events_bitmap(events)
    assert len(bits) <= MAX_EVENTS // 8 and not bits.endswith(b"\0")
    assert state_ops.bitmap_events(bits) == sorted(events)


def test_event_bitmap_too_long() -> None:
    with pytest.raises(VgpuError) as err:
        state_ops.bitmap_events(bytes(MAX_EVENTS // 8 + 1))
    assert err.value.code is ErrorCode.INVALID_ARGUMENT


def test_modules_export_and_load_at() -> None:
    src, dst = CompilingCpu(), CompilingCpu()
    src.set_handle_epoch(EPOCH)
    dst.set_handle_epoch(EPOCH)
    bs, _ = _runner(src)
    bd, gd = _runner(dst)
    code = b'extern "C" __global__ void k() {}'
    res, _ = ok(
        bs, rec(Opcode.MEM_ALLOC, 100, 0), rec(Opcode.MODULE_LOAD, ModuleKind.CUDA_C, "k.cu", code)
    )
    buf, mod = res[0], res[1]
    ok(bs, rec(Opcode.EVENT_RECORD, 9, stream=1))
    _, blob = ok(bs, rec(Opcode.STATE_EXPORT))
    assert src.syncs == 1  # every stream finished before the summary
    epoch, nxt, used, events, _nb, bufs, _nm, mods = decode_payload("STATE_SUMMARY", blob)
    assert (epoch, used, [b[:2] for b in bufs]) == (EPOCH, 100, [(buf, 100)])
    assert mods == [(mod, int(ModuleKind.CUDA_C), "k.cu", len(code))]
    assert state_ops.bitmap_events(events) == [9] and nxt == (mod & 0xFFFFFF) + 1
    assert ok(bs, rec(Opcode.MODULE_EXPORT, mod))[1] == code
    status, _i, _m, _r, _b = run(bs, rec(Opcode.MODULE_EXPORT, buf))  # a buffer, not a module
    assert status == ErrorCode.INVALID_HANDLE

    # the target compiles it again, at the same handle
    assert ok(bd, rec(Opcode.MODULE_LOAD_AT, mod, ModuleKind.CUDA_C, "k.cu", code))[0] == {0: mod}
    assert dst.compiled == 1 and dst.modules[mod] == ("built", code)
    assert ok(bd, rec(Opcode.MODULE_EXPORT, mod))[1] == code
    status, _i, message, _r, _b = run(bd, rec(Opcode.MODULE_LOAD_AT, mod, 3, "k.cu", code))
    assert status == ErrorCode.INVALID_HANDLE and "live" in message and dst.compiled == 1
    foreign = ((EPOCH + 1) << HANDLE_EPOCH_SHIFT) | 5
    status, *_ = run(bd, rec(Opcode.MODULE_LOAD_AT, foreign, 3, "k.cu", code))
    assert status == ErrorCode.INVALID_HANDLE and dst.compiled == 1
    status, *_ = run(bd, rec(Opcode.MODULE_LOAD_AT, mod + 1, 99, "k.cu", code))
    assert status == ErrorCode.INVALID_ARGUMENT  # unknown module kind, as MODULE_LOAD
    ok(bd, rec(Opcode.SESSION_RESTORE, nxt, events))
    assert gd.is_set(9) and not gd.is_set(8)
    ok(bd, rec(Opcode.EVENT_WAIT, 9, stream=2))
    # a free forgets the code too
    ok(bd, rec(Opcode.MODULE_FREE, mod))
    assert dst.module_sources == {}
    status, *_ = run(bd, rec(Opcode.MODULE_EXPORT, mod))
    assert status == ErrorCode.INVALID_HANDLE
    # the handle forced by MODULE_LOAD_AT was for that record only
    h = ok(bd, rec(Opcode.MEM_ALLOC, 8, 0))[0][0]
    assert h >> HANDLE_EPOCH_SHIFT == EPOCH and h != mod and h & 0xFFFFFF == nxt


def test_summary_too_big_is_quota_exceeded() -> None:
    """The documented limit: a summary that would not fit a COMPLETION."""
    ex = CompilingCpu()
    name = "m" * 255
    n = state_ops.MAX_SUMMARY_BYTES // (4 + 1 + 2 + 255 + 4) + 1
    for _ in range(n):
        ex.load_module(int(ModuleKind.PTX), name, b"x")
    br, _ = _runner(ex)
    status, index, message, _r, blob = run(br, rec(Opcode.NOP), rec(Opcode.STATE_EXPORT))
    assert status == ErrorCode.QUOTA_EXCEEDED and index == 1 and blob == b""
    assert "too many allocations to migrate" in message


def test_cpu_executor_has_no_modules_to_move() -> None:
    ex: Any = CpuExecutor(SessionLimits(1 << 20, 8), DeviceIdentity())
    br, _ = _runner(ex)
    status, *_ = run(br, rec(Opcode.MODULE_LOAD_AT, 1, 1, "k", b"x"))
    assert status == ErrorCode.NOT_SUPPORTED and ex.module_sources == {}
    _, blob = ok(br, rec(Opcode.STATE_EXPORT))
    assert decode_payload("STATE_SUMMARY", blob) == (0, 1, 0, b"", 0, [], 0, [])
