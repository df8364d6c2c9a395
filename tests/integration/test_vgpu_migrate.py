"""Live migration of a vGPU between two real agents while its guest works:
the guest driver harness (playing QEMU + the Linux driver) -> the backend
(Python path and lane) -> real ``vpcie-agent`` processes (CPU executor).

What is shown: a context's buffers (random contents), recorded events and
handle counter move to the target while batches keep coming; every batch
completes OK and in order; the handles stay; the source session ends; QUERY
names the target. A target that cannot be reached, or a drain over its limit,
changes nothing. A source killed before or during the migration ends the
contexts' work with DEVICE_LOST and leaves the vGPU bound to the target empty.
A guest batch naming a state opcode is refused and disturbs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import AgentProc, free_port, until
from tests.integration.agent_helpers import children
from tests.integration.test_vgpu_device import Rig, alloc, held, rig
from tests.integration.test_vgpu_lane import lent
from vpcie._native import native_available
from vpcie.control.client import control_request
from vpcie.errors import ErrorCode
from vpcie.gpu import migration
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import HANDLE_EPOCH_SHIFT, DType, Opcode
from vpcie.protocol.frames import decode_payload
from vpcie.testing.guest_driver import Bo, CommandFailed, GuestContext

pytestmark = pytest.mark.timeout(120)

PATHS = [
    pytest.param(False, id="python"),
    pytest.param(
        True,
        id="lane",
        marks=pytest.mark.skipif(not native_available(), reason="the lane is native code"),
    ),
]
SIZES = (1 << 20, (3 << 20) + 123, 2 << 20, 5 * 4096 + 7)
ACC_N = 1024  # the workload's accumulator: float32 elements
EVENTS = (3, 40)


async def migrate(r: Rig, agent: AgentProc, **extra: object) -> dict[str, Any]:
    req = {"op": "migrate", "agent": agent.address, "psk_file": str(agent.psk_file), **extra}
    return await control_request(r.control, req, timeout=60)


async def agent_name(ctx: GuestContext) -> str:
    reply = await ctx.run([rec(Opcode.QUERY)])
    assert reply.status == ErrorCode.OK, reply
    return str(decode_payload("QUERY_INFO", reply.blob)[-1])


@dataclass
class State:
    """What the test put on the device: handles and the bytes behind them."""

    handles: list[int]
    digests: list[bytes]
    sizes: tuple[int, ...]


async def fill(ctx: GuestContext, seed: int = 7, sizes: tuple[int, ...] = SIZES) -> State:
    rng = np.random.default_rng(seed)
    handles = await alloc(ctx, *sizes)
    digests = []
    for h, n in zip(handles, sizes, strict=True):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        bo = await ctx.create_bo(n, scatter=True)
        bo.write(data)
        reply = await ctx.run([rec(Opcode.COPY_H2D, h, bo.resource_id, 0, 0, n)])
        assert reply.status == ErrorCode.OK, reply
        digests.append(hashlib.sha256(data).digest())
        await ctx.close_bo(bo)
    for ev in EVENTS:
        assert (await ctx.run([rec(Opcode.EVENT_RECORD, ev)])).status == ErrorCode.OK
    return State(handles, digests, sizes)


async def check_contents(ctx: GuestContext, state: State) -> None:
    for h, n, digest in zip(state.handles, state.sizes, state.digests, strict=True):
        bo = await ctx.create_bo(n)
        reply = await ctx.run([rec(Opcode.COPY_D2H, h, bo.resource_id, 0, 0, n)])
        assert reply.status == ErrorCode.OK, (h, reply)
        assert hashlib.sha256(bo.read()).digest() == digest, f"handle {h:#x} changed"
        await ctx.close_bo(bo)


@dataclass
class Workload:
    """Batches submitted continuously (up to ``depth`` outstanding): each adds
    one to every element of an accumulator on the device (AXPY of a ones
    vector) and copies it into its own guest buffer, so batch i reads i:
    a batch lost, run twice or out of order, or an update left behind on the
    source, shows as a wrong count. Each outcome is checked."""

    ctx: GuestContext
    ones: int
    acc: int
    bos: list[Bo]
    done: int = 0
    errors: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, depth: int = 3) -> None:
        outstanding: list[tuple[int, int, int]] = []  # (seq, count, bo index)
        i = 0
        while not self.stop.is_set() or outstanding:
            if not self.stop.is_set() and len(outstanding) < depth:
                i += 1
                k = i % len(self.bos)
                seq = await self.ctx.start(
                    [
                        rec(Opcode.AXPY, DType.F32, self.ones, self.acc, 1.0, ACC_N, 0, 0),
                        rec(Opcode.COPY_D2H, self.acc, self.bos[k].resource_id, 0, 0, 4 * ACC_N),
                    ]
                )
                outstanding.append((seq, i, k))
                continue
            seq, count, k = outstanding.pop(0)
            reply = await self.ctx.wait(0, seq, timeout=30)
            self.times.append(time.monotonic())
            if reply.status != ErrorCode.OK:
                self.errors.append(f"batch {seq}: {reply.status.name} {reply.message}")
            else:
                got = set(np.frombuffer(self.bos[k].read(), dtype=np.float32).tolist())
                if got != {float(count)}:
                    self.errors.append(f"batch {seq}: count {sorted(got)[:3]}, not {count}")
            if self.ctx.fence_slot(0)[0] < seq:
                self.errors.append(f"batch {seq}: fence page behind")
            self.done += 1

    def max_gap_ms(self, since: float) -> float:
        ts = [t for t in self.times if t >= since]
        return max((b - a for a, b in itertools.pairwise(ts)), default=0.0) * 1e3


@contextlib.asynccontextmanager
async def workload(ctx: GuestContext) -> AsyncIterator[Workload]:
    ones, acc = await alloc(ctx, 4 * ACC_N, 4 * ACC_N)
    src = await ctx.create_bo(4 * ACC_N)
    src.write(np.ones(ACC_N, dtype=np.float32).tobytes())
    reply = await ctx.run(
        [
            rec(Opcode.COPY_H2D, ones, src.resource_id, 0, 0, 4 * ACC_N),
            rec(Opcode.MEMSET, acc, 0, 0, 4 * ACC_N),
        ]
    )
    assert reply.status == ErrorCode.OK, reply
    bos = [await ctx.create_bo(4 * ACC_N) for _ in range(4)]
    w = Workload(ctx, ones, acc, bos)
    task = asyncio.create_task(w.run())
    try:
        await until(lambda: w.done >= 10 or task.done(), 20, "the workload did not start")
        yield w
    finally:
        w.stop.set()
        await asyncio.wait_for(task, 30)


async def more(w: Workload, n: int) -> None:
    target = w.done + n
    await until(lambda: w.done >= target, 30, f"{n} more batches did not complete")


@pytest.mark.parametrize("lane", PATHS)
async def test_migrate_moves_state_while_the_guest_submits(
    tmp_path: Path, agent_factory: Any, lane: bool
) -> None:
    src, dst = agent_factory("--name", "src"), agent_factory("--name", "dst")
    async with rig(tmp_path, lane=lane) as r:
        assert (await r.bind(src))["ok"]
        ctx = await r.gpu.open()
        state = await fill(ctx)
        assert await agent_name(ctx) == "src"
        epoch = state.handles[0] >> HANDLE_EPOCH_SHIFT
        # A second context moves too (its own session, its own handles), and
        # one that has sent nothing yet opens its first session on the target.
        two = await r.gpu.open("two")
        state2 = await fill(two, seed=8, sizes=(256 << 10, 3))
        idle = await r.gpu.open("idle")
        async with workload(ctx) as w:
            if lane:
                await lent(r, ctx)  # the lane serves the workload until the hold
            await more(w, 10)
            t0 = time.monotonic()
            report = await migrate(r, dst)
            await more(w, 20)  # and it goes on, on the target
        assert report["ok"], report
        assert not w.errors, w.errors[:5]
        assert report["from"].startswith(f"127.0.0.1:{src.port} ")
        assert report["migrated"].startswith(f"127.0.0.1:{dst.port} ")
        assert report["contexts"] == 2 and report["state_lost"] is False
        assert report["state_bytes"] >= sum(SIZES) + 2 * 4 * ACC_N + sum(state2.sizes)
        assert 0 < report["copy_ms"] <= report["stun_ms"]
        # What the guest saw: no gap between completions longer than the stun (+ slack).
        assert w.max_gap_ms(t0) < report["stun_ms"] + 500
        # The same handles, the same bytes; the recorded events are recorded there.
        await check_contents(ctx, state)
        await check_contents(two, state2)
        waits = [rec(Opcode.EVENT_WAIT, ev, stream=1) for ev in EVENTS]
        assert (await ctx.run(waits, stream=1, timeout=5)).status == ErrorCode.OK
        assert (await two.run(waits, stream=1, timeout=5)).status == ErrorCode.OK
        assert await agent_name(two) == "dst" and await agent_name(idle) == "dst"
        (new,) = await alloc(ctx, 64)  # numbered after the moved ones, same epoch
        assert new >> HANDLE_EPOCH_SHIFT == epoch and new not in state.handles
        assert await agent_name(ctx) == "dst"
        status = await control_request(r.control, {"op": "status"})
        assert str(status["target"]).startswith(f"127.0.0.1:{dst.port} ")
        assert status["migrating"] is False
        # The source's session ended: its worker is gone.
        await until(lambda: not children(src.proc.pid), 10, "the source worker still runs")
        assert children(dst.proc.pid)
        if lane:  # the lane serves the context again, on the new session
            await lent(r, ctx)
            assert (await ctx.run([rec(Opcode.MEMSET, new, 1, 0, 64)])).status == ErrorCode.OK


async def write_random(ctx: GuestContext, handle: int, n: int, seed: int) -> bytes:
    """New random contents for ``handle``; their digest."""
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    bo = await ctx.create_bo(n, scatter=True)
    bo.write(data)
    reply = await ctx.run([rec(Opcode.COPY_H2D, handle, bo.resource_id, 0, 0, n)])
    assert reply.status == ErrorCode.OK, reply
    await ctx.close_bo(bo)
    return hashlib.sha256(data).digest()


@pytest.mark.parametrize("lane", PATHS)
@pytest.mark.parametrize("when", ["after", "before"])
async def test_precopy_moves_what_the_guest_changed_meanwhile_in_the_stun(
    tmp_path: Path, agent_factory: Any, lane: bool, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pre-copy, one round: every buffer is copied while the guest runs; the
    test holds the pre-copy ``after`` its copy (or ``before`` it, past the
    export) while the guest rewrites one buffer, frees one and makes a new
    one. The hold copies exactly the rewritten and the new one: their bytes
    on the target are the new ones (a write that the write generation missed
    would leave the pre-copied bytes), the freed one is gone there too
    (``before``: its copy finds it gone), the rest is the pre-copied bytes."""
    monkeypatch.setattr(migration, "PRECOPY_ROUNDS", 1)
    copied, go = asyncio.Event(), asyncio.Event()
    real_copy = migration.copy_pieces

    async def copy_then_wait(*args: Any) -> None:
        precopy = len(args) > 3 and args[3] is not None  # a pre-copy round (the guest runs)
        if precopy and when == "before":
            copied.set()
            await go.wait()
        await real_copy(*args)
        if precopy and when == "after":
            copied.set()
            await go.wait()

    monkeypatch.setattr(migration, "copy_pieces", copy_then_wait)
    src, dst = agent_factory("--name", "src"), agent_factory("--name", "dst")
    sizes = ((2 << 20) + 5, 3 << 20, 1 << 20, 5 * 4096 + 7)
    async with rig(tmp_path, lane=lane) as r:
        assert (await r.bind(src))["ok"]
        ctx = await r.gpu.open()
        state = await fill(ctx, seed=11, sizes=sizes)
        if lane:
            await lent(r, ctx)
        task = asyncio.create_task(migrate(r, dst))
        await until(copied.is_set, 30, "the pre-copy did not copy")
        assert not r.device.forwarding.holding  # the guest runs meanwhile
        hot, freed = state.handles[1], state.handles[2]
        state.digests[1] = await write_random(ctx, hot, sizes[1], seed=99)
        assert (await ctx.run([rec(Opcode.MEM_FREE, freed)])).status == ErrorCode.OK
        (new,) = await alloc(ctx, 300_001)
        new_digest = await write_random(ctx, new, 300_001, seed=98)
        assert await agent_name(ctx) == "src"
        go.set()
        report = await task
        assert report["ok"], report
        assert await agent_name(ctx) == "dst"
        keep = [0, 1, 3]
        await check_contents(
            ctx,
            State(
                [state.handles[i] for i in keep] + [new],
                [state.digests[i] for i in keep] + [new_digest],
                (*(sizes[i] for i in keep), 300_001),
            ),
        )
        bo = await ctx.create_bo(16)
        gone = await ctx.run([rec(Opcode.COPY_D2H, freed, bo.resource_id, 0, 0, 16)])
        assert gone.status == ErrorCode.INVALID_HANDLE, gone
        precopied = sum(sizes) - (sizes[2] if when == "before" else 0)
        assert report["rounds"] == 1 and report["precopy_bytes"] == precopied
        assert report["stun_bytes"] == sizes[1] + 300_001
        assert report["state_bytes"] == sum(sizes) - sizes[2] + 300_001 > report["stun_bytes"]


async def test_unreachable_target_changes_nothing(tmp_path: Path, agent_factory: Any) -> None:
    src = agent_factory("--name", "src")
    async with rig(tmp_path) as r:
        assert (await r.bind(src))["ok"]
        ctx = await r.gpu.open()
        state = await fill(ctx)
        gen = r.device.binding.generation
        async with workload(ctx) as w:
            req = {"op": "migrate", "agent": f"127.0.0.1:{free_port()}"}
            refused = await control_request(r.control, {**req, "psk_file": str(src.psk_file)})
            await more(w, 10)
        assert not refused["ok"]
        error = str(refused["error"])
        assert "cannot reach target 127.0.0.1:" in error or "target 127.0.0.1:" in error
        assert "\n" not in error
        assert not w.errors, w.errors[:5]
        assert r.device.binding.generation == gen
        assert str(r.device.binding.target.describe()).startswith(f"127.0.0.1:{src.port} ")  # type: ignore[union-attr]
        assert not r.device.forwarding.holding and not r.device.lanes.paused
        await check_contents(ctx, state)
        assert await agent_name(ctx) == "src"
        # Unbound: refused, one line.
        assert (await r.unbind())["ok"]
        refused = await control_request(
            r.control, {"op": "migrate", "agent": src.address, "psk_file": str(src.psk_file)}
        )
        assert not refused["ok"] and "no GPU is bound" in str(refused["error"])


async def test_drain_over_its_limit_aborts_and_work_goes_on(
    tmp_path: Path, agent_factory: Any
) -> None:
    src, dst = agent_factory("--name", "src"), agent_factory("--name", "dst")
    async with rig(tmp_path) as r:
        r.device.migrate_drain_timeout = 0.5
        assert (await r.bind(src))["ok"]
        ctx = await r.gpu.open()
        state = await fill(ctx)
        # Stream 1 waits on an event nobody has recorded: in flight on the source.
        blocked = await ctx.start([rec(Opcode.EVENT_WAIT, 77, stream=1)], stream=1)
        await until(lambda: held(r.device, ctx), 5, "the batch never went to the agent")
        task = asyncio.create_task(migrate(r, dst))
        await until(lambda: r.device.forwarding.holding, 5, "the hold did not begin")
        # Held meanwhile: submitted, answered by virtio, not yet run.
        queued = await ctx.start([rec(Opcode.MEMSET, state.handles[0], 9, 0, 16)])
        # One at a time: another migrate, a bind, an unbind are refused meanwhile.
        for req in (
            migrate(r, dst),
            r.bind(dst, replace=True),
            r.unbind(),
        ):
            answer = await req
            assert not answer["ok"] and "a migration of this vGPU is running" in str(
                answer["error"]
            ), answer
        assert (await control_request(r.control, {"op": "status"}))["migrating"] is True
        refused = await task
        assert not refused["ok"]
        assert "still running on the source after 0.5 s" in str(refused["error"])
        assert (await ctx.wait(0, queued, timeout=5)).status == ErrorCode.OK
        assert (await ctx.run([rec(Opcode.EVENT_RECORD, 77)])).status == ErrorCode.OK
        assert (await ctx.wait(1, blocked, timeout=5)).status == ErrorCode.OK
        assert await agent_name(ctx) == "src"
        await until(lambda: not children(dst.proc.pid), 10, "the target's sessions stay open")


async def test_precopy_held_up_over_the_limit_aborts_and_work_goes_on(
    tmp_path: Path, agent_factory: Any
) -> None:
    """The pre-copy's batches run on stream 0 in the guest's order: behind a
    guest batch that does not end they wait, bounded by the drain limit."""
    src, dst = agent_factory("--name", "src"), agent_factory("--name", "dst")
    async with rig(tmp_path) as r:
        r.device.migrate_drain_timeout = 0.5
        assert (await r.bind(src))["ok"]
        ctx = await r.gpu.open()
        state = await fill(ctx)
        blocked = await ctx.start([rec(Opcode.EVENT_WAIT, 77)])  # stream 0
        await until(lambda: held(r.device, ctx), 5, "the batch never went to the agent")
        refused = await migrate(r, dst)
        assert not refused["ok"], refused
        assert "the pre-copy did not finish in 0.5 s" in str(refused["error"])
        assert not r.device.forwarding.holding and not r.device.lanes.paused
        assert (await ctx.run([rec(Opcode.EVENT_RECORD, 77, stream=1)], stream=1)).status == (
            ErrorCode.OK
        )
        assert (await ctx.wait(0, blocked, timeout=5)).status == ErrorCode.OK
        await check_contents(ctx, state)
        assert await agent_name(ctx) == "src"
        await until(lambda: not children(dst.proc.pid), 10, "the target's sessions stay open")


async def test_source_killed_before_migrate(tmp_path: Path, agent_factory: Any) -> None:
    src, dst = agent_factory("--name", "src"), agent_factory("--name", "dst")
    async with rig(tmp_path) as r:
        assert (await r.bind(src))["ok"]
        ctx = await r.gpu.open()
        state = await fill(ctx)
        blocked = await ctx.start([rec(Opcode.EVENT_WAIT, 77, stream=1)], stream=1)
        await until(lambda: held(r.device, ctx), 5, "the batch never went to the agent")
        src.kill()
        t0 = time.monotonic()
        reply = await ctx.wait(1, blocked, timeout=2.0)
        assert reply.status == ErrorCode.DEVICE_LOST
        assert time.monotonic() - t0 < 2.0
        report = await migrate(r, dst)
        assert report["ok"] and report["state_lost"] is True, report
        assert report["migrated"].startswith(f"127.0.0.1:{dst.port} ")
        # Bound to the target, empty: old handles are stale, new work runs there.
        reply = await ctx.run([rec(Opcode.MEMSET, state.handles[0], 1, 0, 16)])
        assert reply.status == ErrorCode.STALE_HANDLE, reply
        assert await agent_name(ctx) == "dst"
        assert len(await alloc(ctx, 64)) == 1


async def test_source_killed_during_migrate(tmp_path: Path, agent_factory: Any) -> None:
    src, dst = agent_factory("--name", "src"), agent_factory("--name", "dst")
    async with rig(tmp_path) as r:
        assert (await r.bind(src))["ok"]
        ctx = await r.gpu.open()
        state = await fill(ctx)
        blocked = await ctx.start([rec(Opcode.EVENT_WAIT, 77, stream=1)], stream=1)
        await until(lambda: held(r.device, ctx), 5, "the batch never went to the agent")
        task = asyncio.create_task(migrate(r, dst))
        await until(lambda: r.device.forwarding.holding, 5, "the hold did not begin")
        queued = await ctx.start([rec(Opcode.MEMSET, state.handles[0], 9, 0, 16)])
        src.kill()  # while the migration waits for the source's work
        t0 = time.monotonic()
        for stream, seq in ((1, blocked), (0, queued)):
            reply = await ctx.wait(stream, seq, timeout=2.0)
            assert reply.status == ErrorCode.DEVICE_LOST, (stream, reply)
        assert time.monotonic() - t0 < 2.0
        report = await task
        assert report["ok"] and report["state_lost"] is True, report
        status = await control_request(r.control, {"op": "status"})
        assert str(status["target"]).startswith(f"127.0.0.1:{dst.port} ")
        assert await agent_name(ctx) == "dst"


async def test_guest_state_opcodes_refused_during_migration(
    tmp_path: Path, agent_factory: Any
) -> None:
    src, dst = agent_factory("--name", "src"), agent_factory("--name", "dst")
    async with rig(tmp_path) as r:
        assert (await r.bind(src))["ok"]
        ctx = await r.gpu.open()
        state = await fill(ctx)
        hostile = [
            [rec(Opcode.STATE_EXPORT)],
            [rec(Opcode.ALLOC_AT, state.handles[0], 64, 0)],
            [rec(Opcode.SESSION_RESTORE, 1, b"")],
            [rec(Opcode.MODULE_EXPORT, state.handles[0])],
        ]
        async with workload(ctx) as w:
            task = asyncio.create_task(migrate(r, dst))
            await until(lambda: r.device.forwarding.holding, 10, "no hold", interval=0)
            replies = []
            for seq, h in enumerate(hostile, 1):  # stream 2 is theirs alone
                if seq == 1:
                    assert r.device.forwarding.holding  # the first comes during the hold
                with pytest.raises(CommandFailed):  # SUBMIT_3D: ERR_INVALID_PARAMETER
                    await ctx.start(h, stream=2)
                # The fence page says why, once the work submitted before it is done.
                replies.append(await ctx.wait(2, seq, timeout=10))
            report = await task
            await more(w, 10)
        assert [x.status for x in replies] == [ErrorCode.INVALID_ARGUMENT] * len(hostile)
        assert report["ok"] and report["contexts"] == 1 and not report["state_lost"], report
        assert not w.errors, w.errors[:5]
        await check_contents(ctx, state)
        assert await agent_name(ctx) == "dst"
