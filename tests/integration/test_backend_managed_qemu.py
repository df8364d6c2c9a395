"""Managed mode as libvirt runs it, with a real QEMU 10: a socketpair, one
end to ``vpcie-backend --fd=N`` and the other to QEMU's ``-chardev
socket,fd=M``, both running as libvirt-qemu. The backend learns the guest's
name from QEMU and puts its control socket and log in the documented folders
(here under a temporary root through VPCIE_RUN_DIR / VPCIE_LOG_DIR)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.integration.test_qemu_handshake import QEMU, _skip_reason

pytestmark = pytest.mark.qemu
USER = "libvirt-qemu"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "runs the backend and QEMU as libvirt-qemu: needs root"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"no {USER} user (libvirt-daemon-system is not installed)"
    return _skip_reason()


def test_managed_backend_with_real_qemu_as_libvirt_qemu() -> None:
    reason = _why_not()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    assert QEMU is not None
    root = Path(tempfile.mkdtemp(prefix="vpcie-managed-"))  # not pytest's 0700 folder
    qemu = backend = None
    try:
        root.chmod(0o755)
        run_dir, log_dir = root / "run", root / "log"
        for d in (run_dir, log_dir):  # as docs/INSTALL.md says: folders the user owns
            d.mkdir(mode=0o750)
            shutil.chown(d, USER, USER)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ, VPCIE_RUN_DIR=str(run_dir), VPCIE_LOG_DIR=str(log_dir))
        backend = subprocess.Popen(
            [sys.executable, "-m", "vpcie.backend_main", f"--fd={theirs.fileno()}"],
            pass_fds=[theirs.fileno()], user=USER, group=USER, env=env, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # as libvirt
        )  # fmt: skip
        theirs.close()
        qemu = subprocess.Popen(
            [QEMU, "-name", "guest=vm-a,debug-threads=on", "-accel", "tcg", "-cpu", "max",
             "-smp", "1", "-m", "256M", "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
             "-machine", "q35,memory-backend=mem", "-nodefaults", "-no-reboot",
             "-display", "none", "-serial", "none", "-S",
             "-chardev", f"socket,id=vgpu,fd={ours.fileno()}",
             "-device", "vhost-user-gpu-pci,chardev=vgpu", "-qmp", "stdio"],
            pass_fds=[ours.fileno()], user=USER, group=USER,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        ours.close()
        ctl, log = run_dir / "vm-a.ctl", log_dir / "vm-a.log"
        deadline = time.monotonic() + 30
        while not ctl.exists():
            assert backend.poll() is None, f"backend exited {backend.returncode}"
            assert time.monotonic() < deadline, "no control socket"
            time.sleep(0.05)
        assert ctl.stat().st_uid == pwd.getpwnam(USER).pw_uid
        r = subprocess.run(
            [sys.executable, "-m", "vpcie.cli.main", "vgpu", "status", "--backend", str(ctl)],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )  # fmt: skip
        assert r.returncode == 0 and "binding : unbound" in r.stdout, r.stderr
        qemu.communicate(b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n', timeout=30)
        assert backend.wait(15) == 0  # QEMU gone: the inherited connection ended
        evs = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
        requests = {e.get("request") for e in evs if e["event"] == "message"}
        assert {"GET_FEATURES", "SET_OWNER"} <= requests  # QEMU's handshake, logged
        assert any(e["event"] == "managed" and e["name"] == "vm-a" for e in evs)
        assert not ctl.exists()
    finally:
        for proc in (qemu, backend):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(root)
