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


async def test_a_flooding_guest_cannot_flood_the_log(tmp_path: Path) -> None:
    """Thousands of refused commands: each is answered, but the log keeps to
    its budget and says how many guest-caused lines it dropped."""
    import struct

    path = str(tmp_path / "vgpu.sock")
    log_path = tmp_path / "backend.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *CMD, "--socket-path", path, stdout=log, stderr=subprocess.STDOUT
        )
    unknown = struct.pack("<IIQIB3x", 0xDEAD, 0, 0, 0, 0)  # no such virtio-gpu command
    try:
        async with VhostUserFrontend.connect(path, timeout=15) as fe:
            resp, req = fe.alloc(64), fe.alloc(64)
            fe.mem.write(req, unknown)
            bad = {"readable": [(req, len(unknown))], "writable": [(resp, 64)], "indirect": True}
            for _ in range(10):  # 2,000 refused commands, in rounds of 200
                heads = [fe.ctrl.add(**bad) for _ in range(200)]  # type: ignore[arg-type]
                fe.kick(0)
                for head in heads:
                    assert await fe.wait_used(0, head) == 24
            assert struct.unpack_from("<I", fe.mem.read(resp, 4))[0] == 0x1200  # ERR_UNSPEC
            # Time must pass for the log budget to refill (it is a clock-driven
            # token bucket); nothing below depends on how much more than 0.3 s.
            await asyncio.sleep(0.3)
            head = fe.ctrl.add(**bad)  # type: ignore[arg-type]
            fe.kick(0)
            assert await fe.wait_used(0, head) == 24
            await fe.shutdown()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = [e for e in events(log_path.read_text()) if "unsupported" in str(e.get("event"))]
    assert 50 <= len(lines) <= 200, len(lines)  # the burst and a little refill, not 2,001
    assert "guest-caused log lines dropped before this" in str(lines[-1]["event"])
