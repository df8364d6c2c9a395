"""Backend and QEMU restarts: a real QEMU 10 against the real ``vpcie-backend``.

What QEMU 10.0.2 does (verified on these machines):

- ``-chardev socket,...,reconnect-ms=N`` makes the chardev connect
  asynchronously, but vhost-user-gpu-pci's realize (backends/vhost-user.c
  ``vhost_user_backend_dev_init``) does not wait for it: QEMU exits at start
  with "Failed to set msg fds" / "vhost_backend_init failed: Protocol error".
  vhost-user-gpu has no CHR_EVENT handler either, so even a connected
  chardev would not redo the handshake. ``test_backend_restart_reconnect_ms``
  turns into a real check on a QEMU that fixes this and xfails (with the
  reason) on one that does not.
- Without reconnect-ms, QEMU survives the backend's SIGKILL (QMP answers, quit
  exits 0), never reconnects, and the restarted backend serves the next QEMU
  (the VM's next start) with the full handshake.
- The backend outlives QEMU: after one quits, the next one is served.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import until
from tests.integration.test_qemu_handshake import CMD, _skip_reason, _wait_for, qemu_cmd

pytestmark = pytest.mark.qemu

Proc = asyncio.subprocess.Process
START_TIMEOUT = 15.0  # s: backend listening, QEMU connected (2 loaded cores)
# QEMU's first messages on every connection (DESIGN.md "Handshake QEMU performs").
HANDSHAKE_START = [
    "GET_FEATURES",
    "GET_PROTOCOL_FEATURES",
    "SET_PROTOCOL_FEATURES",
    "GET_QUEUE_NUM",
    "SET_OWNER",
]
REALIZE_FAILED = "Failed to set msg fds"  # QEMU 10.0.2 + reconnect-ms, see module doc


def _skip_without_qemu() -> None:
    reason = _skip_reason()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)


async def start_backend(sock: Path, log: Path) -> Proc:
    with log.open("ab") as logf:
        proc = await asyncio.create_subprocess_exec(
            *CMD,
            "--socket-path",
            str(sock),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=logf,
        )
    await _wait_for(log, "listening", START_TIMEOUT)
    return proc


async def start_qemu(sock: Path, *, reconnect_ms: int = 0) -> Proc:
    cmd = qemu_cmd(str(sock))
    if reconnect_ms:
        cmd = [a + f",reconnect-ms={reconnect_ms}" if a.startswith("socket,") else a for a in cmd]
    return await asyncio.create_subprocess_exec(
        *cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


class Qmp:
    """Just enough QMP over QEMU's stdio (``-qmp stdio``)."""

    def __init__(self, proc: Proc) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.out: list[str] = []
        self._ready = False

    async def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            raise AssertionError("QEMU exited:\n" + "".join(self.out))
        text = raw.decode(errors="replace")
        self.out.append(text)
        try:
            msg = json.loads(text)
        except json.JSONDecodeError:
            return {}  # a stderr line (merged into stdout)
        return msg if isinstance(msg, dict) else {}

    async def execute(self, command: str, timeout: float = 10.0) -> Any:
        assert self.proc.stdin is not None
        if not self._ready:
            while "QMP" not in await self._line(timeout):
                pass
            self._ready = True
            await self.execute("qmp_capabilities", timeout)
        self.proc.stdin.write(json.dumps({"execute": command}).encode() + b"\n")
        await self.proc.stdin.drain()
        while True:
            msg = await self._line(timeout)
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise AssertionError(f"QMP {command}: {msg['error']}")

    async def quit(self, timeout: float = 15.0) -> str:
        """``quit``; waits for QEMU to exit 0 and returns all it printed."""
        await self.execute("quit", timeout)
        rest, _ = await asyncio.wait_for(self.proc.communicate(), timeout)
        out = "".join(self.out) + rest.decode(errors="replace")
        assert self.proc.returncode == 0, out
        return out


def events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]


def connections(evs: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The log split at each ``connected`` event: one list per QEMU connection."""
    out: list[list[dict[str, Any]]] = []
    for e in evs:
        if e["event"] == "connected":
            out.append([])
        if out:
            out[-1].append(e)
    return out


def requests(conn: Sequence[dict[str, Any]]) -> list[str]:
    return [str(e["request"]) for e in conn if e["event"] == "message"]


async def wait_handshake(log: Path, count: int, timeout: float = START_TIMEOUT) -> list[str]:
    """Wait until connection number ``count`` did QEMU's realize-time handshake."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        conns = connections(events(log))
        if len(conns) >= count:
            reqs = requests(conns[count - 1])
            # realize ends with per-queue SET_VRING_CALL/ERR (2 queues)
            if reqs[:5] == HANDSHAKE_START and reqs.count("SET_VRING_ERR") >= 2:
                return reqs
        await asyncio.sleep(0.1)
    raise AssertionError(f"no handshake on connection {count} in {timeout} s:\n{log.read_text()}")


def assert_clean(log: Path) -> None:
    errors = [e for e in events(log) if e["level"] in ("error", "critical")]
    assert not errors, errors


async def cleanup(*procs: Proc | None) -> None:
    for proc in procs:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_backend_restart_reconnect_ms(tmp_path: Path) -> None:
    """SIGKILL the backend, start another on the same path: QEMU with
    reconnect-ms must come back and redo the handshake."""
    _skip_without_qemu()
    sock, log1, log2 = tmp_path / "vgpu.sock", tmp_path / "b1.log", tmp_path / "b2.log"
    b1 = b2 = qemu = None
    try:
        b1 = await start_backend(sock, log1)
        qemu = await start_qemu(sock, reconnect_ms=500)
        qmp = Qmp(qemu)
        try:
            await qmp.execute("query-status")
        except AssertionError:
            out = "".join(qmp.out)
            if REALIZE_FAILED in out:
                pytest.xfail(
                    "QEMU's vhost-user-gpu-pci cannot start with reconnect-ms (realize does "
                    f"not wait for the async connect: {REALIZE_FAILED!r}); backend restarts "
                    "need a VM restart"
                )
            raise
        await wait_handshake(log1, 1)
        b1.send_signal(signal.SIGKILL)
        await b1.wait()
        b2 = await start_backend(sock, log2)
        reqs = await wait_handshake(log2, 1)
        assert reqs[:5] == HANDSHAKE_START
        assert (await qmp.execute("query-status"))["status"] == "prelaunch"
        await qmp.quit()
        assert_clean(log2)
    finally:
        await cleanup(qemu, b1, b2)


async def test_backend_sigkill_qemu_survives_next_qemu_handshakes(tmp_path: Path) -> None:
    """No reconnect-ms: QEMU outlives a SIGKILLed backend and quits cleanly;
    a backend restarted on the same (stale) socket path serves the next QEMU."""
    _skip_without_qemu()
    sock, log1, log2 = tmp_path / "vgpu.sock", tmp_path / "b1.log", tmp_path / "b2.log"
    b1 = b2 = q1 = q2 = None
    try:
        b1 = await start_backend(sock, log1)
        q1 = await start_qemu(sock)
        qmp1 = Qmp(q1)
        await wait_handshake(log1, 1)
        b1.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(b1.wait(), 10) == -signal.SIGKILL
        assert sock.exists()  # SIGKILL left the socket file behind
        b2 = await start_backend(sock, log2)  # removes the stale file and listens
        assert (await qmp1.execute("query-status"))["status"] == "prelaunch"
        # QEMU's vhost-user chardev has no reconnect: the first VM stays
        # disconnected (its vGPU is dead) until it is restarted. Asserting an
        # absence: 1.5 s in which a reconnecting QEMU would have come back.
        await asyncio.sleep(1.5)
        assert connections(events(log2)) == []
        await qmp1.quit()
        q2 = await start_qemu(sock)
        qmp2 = Qmp(q2)
        reqs = await wait_handshake(log2, 1)
        assert reqs[:5] == HANDSHAKE_START
        for req in ("SET_VRING_CALL", "SET_VRING_ERR"):
            assert reqs.count(req) == 2, reqs
        await qmp2.quit()
        await _wait_for(log2, "disconnected", START_TIMEOUT)
        assert b2.returncode is None
        assert_clean(log2)
    finally:
        await cleanup(q1, q2, b1, b2)


async def test_backend_outlives_qemu_and_serves_the_next(tmp_path: Path) -> None:
    """The backend keeps running while QEMU quits; a second QEMU connects to
    the same backend and gets the whole handshake again on a fresh connection."""
    _skip_without_qemu()
    sock, log = tmp_path / "vgpu.sock", tmp_path / "backend.log"
    backend = q1 = q2 = None
    try:
        backend = await start_backend(sock, log)
        q1 = await start_qemu(sock)
        await wait_handshake(log, 1)
        await Qmp(q1).quit()
        q2 = await start_qemu(sock)
        reqs2 = await wait_handshake(log, 2)
        assert reqs2[:5] == HANDSHAKE_START
        await Qmp(q2).quit()

        def disconnections() -> list[dict[str, Any]]:
            return [e for e in events(log) if e["event"] == "disconnected"]

        await until(
            lambda: len(disconnections()) >= 2,
            START_TIMEOUT,
            lambda: f"two disconnections were not logged:\n{log.read_text()}",
        )
        gone = disconnections()
        assert [(e["connection"], e["reason"]) for e in gone] == [(1, "eof"), (2, "eof")]
        conns = connections(events(log))
        assert [c[0]["connection"] for c in conns] == [1, 2]
        assert all(c[0]["peer_pid"] == p.pid for c, p in zip(conns, (q1, q2), strict=True))
        assert backend.returncode is None
        backend.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(backend.wait(), 15) == 0, log.read_text()
        assert not os.path.exists(sock)
        assert_clean(log)
    finally:
        await cleanup(q1, q2, backend)
