"""The real ``vpcie-backend`` program as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from vpcie.testing import VhostUserFrontend

CMD = [sys.executable, "-m", "vpcie.backend_main"]


def events(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_print_capabilities() -> None:
    out = subprocess.run([*CMD, "--print-capabilities"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    caps = json.loads(out.stdout)
    assert caps["type"] == "gpu"
    assert "render-node" not in caps["features"]


def test_unknown_argument_exits_2() -> None:
    out = subprocess.run(
        [*CMD, "--render-node=/dev/dri/x"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert "unrecognized arguments" in out.stderr and out.stdout == ""


async def test_socket_path_serves_reconnects_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    path = str(tmp_path / "vgpu.sock")
    proc = await asyncio.create_subprocess_exec(
        *CMD, "--socket-path", path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        for _ in range(2):
            async with VhostUserFrontend.connect(path, timeout=15) as fe:
                head = fe.ctrl.add(readable=[bytes(24)], writable=[(fe.alloc(64), 64)])
                fe.kick(0)
                assert await fe.wait_used(0, head) == 24
                await fe.shutdown()
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert out == b""
    evs = events(err.decode())
    assert [e["connection"] for e in evs if e["event"] == "disconnected"] == [1, 2]
    assert not os.path.exists(path)


async def test_fd_mode_serves_one_connection(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = await asyncio.create_subprocess_exec(
        *CMD,
        f"--fd={theirs.fileno()}",
        pass_fds=[theirs.fileno()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    theirs.close()
    ours.setblocking(False)
    fe = VhostUserFrontend(ours, 16 << 20, 15.0)
    try:
        await fe.handshake()
        head = fe.ctrl.add(readable=[bytes(24)], writable=[(fe.alloc(64), 64)])
        fe.kick(0)
        assert await fe.wait_used(0, head) == 24
    finally:
        fe.close()
    # The inherited connection closed: the program is done.
    _out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()
    assert any(e["event"] == "inherited_connection" for e in events(err.decode()))
