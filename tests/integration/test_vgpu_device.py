"""The vGPU end to end: a guest driver (the harness playing QEMU + the Linux
driver's command sequences) -> the virtio-gpu model in a vpcie backend -> a
real ``vpcie-agent`` (CPU executor) over TCP, and back into guest pages."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import AgentProc, until
from vpcie.backend.server import BackendServer
from vpcie.control.client import control_request
from vpcie.control.server import ControlServer
from vpcie.errors import ErrorCode
from vpcie.gpu.binding import Binding
from vpcie.gpu.capset import decode_capset
from vpcie.gpu.device import GpuDevice
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import DType, ExecutorKind, Opcode
from vpcie.protocol.frames import decode_payload
from vpcie.testing.frontend import VhostUserFrontend
from vpcie.testing.guest_driver import FrontendTransport, GuestContext, GuestGpu

pytestmark = pytest.mark.timeout(90)


@dataclass
class Rig:
    device: GpuDevice
    control: str
    gpu: GuestGpu
    fe: VhostUserFrontend

    async def bind(self, agent: AgentProc, **extra: object) -> dict[str, object]:
        req = {"op": "bind", "agent": agent.address, "psk_file": str(agent.psk_file), **extra}
        return await control_request(self.control, req)

    async def unbind(self) -> dict[str, object]:
        return await control_request(self.control, {"op": "unbind"})


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, *, lane: bool = True) -> AsyncIterator[Rig]:
    binding = Binding()
    device = GpuDevice(binding, lane=lane)
    server = BackendServer(device)
    sock = str(tmp_path / "vgpu.sock")
    ctl = ControlServer(device, binding)
    await ctl.start(sock + ".ctl")
    task = asyncio.create_task(server.serve_path(sock))
    try:
        async with VhostUserFrontend.connect(sock, mem_size=256 << 20) as fe:
            gpu = GuestGpu(FrontendTransport(fe), fe.mem, fe.alloc)
            await gpu.load()
            yield Rig(device, sock + ".ctl", gpu, fe)
    finally:
        ctl.close()
        server.stop()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 5)


def held(device: GpuDevice, ctx: GuestContext) -> bool:
    """A batch of ``ctx`` has left the backend for its agent session and not
    come back (in Python's in-flight list, or sent by the lane)."""
    status = device.status()
    (mine,) = [c for c in status["contexts"] if c["id"] == ctx.ctx_id]
    return bool(mine["inflight"]) or status.get("lane_submits", 0) > status.get("lane_completed", 0)


async def alloc(ctx: GuestContext, *sizes: int) -> list[int]:
    reply = await ctx.run([rec(Opcode.MEM_ALLOC, n, 0) for n in sizes])
    assert reply.status == ErrorCode.OK, reply
    return [reply.value(i) for i in range(len(sizes))]


async def test_compute_through_the_vgpu(tmp_path: Path, agent: AgentProc) -> None:
    async with rig(tmp_path) as r:
        status = await control_request(r.control, {"op": "status"})
        assert status["ok"] and status["binding"] == "unbound"
        assert (await r.bind(agent))["ok"]
        caps = decode_capset(await r.gpu.get_capset())
        assert caps[1] == ExecutorKind.CPU  # honest: the agent has no GPU here
        ctx = await r.gpu.open("python3.11")
        q = await ctx.run([rec(Opcode.QUERY)])
        assert decode_payload("QUERY_INFO", q.blob)[1] == ExecutorKind.CPU
        m, k, n = 48, 40, 24
        rng = np.random.default_rng(5)
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        # Scattered guest pages: the backing lists have many entries.
        bo_a = await ctx.create_bo(a.nbytes, scatter=True)
        bo_b = await ctx.create_bo(b.nbytes, scatter=True)
        bo_c = await ctx.create_bo(m * n * 4, scatter=True)
        bo_a.write(a.tobytes())
        bo_b.write(b.tobytes())
        ha, hb, hc = await alloc(ctx, a.nbytes, b.nbytes, m * n * 4)
        reply = await ctx.run(
            [
                rec(Opcode.COPY_H2D, ha, bo_a.resource_id, 0, 0, a.nbytes),
                rec(Opcode.COPY_H2D, hb, bo_b.resource_id, 0, 0, b.nbytes),
                rec(Opcode.GEMM, DType.F32, 0, 0, m, n, k, 1.0, 0.0, ha, hb, hc, 0, 0, 0),
                rec(Opcode.COPY_D2H, hc, bo_c.resource_id, 0, 0, m * n * 4),
            ]
        )
        assert reply.status == ErrorCode.OK, reply
        c = np.frombuffer(bo_c.read(), dtype=np.float32).reshape(m, n)
        np.testing.assert_allclose(c, a @ b, rtol=1e-4, atol=1e-4)
        # A 3 MiB round trip with checksums, and a reduction whose value comes back.
        blob = rng.integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
        src = await ctx.create_bo(len(blob), scatter=True)
        dst = await ctx.create_bo(len(blob))
        src.write(blob)
        (h,) = await alloc(ctx, len(blob))
        reply = await ctx.run(
            [
                rec(Opcode.COPY_H2D, h, src.resource_id, 0, 0, len(blob)),
                rec(Opcode.COPY_D2H, h, dst.resource_id, 0, 0, len(blob)),
            ]
        )
        assert reply.status == ErrorCode.OK
        assert hashlib.sha256(dst.read()).digest() == hashlib.sha256(blob).digest()
        ones = np.ones(1000, dtype=np.float32)
        bo1 = await ctx.create_bo(ones.nbytes)
        bo1.write(ones.tobytes())
        hx, hout = await alloc(ctx, ones.nbytes, 4)
        reply = await ctx.run(
            [
                rec(Opcode.COPY_H2D, hx, bo1.resource_id, 0, 0, ones.nbytes),
                rec(Opcode.REDUCE_SUM, DType.F32, hx, hout, 1000, 0, 0),
            ]
        )
        assert reply.status == ErrorCode.OK and reply.value_f64(1) == pytest.approx(1000.0)
        await ctx.destroy()


async def test_contexts_are_isolated_sessions(tmp_path: Path, agent: AgentProc) -> None:
    async with rig(tmp_path) as r:
        assert (await r.bind(agent))["ok"]
        one, two = await r.gpu.open("one"), await r.gpu.open("two")
        (h1,) = await alloc(one, 4096)
        bo = await two.create_bo(4096)
        # Handle numbers are per agent session: context two cannot reach one's memory.
        reply = await two.run([rec(Opcode.COPY_D2H, h1, bo.resource_id, 0, 0, 4096)])
        assert reply.status == ErrorCode.INVALID_HANDLE
        status = await control_request(r.control, {"op": "status"})
        assert [c["session"] for c in status["contexts"]] == [True, True]  # type: ignore[index]


async def test_unbind_in_flight_ends_with_device_lost(tmp_path: Path, agent: AgentProc) -> None:
    async with rig(tmp_path) as r:
        assert (await r.bind(agent))["ok"]
        ctx = await r.gpu.open()
        await alloc(ctx, 64)
        # Hold stream 1 behind an event nobody records yet: in flight on the agent.
        seq = await ctx.start(
            [rec(Opcode.EVENT_WAIT, 7, stream=1), rec(Opcode.NOP, stream=1)], stream=1
        )
        await until(lambda: held(r.device, ctx), 5, "the batch never went to the agent")
        assert ctx.fence_slot(1)[0] < seq
        t0 = time.monotonic()
        assert (await r.unbind())["ok"]
        reply = await ctx.wait(1, seq, timeout=2.0)
        assert reply.status == ErrorCode.DEVICE_LOST
        assert time.monotonic() - t0 < 2.0
        # Unbound now: QUERY says so, work fails with NO_DEVICE.
        reply = await ctx.run([rec(Opcode.MEM_ALLOC, 64, 0)])
        assert reply.status == ErrorCode.NO_DEVICE
        caps = decode_capset(await r.gpu.get_capset())
        assert caps[1] == ExecutorKind.NONE
        # Bind again: the guest's context works on the new session.
        assert (await r.bind(agent))["ok"]
        assert len(await alloc(ctx, 64)) == 1


async def test_agent_killed_mid_stream(tmp_path: Path, agent_factory: object) -> None:
    first = agent_factory()  # type: ignore[operator]
    async with rig(tmp_path) as r:
        assert (await r.bind(first))["ok"]
        ctx = await r.gpu.open()
        await alloc(ctx, 64)
        big = await ctx.create_bo(32 << 20)
        (h,) = await alloc(ctx, 32 << 20)
        copy = rec(Opcode.COPY_H2D, h, big.resource_id, 0, 0, 32 << 20)
        seqs = [await ctx.start([copy]) for _ in range(4)]
        # The last batch waits on an event nobody records: still in flight at
        # the kill however fast the copies ran (a slow submitter, e.g. under
        # ASan, lets all four finish first).
        seqs.append(await ctx.start([rec(Opcode.EVENT_WAIT, 13), copy]))
        first.kill()
        t0 = time.monotonic()
        replies = [await ctx.wait(0, s, timeout=3.0) for s in seqs]
        assert time.monotonic() - t0 < 2.0
        # Those that had finished before the kill are OK; every other one is DEVICE_LOST.
        assert {x.status for x in replies} <= {ErrorCode.OK, ErrorCode.DEVICE_LOST}
        assert replies[-1].status == ErrorCode.DEVICE_LOST
        later = await ctx.run([rec(Opcode.NOP)])
        assert later.status == ErrorCode.DEVICE_LOST
        # A bind to a live agent fails cleanly for a dead one, and works for a
        # new one (replace: the vGPU is still bound to the dead agent).
        bad = await r.bind(first, replace=True)
        assert not bad["ok"] and "error" in bad
        second = agent_factory()  # type: ignore[operator]
        assert (await r.bind(second, replace=True))["ok"]
        ok = await ctx.run([rec(Opcode.NOP)])
        assert ok.status == ErrorCode.OK


async def test_bind_with_wrong_key_is_refused(tmp_path: Path, agent: AgentProc) -> None:
    async with rig(tmp_path) as r:
        wrong = tmp_path / "wrong.psk"
        wrong.write_bytes(b"not-the-key-at-all-000")
        reply = await control_request(
            r.control, {"op": "bind", "agent": agent.address, "psk_file": str(wrong)}
        )
        assert not reply["ok"]
        assert (await control_request(r.control, {"op": "status"}))["binding"] == "unbound"
        reply = await control_request(r.control, {"op": "frobnicate"})
        assert not reply["ok"] and "unknown op" in str(reply["error"])


async def test_bind_over_mutual_tls(tmp_path: Path) -> None:
    """The backend binds an agent with mutual TLS (certificates from
    ``vpcie-agent pki``) and the guest computes through it."""
    import subprocess
    import sys

    from tests.conftest import ROOT, tls_agent_proc

    pki = tmp_path / "pki"
    agent_cli = [sys.executable, "-m", "host_agent.main", "pki"]
    for args in (
        ["init", "--dir", str(pki)],
        ["issue", "--dir", str(pki), "--name", "agent1", "--server", "--san", "127.0.0.1"],
        ["issue", "--dir", str(pki), "--name", "backend", "--client"],
    ):
        subprocess.run([*agent_cli, *args], check=True, cwd=ROOT, capture_output=True)
    with tls_agent_proc(pki) as port:
        async with rig(tmp_path) as r:
            req = {"op": "bind", "agent": f"127.0.0.1:{port}", "tls_dir": str(pki)}
            assert (await control_request(r.control, req))["ok"]
            ctx = await r.gpu.open()
            assert len(await alloc(ctx, 4096)) == 1
            # A TLS session is never lent to the lane (its socket carries
            # ciphertext made by asyncio): every batch takes the Python path.
            for _ in range(3):
                assert (await ctx.run([rec(Opcode.NOP)])).status == ErrorCode.OK
            assert not r.device.lanes.leases and "lane_submits" not in r.device.status()
            # The backend's certificate is checked: a folder without one is refused.
            bad = await control_request(r.control, {**req, "tls_name": "agent1-missing"})
            assert not bad["ok"]


async def test_hostile_chains_do_not_stop_the_device(tmp_path: Path) -> None:
    """Descriptors pointing outside guest RAM, an oversized request and a
    response buffer too small: each is answered (or returned empty) and the
    next good command is served."""
    import struct as st

    from vpcie.protocol import virtio_gpu as wire
    from vpcie.testing.guest_driver import hdr

    async with rig(tmp_path) as r:
        fe = r.fe
        # A readable descriptor far outside guest memory.
        head = fe.ctrl.add(readable=[(1 << 40, 64)], writable=[(fe.alloc(64), 64)])
        fe.kick(0)
        assert await fe.wait_used(0, head) == 0
        # A request larger than any command may be (SUBMIT_3D + 1 MiB cap).
        big = fe.alloc(2 << 20, 4096)
        resp = fe.alloc(64)
        head = fe.ctrl.add(readable=[(big, 2 << 20)], writable=[(resp, 64)], indirect=True)
        fe.kick(0)
        assert await fe.wait_used(0, head) == 24
        assert st.unpack_from("<I", fe.mem.read(resp, 4))[0] == wire.Resp.ERR_INVALID_PARAMETER
        # A display-info request with a 4-byte response buffer: truncated, not a crash.
        small = fe.alloc(4)
        head = fe.ctrl.add(readable=[hdr(wire.Cmd.GET_DISPLAY_INFO)], writable=[(small, 4)])
        fe.kick(0)
        assert await fe.wait_used(0, head) == 4
        # An avail entry naming a head past the queue size, then a good request
        # in the same kick: the bad entry is dropped (there is no id to give
        # back), the good one is answered.
        fe.ctrl.add_raw_head(fe.ctrl.num + 44)
        resp = fe.alloc(64)
        head = fe.ctrl.add(readable=[hdr(wire.Cmd.GET_DISPLAY_INFO)], writable=[(resp, 64)])
        fe.kick(0)
        assert await fe.wait_used(0, head) == 64
        assert r.device.host is not None
        assert r.device.host.queue(0) is not None
        # Still serving.
        caps = decode_capset(await r.gpu.get_capset())
        assert caps[1] == ExecutorKind.NONE


async def test_frontend_disconnect_mid_flight(tmp_path: Path, agent: AgentProc) -> None:
    """QEMU goes away while a batch is held on the agent: the backend drops the
    guest's contexts and agent sessions, keeps running, and serves the next
    frontend."""
    binding = Binding()
    device = GpuDevice(binding)
    server = BackendServer(device)
    sock = str(tmp_path / "vgpu.sock")
    task = asyncio.create_task(server.serve_path(sock))
    try:
        from vpcie.gpu.binding import AgentTarget

        binding.bind(AgentTarget("127.0.0.1", agent.port, psk=agent.psk))
        async with VhostUserFrontend.connect(sock, mem_size=64 << 20) as fe:
            gpu = GuestGpu(FrontendTransport(fe), fe.mem, fe.alloc)
            await gpu.load()
            ctx = await gpu.open()
            await alloc(ctx, 64)
            await ctx.start([rec(Opcode.EVENT_WAIT, 9, stream=2)], stream=2)
            await until(lambda: held(device, ctx), 5, "the batch never went to the agent")
            assert device.contexts[ctx.ctx_id].session is not None
        # The frontend is gone: contexts and sessions with it.
        await until(lambda: not device.contexts, 5, "contexts outlived their frontend")
        async with VhostUserFrontend.connect(sock, mem_size=64 << 20) as fe:
            gpu = GuestGpu(FrontendTransport(fe), fe.mem, fe.alloc)
            await gpu.load()
            ctx = await gpu.open()
            assert len(await alloc(ctx, 64)) == 1
    finally:
        server.stop()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 5)


async def test_signal_alone_waits_for_earlier_work(tmp_path: Path, agent: AgentProc) -> None:
    """A batch holding only a SIGNAL must not publish while work submitted
    before it on that stream is still running (else a guest would read D2H
    results that have not landed)."""
    from vpcie.protocol.batch import encode_batch

    async with rig(tmp_path) as r:
        assert (await r.bind(agent))["ok"]
        ctx = await r.gpu.open()
        await alloc(ctx, 64)
        # Stream 0 held on the agent behind an event nobody has recorded yet.
        await ctx.submit(encode_batch([rec(Opcode.EVENT_WAIT, 5), rec(Opcode.NOP)]))
        seq = await ctx.start([], stream=0)  # a batch of just SIGNAL(seq) on stream 0
        # Asserting an absence: nothing can be waited for, so give a wrong
        # implementation 0.3 s to publish the SIGNAL (a right one never does:
        # event 5 is recorded only below). A loaded machine can hide the bug
        # here, never fail a correct backend.
        await asyncio.sleep(0.3)
        assert ctx.fence_slot(0)[0] < seq, "SIGNAL published before the work ahead of it"
        released = await ctx.run([rec(Opcode.EVENT_RECORD, 5, stream=1)], stream=1)
        assert released.status == ErrorCode.OK
        reply = await ctx.wait(0, seq, timeout=5)
        assert reply.status == ErrorCode.OK


async def test_new_memory_table_mid_flight(tmp_path: Path, agent: AgentProc) -> None:
    """QEMU sends a new memory table (memory hotplug) while a D2H copy waits on
    the agent: the connection stays up, the copy lands in the guest's pages,
    and the old mapping is closed once nothing uses it."""
    async with rig(tmp_path) as r:
        assert (await r.bind(agent))["ok"]
        ctx = await r.gpu.open()
        blob = np.random.default_rng(3).integers(0, 256, 64 << 10, dtype=np.uint8).tobytes()
        src, dst = await ctx.create_bo(len(blob), scatter=True), await ctx.create_bo(len(blob))
        src.write(blob)
        (h,) = await alloc(ctx, len(blob))
        reply = await ctx.run([rec(Opcode.COPY_H2D, h, src.resource_id, 0, 0, len(blob))])
        assert reply.status == ErrorCode.OK
        seq = await ctx.start(
            [
                rec(Opcode.EVENT_WAIT, 11, stream=1),
                rec(Opcode.COPY_D2H, h, dst.resource_id, 0, 0, len(blob), stream=1),
            ],
            stream=1,
        )
        await until(lambda: held(r.device, ctx), 5, "the copy never went to the agent")
        assert ctx.fence_slot(1)[0] < seq
        table = r.device.host.memory if r.device.host is not None else None
        assert table is not None
        before = table.mem
        await r.fe.set_mem_table()  # same RAM, a fresh mapping in the backend
        assert table.mem is not before and table.retired == 1 and not before.closed
        released = await ctx.run([rec(Opcode.EVENT_RECORD, 11, stream=2)], stream=2)
        assert released.status == ErrorCode.OK
        reply = await ctx.wait(1, seq, timeout=5)
        assert reply.status == ErrorCode.OK, reply
        assert hashlib.sha256(dst.read()).digest() == hashlib.sha256(blob).digest()
        assert table.retired == 0 and before.closed
        assert (await ctx.run([rec(Opcode.QUERY)])).status == ErrorCode.OK
