"""Busy polling after a kick: bounded in time, off by default."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import until
from vpcie.backend.poller import MAX_POLL_WINDOW_S, BusyPoller


async def test_spins_for_the_window_then_sleeps() -> None:
    p = BusyPoller(0.005)
    t0 = time.monotonic()
    p.touch()
    await asyncio.sleep(0)  # the loop turns while spinning
    assert p.spins > 0 and p.spinning
    await until(lambda: not p.spinning, 1.0, "kept spinning after its window")
    spins = p.spins
    assert spins > 1  # how many more depends on the machine's load
    # Asserting an absence: 20 ms (four windows) in which a poller that
    # rearmed itself would have counted more spins.
    await asyncio.sleep(0.02)
    assert p.spins == spins, "kept spinning after its window"
    assert time.monotonic() - t0 < 1.0


async def test_off_by_default_and_window_capped() -> None:
    p = BusyPoller(0.0)
    p.touch()
    # Asserting an absence: 10 ms (a whole window at the maximum) to spin in.
    await asyncio.sleep(0.01)
    assert p.spins == 0 and not p.enabled and not p.spinning
    with pytest.raises(ValueError):
        BusyPoller(MAX_POLL_WINDOW_S * 2)


async def test_a_polling_backend_serves_the_guest(tmp_path: object) -> None:
    from pathlib import Path

    from vpcie.backend.server import BackendServer
    from vpcie.gpu.capset import decode_capset
    from vpcie.gpu.device import GpuDevice
    from vpcie.protocol.codes import ExecutorKind
    from vpcie.testing.frontend import VhostUserFrontend
    from vpcie.testing.guest_driver import FrontendTransport, GuestGpu

    device = GpuDevice()
    server = BackendServer(device, poll_s=0.0005)
    sock = str(Path(str(tmp_path)) / "vgpu.sock")
    task = asyncio.create_task(server.serve_path(sock))
    try:
        async with VhostUserFrontend.connect(sock, mem_size=32 << 20) as fe:
            gpu = GuestGpu(FrontendTransport(fe), fe.mem, fe.alloc)
            caps = decode_capset(await gpu.load())
            assert caps[1] == ExecutorKind.NONE
            ctx = await gpu.open()
            bo = await ctx.create_bo(8192, scatter=True)
            await ctx.close_bo(bo)
        assert server.core.poller.spins > 0
    finally:
        server.stop()
        await asyncio.wait_for(task, 5)
