"""Each buffer's write generation (Buffer.gen, STATE_SUMMARY's "gen"): the
runner adds 1 for every command that may write a buffer and leaves the ones
it only reads alone. Live migration's pre-copy recopies exactly the buffers
whose gen moved (vpcie/gpu/migration.py), so a write that does not count
would leave stale bytes on the target."""

from __future__ import annotations

from typing import Any

import pytest

from host_agent.executors.base import DeviceIdentity, HostLanding, Region, SessionLimits
from host_agent.executors.cpu import CpuExecutor
from host_agent.runner import BatchRun, Command, EventGates, lane_of
from vpcie.errors import ErrorCode
from vpcie.protocol.batch import Record, rec
from vpcie.protocol.codes import ArgKind, Opcode
from vpcie.protocol.frames import decode_payload
from vpcie.tunnel import commands as cmds


class LaunchingCpu(CpuExecutor):
    """The CPU executor with a kernel launcher that writes nothing (CUDA's
    launch is the hardware boundary); only the runner's bookkeeping is tested."""

    def __init__(self) -> None:
        super().__init__(SessionLimits(1 << 20, 8), DeviceIdentity(agent="unit"))
        self.launched: list[list[tuple[int, int, Region | None]]] = []

    def launch(self, module: int, kernel: str, grid: Any, block: Any, shared: int,
               args: list[tuple[int, int, Region | None]], stream: int) -> None:  # fmt: skip
        self.launched.append(args)


def run(ex: CpuExecutor, *records: Record, h2d: bytes = b"") -> bytes:
    cmd = Command(1, list(records), lane_of(list(records)), h2d_total=len(h2d))
    if h2d:
        cmd.landing = HostLanding([memoryview(bytearray(h2d))])
    br = BatchRun(ex, EventGates(), 0.2, lambda off, v, last: None)
    status, _i, message, _n, _res, blob = decode_payload("COMPLETION", br.run(cmd))
    assert status == ErrorCode.OK, message
    return bytes(blob)


@pytest.fixture
def ex() -> LaunchingCpu:
    return LaunchingCpu()


def _alloc(ex: CpuExecutor, n: int = 3, size: int = 64) -> list[int]:
    return [ex.mem_alloc(size) for _ in range(n)]


def gens(ex: CpuExecutor, handles: list[int]) -> list[int]:
    return [ex.buffers[h].gen & 0xFFFFFFFF for h in handles]


@pytest.mark.parametrize(
    ("name", "make", "written"),
    [
        ("COPY_H2D", lambda a, b, c: cmds.copy_h2d(b, 0, 8), [1]),
        ("COPY_D2D", lambda a, b, c: cmds.copy_d2d(c, a, 16), [2]),
        ("MEMSET", lambda a, b, c: cmds.memset(a, 7, 0, 16), [0]),
        ("GEMM", lambda a, b, c: cmds.gemm(a, b, c, 2, 2, 2), [2]),
        ("AXPY", lambda a, b, c: cmds.axpy(a, b, 2.0, 4), [1]),
        ("REDUCE_SUM", lambda a, b, c: cmds.reduce_sum(a, c, 4), [2]),
        ("REDUCE_SUM no out", lambda a, b, c: cmds.reduce_sum(a, 0, 4), []),
        ("COPY_D2H", lambda a, b, c: cmds.copy_d2h(a, 0, 16), []),
        ("SYNC", lambda a, b, c: cmds.sync(), []),
    ],
)
def test_a_write_adds_one_to_its_destination_only(
    ex: LaunchingCpu, name: str, make: Any, written: list[int]
) -> None:
    hs = _alloc(ex)
    record = make(*hs)
    data = b"\x01" * 8 if record.opcode == Opcode.COPY_H2D else b""
    for round_ in (1, 2):  # each command counts, not just the first
        run(ex, record, h2d=data)
        assert gens(ex, hs) == [round_ if i in written else 0 for i in range(3)], name


def test_a_launch_counts_every_buffer_it_is_given(ex: LaunchingCpu) -> None:
    a, b, c = _alloc(ex)
    args = [(int(ArgKind.PTR), a, 0), (int(ArgKind.U32), 0, 5), (int(ArgKind.PTR), c, 8)]
    run(ex, rec(Opcode.LAUNCH, 1, 1, 1, 1, 32, 1, 1, 0, "k", len(args), args))
    assert ex.launched and gens(ex, [a, b, c]) == [1, 0, 1]


def test_a_new_allocation_never_repeats_an_earlier_gen(ex: LaunchingCpu) -> None:
    """Freed and allocated again under the same handle (ALLOC_AT): a gen the
    old buffer had is not the new one's, so a pre-copy sees it changed."""
    (h,) = _alloc(ex, 1)
    run(ex, cmds.memset(h, 1, 0, 8))
    old = ex.buffers[h].gen
    run(ex, cmds.mem_free(h), cmds.alloc_at(h, 64))
    new = ex.buffers[h].gen
    assert new != old and new & 0xFFFFFFFF == 0
    run(ex, cmds.memset(h, 1, 0, 8))
    assert ex.buffers[h].gen != old


def test_an_export_reads_the_gens_before_it_waits_for_the_device(ex: LaunchingCpu) -> None:
    """A write that ends while STATE_EXPORT waits for the device (another
    stream's lane) is not in the gens it answers: the next export shows it."""
    (h,) = _alloc(ex, 1)
    gen = ex.buffers[h].gen

    def sync(stream: int | None) -> None:
        ex.buffers[h].gen += 1  # that write's count lands during the wait

    ex.sync = sync  # type: ignore[method-assign]
    _e, _n, _u, _ev, _nb, bufs, *_ = decode_payload("STATE_SUMMARY", run(ex, cmds.state_export()))
    assert bufs == [(h, 64, gen)]
    _e, _n, _u, _ev, _nb, bufs, *_ = decode_payload("STATE_SUMMARY", run(ex, cmds.state_export()))
    assert bufs == [(h, 64, gen + 1)]
