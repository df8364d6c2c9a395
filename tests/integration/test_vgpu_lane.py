"""The lane (vpcie/_native/lane.c, vpcie/gpu/lanes.py) end to end: the guest
driver harness -> the backend's C thread -> a real ``vpcie-agent`` over TCP.

What is shown: it serves copy-free batches once a context's session is idle
and lent to it; whatever it leaves to Python (copies, errors, results, the
fence page) gives exactly what the Python path gives; its session comes back
mid-flight with nothing lost; and every failure (agent killed, agent silent,
context destroyed, a new memory table) ends as the Python path ends it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AgentProc, until
from tests.integration.test_vgpu_device import Rig, alloc, held, rig
from vpcie._native import native_available
from vpcie.cli.vgpu import _human
from vpcie.errors import ErrorCode
from vpcie.gpu.fencepage import FENCE_PAGE_SIZE, HEADER_ST, SLOT_ST
from vpcie.protocol import virtio_gpu as wire
from vpcie.protocol.batch import Record, encode_batch, rec
from vpcie.protocol.codes import NO_INDEX, DType, Opcode
from vpcie.protocol.frames import encode_completion
from vpcie.testing.guest_driver import REPLY_SLOT, REPLY_SLOTS, GuestContext, Reply, hdr
from vpcie.tunnel import commands as cmds

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not native_available(), reason="the lane is native code"),
]


def lane_stats(r: Rig) -> dict[str, int]:
    return {k: v for k, v in r.device.status().items() if k.startswith("lane_")}


async def lent(r: Rig, ctx: GuestContext, timeout: float = 5.0) -> None:
    """Wait until ``ctx``'s session is with the lane."""
    leased = r.device.lanes.leased
    await until(lambda: leased(r.device.contexts[ctx.ctx_id]), timeout, "never lent to the lane")


async def lent_context(r: Rig, agent: AgentProc, name: str = "python3.11") -> GuestContext:
    """Bind ``agent``, open a context, run its first batch (which opens the
    session on the Python path) and wait until the session is lent."""
    if r.device.binding.target is None:
        assert (await r.bind(agent))["ok"]
    ctx = await r.gpu.open(name)
    await alloc(ctx, 64)
    await lent(r, ctx)
    return ctx


async def session_context(r: Rig, agent: AgentProc, lane: bool) -> GuestContext:
    """A context whose agent session is open: lent to the lane, or (the rig
    started with ``lane=False``) on the Python path."""
    if lane:
        return await lent_context(r, agent)
    assert (await r.bind(agent))["ok"]
    ctx = await r.gpu.open()
    await alloc(ctx, 64)
    return ctx


async def hold(ctx: GuestContext, event: int, last: Record, stream: int = 1) -> int:
    """Start a batch the agent holds (EVENT_WAIT on ``event``, then ``last``);
    its SIGNAL's seq."""
    return await ctx.start([rec(Opcode.EVENT_WAIT, event, stream=stream), last], stream=stream)


async def test_lane_serves_and_hands_back(tmp_path: Path, agent: AgentProc) -> None:
    async with rig(tmp_path) as r:
        assert (await r.bind(agent))["ok"]
        ctx = await r.gpu.open()
        (h,) = await alloc(ctx, 1 << 20)  # opens the session (Python), then it is lent
        await lent(r, ctx)
        before = lane_stats(r)
        for _ in range(20):
            assert (await ctx.run([rec(Opcode.NOP)])).status == ErrorCode.OK
        after = lane_stats(r)
        assert after["lane_submits"] - before["lane_submits"] == 20
        assert after["lane_completed"] - before["lane_completed"] == 20
        # A batch the lane holds (stream 1 waits on an event) when a copy
        # needs the session back: the lane's batch is adopted, nothing waits
        # on the agent, and both end right.
        held = await hold(ctx, 3, rec(Opcode.NOP, stream=1))
        assert lane_stats(r)["lane_submits"] == after["lane_submits"] + 1
        blob = os.urandom(1 << 20)
        src, dst = await ctx.create_bo(len(blob), scatter=True), await ctx.create_bo(len(blob))
        src.write(blob)
        copy = [rec(Opcode.COPY_H2D, h, src.resource_id, 0, 0, len(blob))]
        assert (await ctx.run(copy)).status == ErrorCode.OK
        assert ctx.fence_slot(1)[0] < held  # still held on the agent
        assert (await ctx.run([rec(Opcode.EVENT_RECORD, 3)])).status == ErrorCode.OK
        assert (await ctx.wait(1, held, timeout=5)).status == ErrorCode.OK
        back = [rec(Opcode.COPY_D2H, h, dst.resource_id, 0, 0, len(blob))]
        assert (await ctx.run(back)).status == ErrorCode.OK
        assert hashlib.sha256(dst.read()).digest() == hashlib.sha256(blob).digest()
        # Idle again: lent again, and the lane serves on.
        await lent(r, ctx)
        n = lane_stats(r)["lane_submits"]
        assert (await ctx.run([rec(Opcode.NOP)])).status == ErrorCode.OK
        assert lane_stats(r)["lane_submits"] == n + 1
        assert lane_stats(r)["lane_handed"] > 0
        # What an operator sees (`vpcie vgpu status`).
        shown = _human("status", r.device.status())
        assert f"lane    : {n + 1} batches sent" in shown and "lent to the lane" in shown


async def scripted(r: Rig) -> tuple[list[Reply], list[bytes]]:
    """The same guest work on a fresh context: results, blobs, errors with
    their record indices (a backend-local SIGNAL in the middle shifts them),
    a reply that does not fit; what the guest reads back, and its fence page."""
    ctx = await r.gpu.open("script")
    replies = [await ctx.run([rec(Opcode.MEM_ALLOC, 4096, 0), rec(Opcode.MEM_ALLOC, 64, 0)])]
    h, out = replies[0].value(0), replies[0].value(1)
    if r.device.lanes.enabled:
        await lent(r, ctx)
    mid = rec(Opcode.SIGNAL, 1, 0, 0, 0, stream=5)  # reply-less, stripped by the backend
    for records in (
        [rec(Opcode.QUERY)],
        [rec(Opcode.NOP), mid, rec(Opcode.MEMSET, h, 7, 0, 4096)],
        [cmds.reduce_sum(h, out, 1024, dtype=DType.F32)],
        [rec(Opcode.NOP), rec(Opcode.NOP), rec(Opcode.MEM_FREE, 999)],
        [rec(Opcode.NOP), rec(Opcode.MEM_FREE, h), rec(Opcode.MEM_FREE, h)],
        [rec(Opcode.LAUNCH, 0, 1, 1, 1, 1, 1, 1, 0, "no_such_kernel", 0, [])],
    ):
        replies.append(await ctx.run(records))
    # A QUERY whose SIGNAL reply has room for 16 bytes: OUT_OF_RANGE on the page.
    assert ctx.reply_bo is not None and ctx.fence_bo is not None
    await ctx.submit(
        encode_batch([rec(Opcode.QUERY), rec(Opcode.SIGNAL, 100, ctx.reply_bo.resource_id, 0, 16)])
    )
    await until(lambda: ctx.fence_slot(0)[0] >= 100, 5, "the QUERY's SIGNAL never landed")
    return replies, [ctx.fence_bo.read(0, FENCE_PAGE_SIZE), ctx.reply_bo.read(0, 16)]


async def test_lane_and_python_path_agree(tmp_path: Path, agent_factory: Any) -> None:
    got = {}
    for lane in (False, True):
        agent = agent_factory()  # a fresh agent each: same handles, same QUERY
        where = tmp_path / f"lane-{lane}"
        where.mkdir()
        async with rig(where, lane=lane) as r:
            assert (await r.bind(agent))["ok"]
            got[lane] = await scripted(r)
            stats = lane_stats(r)
            if lane:  # results and errors went through Python's completion path
                assert stats["lane_submits"] >= 6 and stats["lane_python_frames"] >= 5, stats
            else:
                assert not stats
        agent.stop()
    replies, pages = got[True]
    assert replies == got[False][0]
    assert pages == got[False][1]
    assert len(replies) == 7 and replies[1].blob and replies[3].results  # QUERY, REDUCE_SUM
    statuses = [x.status for x in replies]
    assert statuses[:4] == [ErrorCode.OK] * 4 and ErrorCode.OK not in statuses[4:]
    assert replies[4].failed_index == 2  # the guest's index, not the forwarded one
    slot0 = SLOT_ST.unpack_from(pages[0], HEADER_ST.size)
    assert slot0[:3] == (100, 100, ErrorCode.OUT_OF_RANGE)


async def test_lane_agent_killed_in_flight(tmp_path: Path, agent_factory: Any) -> None:
    first = agent_factory()
    async with rig(tmp_path) as r:
        ctx = await lent_context(r, first)
        held = [await hold(ctx, 5, rec(Opcode.NOP, stream=s), stream=s) for s in (1, 2)]
        await until(lambda: lane_stats(r)["lane_submits"] >= 2, 5, "the lane sent no batches")
        first.kill()
        t0 = time.monotonic()
        for s, seq in zip((1, 2), held, strict=True):
            reply = await ctx.wait(s, seq, timeout=3)
            assert reply.status == ErrorCode.DEVICE_LOST and "lost" in reply.message
        assert time.monotonic() - t0 < 2.0
        assert (await ctx.run([rec(Opcode.NOP)])).status == ErrorCode.DEVICE_LOST
        assert not r.device.lanes.leases and lane_stats(r)["lane_lost"] == 1
        second = agent_factory()
        assert (await r.bind(second, replace=True))["ok"]  # still bound to the dead one
        assert (await ctx.run([rec(Opcode.NOP)])).status == ErrorCode.OK
        await lent(r, ctx)
        assert (await ctx.run([rec(Opcode.NOP)])).status == ErrorCode.OK


async def test_lane_agent_silent(tmp_path: Path, agent: AgentProc) -> None:
    """A stopped agent (its kernel still ACKs) answers no PING: after
    hang_after (1 s) of silence on a healthy link the lane's batches end with
    DEVICE_LOST naming a hung agent, within 2 s."""
    async with rig(tmp_path) as r:
        ctx = await lent_context(r, agent)
        seq = await hold(ctx, 5, rec(Opcode.NOP, stream=1))
        os.killpg(agent.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            reply = await ctx.wait(1, seq, timeout=4)
            assert reply.status == ErrorCode.DEVICE_LOST
            assert "host answers but the agent is silent" in reply.message
            assert time.monotonic() - t0 < 2.0
        finally:
            os.killpg(agent.proc.pid, signal.SIGCONT)


async def test_lane_backlog_comes_back_with_the_session(tmp_path: Path, agent: AgentProc) -> None:
    """The agent stops reading for a moment (SIGSTOP, well under the 1 s of
    silence) while the lane sends 48 KiB batches on a socket with a small send
    buffer: once the agent's receive window is full the kernel takes part of
    a frame and the rest waits in the lane's backlog; the lane does not wait
    on it. The context's next batch goes to Python, which takes the session
    back with the backlog and writes it first. Once the agent runs again
    every batch completes, in order."""
    async with rig(tmp_path) as r:
        ctx = await lent_context(r, agent)
        (h,) = await alloc(ctx, 64)
        await lent(r, ctx)
        lease = r.device.lanes.leases[ctx.ctx_id]
        sock = lease.session._transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        before = lane_stats(r)["lane_backlogged"]
        seqs = []
        os.killpg(agent.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            for i in range(1, 41):  # 1.9 MiB at most; the window is far smaller
                big = [rec(Opcode.NOP)] * 3000 + [rec(Opcode.MEMSET, h, i, 0, 64)]
                seqs.append(await ctx.start(big))
                if not r.device.lanes.leased(r.device.contexts[ctx.ctx_id]):
                    break  # the lane declined it for the backlog: Python took it back
            assert not r.device.lanes.leased(r.device.contexts[ctx.ctx_id]), "never taken back"
            assert lane_stats(r)["lane_backlogged"] > before
            seqs.append(await ctx.start([rec(Opcode.MEMSET, h, 0xEE, 0, 64)]))  # Python's
            assert time.monotonic() - t0 < 0.8, "too slow to stay under the silence limit"
        finally:
            os.killpg(agent.proc.pid, signal.SIGCONT)
        for seq in seqs:
            assert (await ctx.wait(0, seq, timeout=10)).status == ErrorCode.OK
        dst = await ctx.create_bo(64)
        assert (await ctx.run([rec(Opcode.COPY_D2H, h, dst.resource_id, 0, 0, 64)])).ok
        assert dst.read() == b"\xee" * 64  # the last batch ran last
        assert r.device.status()["binding"] == "bound"


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "python"])
async def test_unref_waits_for_batches_using_the_resource(
    tmp_path: Path, agent: AgentProc, lane: bool
) -> None:
    """A process frees a buffer (GEM close: CTX_DETACH_RESOURCE, UNREF) that
    a batch held on the agent will write its reply into. Linux frees the
    pages when UNREF is answered, and they may then be another process's: so
    the answer waits until the batch has finished (other commands are served
    meanwhile, out of order), and the reply lands while the pages are still
    the buffer's. A buffer no batch uses is answered at once."""
    async with rig(tmp_path, lane=lane) as r:
        ctx = await session_context(r, agent, lane)
        out = await ctx.create_bo(4096)
        sig = rec(Opcode.SIGNAL, 1, out.resource_id, 0, 256, stream=2)
        held = await hold(ctx, 9, sig)
        unref = asyncio.create_task(ctx.close_bo(out))
        await until(lambda: r.device.status()["unrefs_held"] == 1, 5, "the UNREF was not held")
        assert not unref.done(), "UNREF answered while a batch still writes into the buffer"
        idle = await ctx.create_bo(4096)  # served meanwhile, and nothing uses it
        await asyncio.wait_for(ctx.close_bo(idle), 2)
        assert (await ctx.run([rec(Opcode.NOP)])).status == ErrorCode.OK
        assert (await ctx.run([rec(Opcode.EVENT_RECORD, 9)])).status == ErrorCode.OK
        assert (await ctx.wait(1, held, timeout=5)).status == ErrorCode.OK
        await asyncio.wait_for(unref, 5)
        ok = encode_completion(0, failed_index=NO_INDEX)
        assert out.read()[: len(ok)] == ok  # the reply landed before the pages went back
        assert r.device.status()["unrefs_held"] == 0


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "python"])
async def test_unref_of_the_fence_page_stops_its_writes(
    tmp_path: Path, agent: AgentProc, lane: bool
) -> None:
    """The fence page's buffer is freed: once UNREF is answered nothing more
    is written into its pages (they are the guest kernel's again); the
    context's batches still run and their replies still land."""
    async with rig(tmp_path, lane=lane) as r:
        ctx = await session_context(r, agent, lane)
        assert ctx.fence_bo is not None and ctx.reply_bo is not None
        fence = ctx.fence_bo
        await ctx.close_bo(fence)
        before = fence.read()
        ok = encode_completion(0, failed_index=NO_INDEX)
        slot = ctx._reply_next % REPLY_SLOTS
        await ctx.start([rec(Opcode.NOP)])
        reply_bo = ctx.reply_bo
        await until(
            lambda: reply_bo.read(slot * REPLY_SLOT, len(ok)) == ok, 5, "the batch never completed"
        )
        # Asserting an absence: the reply landed, and a late fence word would
        # follow it at once; 50 ms gives a wrong implementation time to write.
        await asyncio.sleep(0.05)
        assert fence.read() == before


async def test_lane_context_destroyed_in_flight(tmp_path: Path, agent: AgentProc) -> None:
    async with rig(tmp_path) as r:
        ctx, other = await lent_context(r, agent, "one"), await lent_context(r, agent, "two")
        seq = await hold(ctx, 5, rec(Opcode.NOP, stream=1))
        await ctx.destroy()
        reply = await ctx.wait(1, seq, timeout=2)
        assert reply.status == ErrorCode.DEVICE_LOST and "destroyed" in reply.message
        assert ctx.ctx_id not in r.device.contexts
        # The other context's session stays lent and served.
        n = lane_stats(r)["lane_submits"]
        assert (await other.run([rec(Opcode.NOP)])).status == ErrorCode.OK
        assert lane_stats(r)["lane_submits"] == n + 1


async def test_lane_new_memory_table_mid_flight(tmp_path: Path, agent: AgentProc) -> None:
    """QEMU stops the ring and sends a new memory table while the lane holds a
    batch: its fence word and reply land through the new mapping, the old
    one is closed, and the lane serves on the restarted ring."""
    async with rig(tmp_path) as r:
        ctx = await lent_context(r, agent)
        seq = await hold(ctx, 5, rec(Opcode.QUERY, stream=1))
        await until(lambda: held(r.device, ctx), 5, "the lane never sent the batch")
        table = r.device.host.memory if r.device.host is not None else None
        assert table is not None
        before = table.mem
        await r.fe.set_mem_table()
        assert table.mem is not before and before.closed  # the lane let go of it
        assert r.device.lanes.owns_ring()
        released = await ctx.run([rec(Opcode.EVENT_RECORD, 5)])
        assert released.status == ErrorCode.OK
        reply = await ctx.wait(1, seq, timeout=5)
        assert reply.status == ErrorCode.OK and reply.blob  # QUERY's info, via the new table
        await lent(r, ctx)
        n = lane_stats(r)["lane_submits"]
        assert (await ctx.run([rec(Opcode.NOP)])).status == ErrorCode.OK
        assert lane_stats(r)["lane_submits"] == n + 1


async def test_hostile_batches_on_a_lent_context(tmp_path: Path, agent: AgentProc) -> None:
    """What the lane declines reaches Python, which answers the exact error;
    the session stays usable."""
    async with rig(tmp_path) as r:
        ctx = await lent_context(r, agent)
        assert ctx.reply_bo is not None
        foreign = await r.gpu.open("other")
        bo = await foreign.create_bo(4096)
        for batch, code in (
            (encode_batch([rec(Opcode.NOP), rec(Opcode.SIGNAL, 1, bo.resource_id, 0, 64)]),
             ErrorCode.INVALID_HANDLE),
            (encode_batch([rec(Opcode.SIGNAL, 1, ctx.reply_bo.resource_id, 1 << 30, 64)]),
             ErrorCode.OUT_OF_RANGE),
            (encode_batch([rec(Opcode.NOP)])[:-3], ErrorCode.PROTOCOL),
            (struct.pack("<IHHII", 0x31424756, 1, 0, 16, 5000), ErrorCode.PROTOCOL),
        ):  # fmt: skip
            rejected = ctx.fence_header()[3]
            req = hdr(wire.Cmd.SUBMIT_3D, ctx_id=ctx.ctx_id) + struct.pack("<II", len(batch), 0)
            await r.gpu.call(req + batch, expect=wire.Resp.ERR_INVALID_PARAMETER)
            assert ctx.fence_header()[3:5] == (rejected + 1, code)
        assert (await ctx.run([rec(Opcode.NOP)])).status == ErrorCode.OK


async def test_hostile_chains_while_the_lane_owns_the_ring(
    tmp_path: Path, agent: AgentProc
) -> None:
    """Bad chains reach the lane first: it hands each to Python, which answers
    as it always did; an avail index run too far ahead is refused once, not
    spun on, and the ring serves again once the driver repairs it."""
    from vpcie.protocol.virtq import AVAIL_IDX

    async with rig(tmp_path) as r:
        ctx = await lent_context(r, agent)
        assert r.device.lanes.owns_ring()
        fe = r.fe
        handed = lane_stats(r)["lane_handed"]
        head = fe.ctrl.add(readable=[(1 << 40, 64)], writable=[(fe.alloc(64), 64)])
        fe.kick(0)
        assert await fe.wait_used(0, head) == 0
        fe.ctrl.add_raw_head(fe.ctrl.num + 44)  # a head past the queue, then a good one
        assert (await ctx.run([rec(Opcode.NOP)])).status == ErrorCode.OK
        assert lane_stats(r)["lane_handed"] >= handed + 2
        # avail.idx published num + 5 entries ahead of the device.
        ring = fe.ctrl
        ring._avail16[AVAIL_IDX >> 1] = (ring._published + ring.num + 5) & 0xFFFF
        kicked = lane_stats(r)["lane_kicks"]
        os.eventfd_write(fe.kick_fds[0], 1)
        await until(lambda: lane_stats(r)["lane_kicks"] > kicked, 5, "the lane saw no kick")
        # Let it finish with that kick (one pass over the bad index: Python's
        # turn and back): the counts stop moving; they are the baseline.
        seen: list[tuple[int, int]] = []

        def settled() -> bool:
            seen.append((lane_stats(r)["lane_kicks"], lane_stats(r)["lane_handed"]))
            return len(seen) > 1 and seen[-1] == seen[-2]

        await until(settled, 5, "the lane's counters never settled after the kick", 0.05)
        kicks, handed = lane_stats(r)["lane_kicks"], lane_stats(r)["lane_handed"]
        # Asserting an absence (no spinning on the bad index): 0.2 s in which a
        # spinning lane would hand or count thousands of times.
        await asyncio.sleep(0.2)
        assert lane_stats(r)["lane_handed"] == handed  # waiting for a kick, not spinning
        assert lane_stats(r)["lane_kicks"] == kicks
        ring._avail16[AVAIL_IDX >> 1] = ring._published  # the driver repairs it
        assert (await ctx.run([rec(Opcode.NOP)])).status == ErrorCode.OK
        n = lane_stats(r)["lane_submits"]
        assert (await ctx.run([rec(Opcode.NOP)])).status == ErrorCode.OK
        assert lane_stats(r)["lane_submits"] == n + 1


@pytest.mark.parametrize("lane", [False, True])
async def test_refused_batch_signals_after_earlier_work(
    tmp_path: Path, agent: AgentProc, lane: bool
) -> None:
    """A SIGNAL of a batch the backend refuses still waits for the work
    submitted before it (GUEST_ABI.md): the fence page must not say 'done'
    for a stream whose earlier batch is still running."""
    async with rig(tmp_path, lane=lane) as r:
        assert (await r.bind(agent))["ok"]
        ctx = await r.gpu.open()
        await alloc(ctx, 64)
        if lane:
            await lent(r, ctx)
        held = await hold(ctx, 7, rec(Opcode.NOP, stream=1))
        other = await r.gpu.open("other")
        foreign = await other.create_bo(4096)
        bad = encode_batch(
            [
                rec(Opcode.NOP, stream=1),
                rec(Opcode.SIGNAL, held + 1, foreign.resource_id, 0, 64, stream=1),
            ]
        )
        req = hdr(wire.Cmd.SUBMIT_3D, ctx_id=ctx.ctx_id) + struct.pack("<II", len(bad), 0)
        rejected = ctx.fence_header()[3]
        await r.gpu.call(req + bad, expect=wire.Resp.ERR_INVALID_PARAMETER)
        assert ctx.fence_header()[3:5] == (rejected + 1, ErrorCode.INVALID_HANDLE)  # at once
        # Asserting an absence: event 7 is recorded only below, so a right
        # backend never publishes; 0.2 s gives a wrong one time to.
        await asyncio.sleep(0.2)
        assert ctx.fence_slot(1)[0] < held, "a refused batch's SIGNAL overtook running work"
        assert (await ctx.run([rec(Opcode.EVENT_RECORD, 7, stream=2)], stream=2)).ok
        assert (await ctx.wait(1, held, timeout=5)).ok
        await until(lambda: ctx.fence_slot(1)[0] >= held + 1, 5, "the refused SIGNAL never came")
        assert ctx.fence_slot(1)[:3] == (held + 1, held + 1, ErrorCode.INVALID_HANDLE)
