"""A real QEMU 10 connects to the real ``vpcie-backend`` (no guest needed)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import until

pytestmark = pytest.mark.qemu

QEMU = shutil.which("qemu-system-x86_64")
CMD = [sys.executable, "-m", "vpcie.backend_main"]


def _qemu_major() -> int:
    if QEMU is None:
        return 0
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"version (\d+)\.", out)
    return int(m.group(1)) if m else 0


def _skip_reason() -> str | None:
    if QEMU is None:
        return "qemu-system-x86_64 not installed (needs QEMU 10 from bookworm-backports)"
    major = _qemu_major()
    if major < 10:
        return f"qemu-system-x86_64 is version {major}, vhost-user-gpu under TCG needs 10"
    return None


def qemu_cmd(sock: str) -> list[str]:
    assert QEMU is not None
    return [
        QEMU, "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "256M",
        "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
        "-machine", "q35,memory-backend=mem", "-nodefaults", "-no-reboot",
        "-display", "none", "-serial", "none", "-S",
        "-chardev", f"socket,id=vgpu,path={sock}",
        "-device", "vhost-user-gpu-pci,chardev=vgpu",
        "-qmp", "stdio",
    ]  # fmt: skip


def _events(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]


async def _wait_for(path: Path, what: str, timeout: float) -> list[dict[str, object]]:
    """Poll the backend's JSON log until an event ``what`` appears."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        evs = [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]
        if any(e["event"] == what for e in evs):
            return evs
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {what!r} event in {timeout} s:\n{path.read_text()}")


async def test_qemu_handshake_quit_and_backend_exit(tmp_path: Path) -> None:
    reason = _skip_reason()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    sock = str(tmp_path / "vgpu.sock")
    log = tmp_path / "backend.log"
    with log.open("wb") as logf:
        backend = await asyncio.create_subprocess_exec(
            *CMD, "--socket-path", sock, stdout=subprocess.PIPE, stderr=logf
        )
    qemu = None
    try:
        await _wait_for(log, "listening", 15)
        qemu = await asyncio.create_subprocess_exec(
            *qemu_cmd(sock),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        evs = await _wait_for(log, "connected", 15)
        # realize: vhost_dev_init's queries, SET_OWNER, per-queue CALL/ERR;
        # QEMU is told to quit only once it has sent them all.
        await until(
            lambda: [e.get("request") for e in _events(log)].count("SET_VRING_ERR") >= 2,
            15,
            lambda: f"QEMU's realize never finished:\n{log.read_text()}",
        )
        assert qemu.stdin is not None
        qemu.stdin.write(b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n')
        await qemu.stdin.drain()
        qout, _ = await asyncio.wait_for(qemu.communicate(), 15)
        assert qemu.returncode == 0, qout.decode()
        evs = await _wait_for(log, "disconnected", 15)
        requests = [e["request"] for e in evs if e["event"] == "message"]
        # DESIGN.md "Handshake QEMU performs", the part that needs no guest.
        assert requests[:5] == [
            "GET_FEATURES",
            "GET_PROTOCOL_FEATURES",
            "SET_PROTOCOL_FEATURES",
            "GET_QUEUE_NUM",
            "SET_OWNER",
        ]
        for ring in (0, 1):
            for req in ("SET_VRING_CALL", "SET_VRING_ERR"):
                assert any(
                    e.get("request") == req and f"index={ring}" in str(e.get("payload"))
                    for e in evs
                ), (req, ring)
        proto = next(e for e in evs if e.get("request") == "SET_PROTOCOL_FEATURES")
        acked = int(str(proto["value"]), 16)
        assert acked & (1 << 0) and acked & (1 << 3) and acked & (1 << 9)  # MQ REPLY_ACK CONFIG
        (gone,) = [e for e in evs if e["event"] == "disconnected"]
        assert gone["reason"] == "eof"
        assert not any(e["level"] == "error" for e in evs)
        # The backend keeps accepting after QEMU left; SIGTERM ends it cleanly.
        assert backend.returncode is None
        backend.send_signal(signal.SIGTERM)
        await asyncio.wait_for(backend.wait(), 15)
        assert backend.returncode == 0, log.read_text()
    finally:
        for proc in (qemu, backend):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
