"""Many control commands in flight at once (as a guest with several processes
sends them): every one gets its own answer, heads are never mixed up."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

from tests.integration.test_vgpu_device import rig
from vpcie.protocol import virtio_gpu as wire
from vpcie.testing.guest_driver import FrontendTransport, GuestGpu, hdr


async def test_eight_in_flight_control_commands(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        gpu = GuestGpu(FrontendTransport(r.fe, slots=8), r.fe.mem, r.fe.alloc)

        async def worker(base: int) -> int:
            done = 0
            for i in range(300):
                rid = base + i % 50
                await gpu.call(
                    hdr(wire.Cmd.RESOURCE_CREATE_2D) + struct.pack("<IIII", rid, 1, 64, 64)
                )
                await gpu.call(hdr(wire.Cmd.RESOURCE_UNREF) + struct.pack("<II", rid, 0))
                done += 1
            return done

        counts = await asyncio.gather(*(worker(1000 * (k + 1)) for k in range(8)))
        assert counts == [300] * 8
        assert len(r.device.resources) == 0
        assert r.device.stats["errors"] == 0
