"""The real ``vpcie-backend`` program as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vpcie.testing.frontend import VhostUserFrontend

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


# -- whose socket is it ------------------------------------------------------------------
def _start(tmp_path: Path, *args: str, log: str = "backend.log") -> subprocess.Popen[bytes]:
    with (tmp_path / log).open("wb") as out:
        return subprocess.Popen([*CMD, *args], stdout=out, stderr=subprocess.STDOUT)


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"backend exited {proc.returncode}"
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.terminate()
    try:
        return proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _refused(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    for word in words:
        assert word in r.stderr, r.stderr


async def _one_command(path: str) -> None:
    async with VhostUserFrontend.connect(path, timeout=15) as fe:
        head = fe.ctrl.add(readable=[bytes(24)], writable=[(fe.alloc(64), 64)])
        fe.kick(0)
        assert await fe.wait_used(0, head) == 24
        await fe.shutdown()


async def test_second_backend_on_a_live_socket_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "vgpu.sock"
    ctl = Path(f"{sock}.ctl")
    first = _start(tmp_path, "--socket-path", str(sock))
    try:
        _wait_for(ctl, first)
        r = subprocess.run([*CMD, "--socket-path", str(sock)], capture_output=True, text=True,
                           timeout=30)  # fmt: skip
        _refused(r, str(sock), "listens there")
        other = tmp_path / "other.sock"  # its own vhost-user path, the first one's control socket
        r = subprocess.run([*CMD, "--socket-path", str(other), "--control-socket", str(ctl)],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        _refused(r, str(ctl), "listens there")
        assert sock.exists() and ctl.exists() and not other.exists()
        await _one_command(str(sock))  # the first still serves
        assert first.poll() is None
    finally:
        assert _stop(first) == 0
    assert not sock.exists() and not ctl.exists()


def test_regular_file_at_socket_path_is_refused_and_kept(tmp_path: Path) -> None:
    precious = tmp_path / "disk.img"
    precious.write_bytes(b"guest data")
    r = subprocess.run([*CMD, "--socket-path", str(precious)], capture_output=True, text=True,
                       timeout=30)  # fmt: skip
    _refused(r, str(precious), "not a socket")
    assert precious.read_bytes() == b"guest data"
    sock = tmp_path / "vgpu.sock"
    r = subprocess.run([*CMD, "--socket-path", str(sock), "--control-socket", str(precious)],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    _refused(r, str(precious), "not a socket")
    assert precious.read_bytes() == b"guest data" and not sock.exists()


async def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "vgpu.sock"
    for path in (sock, Path(f"{sock}.ctl")):  # what a killed backend leaves
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    proc = _start(tmp_path, "--socket-path", str(sock))
    try:
        log = tmp_path / "backend.log"
        deadline = time.monotonic() + 20
        while "listening" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await _one_command(str(sock))
    finally:
        assert _stop(proc) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_socket_owner_group_and_mode(tmp_path: Path) -> None:
    import grp
    import pwd
    import stat

    sock = tmp_path / "vgpu.sock"
    ctl = Path(f"{sock}.ctl")
    proc = _start(tmp_path, "--socket-path", str(sock), "--socket-owner", "nobody",
                  "--socket-group", "nogroup", "--socket-mode", "0660")  # fmt: skip
    try:
        _wait_for(ctl, proc)
        _wait_for(sock, proc)
        for path in (sock, ctl):
            st = path.stat()
            assert stat.S_ISSOCK(st.st_mode)
            assert st.st_uid == pwd.getpwnam("nobody").pw_uid, path
            assert st.st_gid == grp.getgrnam("nogroup").gr_gid, path
            assert stat.S_IMODE(st.st_mode) == 0o660, (path, oct(st.st_mode))
    finally:
        assert _stop(proc) == 0
    r = subprocess.run([*CMD, "--socket-path", str(sock), "--socket-owner", "no-such-user-x"],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    _refused(r, "no-such-user-x")


def test_fd_mode_defaults_are_the_documented_places() -> None:
    from vpcie.backend_main import parse_args

    env = {k: os.environ.pop(k) for k in ("VPCIE_RUN_DIR", "VPCIE_LOG_DIR") if k in os.environ}
    try:
        args = parse_args(["--fd", "3"])
    finally:
        os.environ.update(env)
    assert (args.run_dir, args.log_dir) == ("/run/vpcie", "/var/log/vpcie")


FAKE_QEMU = "import sys, time; time.sleep(60)"


async def test_fd_mode_control_socket_and_log_named_after_the_guest(tmp_path: Path) -> None:
    """As libvirt does it: a socketpair made by someone else (here: us), one
    end to the backend, the other held by a QEMU whose command line names the
    guest. The backend finds that QEMU and puts NAME.ctl and NAME.log in the
    documented folders (VPCIE_RUN_DIR / VPCIE_LOG_DIR instead of /run/vpcie,
    /var/log/vpcie here)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu = subprocess.Popen(
        [sys.executable, "-c", FAKE_QEMU, "-name", "guest=web,,1,debug-threads=on", "-uuid", "x"],
        pass_fds=[ours.fileno()],
    )
    run_dir, log_dir = tmp_path / "run", tmp_path / "log"
    env = dict(os.environ, VPCIE_RUN_DIR=str(run_dir), VPCIE_LOG_DIR=str(log_dir))
    backend = subprocess.Popen(
        [*CMD, f"--fd={theirs.fileno()}"],
        pass_fds=[theirs.fileno()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # as libvirt: the log file is all there is
        env=env,
    )
    ours.close()
    theirs.close()
    try:
        ctl = run_dir / "web_1.ctl"
        _wait_for(ctl, backend)
        r = subprocess.run(
            [sys.executable, "-m", "vpcie.cli.main", "vgpu", "status", "--backend", str(ctl)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert r.returncode == 0 and "binding : unbound" in r.stdout, r.stderr
        log = log_dir / "web_1.log"
        deadline = time.monotonic() + 10  # logged just after the control socket opened
        while not (managed := [e for e in events(log.read_text()) if e["event"] == "managed"]):
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.05)
        assert managed[0]["name"] == "web,1" and managed[0]["control"] == str(ctl)
        early = [e for e in events(log.read_text()) if e["event"] == "inherited_connection"]
        assert early and early[0]["ts"] <= managed[0]["ts"]  # held until the name was known
    finally:
        qemu.kill()
        qemu.wait()
    # QEMU gone: the inherited connection ends, and so does the backend.
    assert backend.wait(15) == 0
    assert not ctl.exists()
    assert any(e["event"] == "exiting" for e in events(log.read_text()))


async def test_fd_mode_with_a_name(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = subprocess.Popen(
        [*CMD, f"--fd={theirs.fileno()}", "--name", "vgpu7", "--run-dir", str(tmp_path / "r"),
         "--log-dir", str(tmp_path / "l")],
        pass_fds=[theirs.fileno()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    theirs.close()
    try:
        _wait_for(tmp_path / "r" / "vgpu7.ctl", backend)
        assert (tmp_path / "l" / "vgpu7.log").exists()
    finally:
        ours.close()
    assert backend.wait(15) == 0


def test_fd_mode_run_dir_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    a, b = socket.socketpair()
    with a, b:
        r = subprocess.run(
            [*CMD, f"--fd={b.fileno()}", "--name", "n", "--run-dir", str(blocker / "run"),
             "--log-dir", str(tmp_path / "log")],
            pass_fds=[b.fileno()], capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    _refused(r, str(blocker / "run"), "as user")
