"""The asyncio backend in-process, driven by the QEMU-playing test frontend."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vpcie.backend.device import VIRTIO_GPU_RESP_ERR_UNSPEC, NullGpuDevice
from vpcie.backend.server import BackendServer
from vpcie.testing.frontend import VhostUserFrontend
from vpcie.vhost_user.connection import Runstate
from vpcie.vhost_user.constants import Request
from vpcie.vhost_user.messages import VringState

CTRL_HDR = struct.Struct("<IIQIB3x")
GET_DISPLAY_INFO = 0x0100
FLAG_FENCE = 1


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[tuple[BackendServer, str]]:
    events: list[tuple[str, dict[str, object]]] = []
    server = BackendServer(NullGpuDevice(num_capsets=1), event=lambda e, **f: events.append((e, f)))
    path = str(tmp_path / "vgpu.sock")
    task = asyncio.create_task(server.serve_path(path))
    server.events = events  # type: ignore[attr-defined]
    yield server, path
    server.stop()
    await asyncio.wait_for(task, 5)


async def test_handshake_and_error_response(backend: tuple[BackendServer, str]) -> None:
    server, path = backend
    async with VhostUserFrontend.connect(path, mem_size=16 << 20) as fe:
        assert fe.queue_num == 2
        _events_read, _events_clear, scanouts, capsets = struct.unpack("<IIII", fe.config)
        assert capsets == 1 and scanouts == 1
        assert server.connection is not None
        assert server.connection.state is Runstate.RUNNING
        reply_gpa = fe.alloc(4096)
        for fence in (7, 8, 9):
            req = CTRL_HDR.pack(GET_DISPLAY_INFO, FLAG_FENCE, fence, 3, 0)
            head = fe.ctrl.add(readable=[req], writable=[(reply_gpa, 4096)], indirect=True)
            fe.kick(0)
            written = await fe.wait_used(0, head)
            assert written == 24
            rtype, flags, fence_id, ctx, _ = CTRL_HDR.unpack(fe.mem.read(reply_gpa, 24))
            assert (rtype, flags, fence_id, ctx) == (VIRTIO_GPU_RESP_ERR_UNSPEC, 1, fence, 3)
        head = fe.cursor.add(readable=[bytes(56)], writable=[])
        fe.kick(1)
        assert await fe.wait_used(1, head) == 0
        bases = await fe.shutdown()
        assert bases == [3, 1]
        state: Runstate = server.connection.state
        assert state is Runstate.STOPPED


async def test_reconnect_restores_ring_base(backend: tuple[BackendServer, str]) -> None:
    server, path = backend
    async with VhostUserFrontend.connect(path) as fe:
        buf = fe.alloc(64)
        head = fe.ctrl.add(readable=[bytes(24)], writable=[(buf, 64)])
        fe.kick(0)
        await fe.wait_used(0, head)
    # The first connection closed without a shutdown (QEMU crashed); the
    # backend accepts the next one, which resumes at the base it sends.
    async with VhostUserFrontend.connect(path, handshake=False) as fe:
        await fe.handshake()
        assert await fe.call(Request.GET_VRING_BASE, VringState(0, 0)) == VringState(0, 0)
        await fe.start_queue(0, base=0)
        head = fe.ctrl.add(readable=[bytes(24)], writable=[(fe.alloc(64), 64)])
        fe.kick(0)
        assert await fe.wait_used(0, head) == 24
    assert server.connections == 2


async def test_protocol_error_closes_and_backend_keeps_serving(
    backend: tuple[BackendServer, str],
) -> None:
    server, path = backend
    async with VhostUserFrontend.connect(path, handshake=False) as fe:
        # SET_MEM_TABLE before SET_OWNER: wrong state -> the backend hangs up.
        await fe.send_raw(struct.pack("<III", 5, 0x1, 8) + struct.pack("<II", 0, 0))
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(fe.sock, 64), 5)
        assert data == b""
    events = server.events  # type: ignore[attr-defined]
    disconnects = [f for e, f in events if e == "disconnected"]
    assert "before SET_OWNER" in str(disconnects[-1]["reason"])
    async with VhostUserFrontend.connect(path) as fe:
        assert fe.queue_num == 2
