"""The CLI talks to a backend through vpcie.control without loading the
device model or the C module (the pool and the libvirt hooks will do the same):
the real ``vpcie vgpu`` runs in a fresh interpreter against a stopped backend,
and what it loaded is checked."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("vpcie.gpu.device", "vpcie._native", "vpcie.control.server", "vpcie.tunnel")

SCRIPT = """
import json, sys
from vpcie.cli.main import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "loaded": sorted(m for m in sys.modules if m.startswith("vpcie"))}))
"""


def run_cli(*argv: str) -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *argv], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return int(out["rc"]), list(out["loaded"])


def stale_socket(path: Path) -> str:
    """A socket file nobody listens on: a backend that stopped uncleanly."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    return str(path)


@pytest.mark.parametrize("verb", ["status", "unbind", "bind"])
def test_vgpu_verbs_load_neither_the_device_model_nor_the_c_module(
    tmp_path: Path, verb: str
) -> None:
    ctl = stale_socket(tmp_path / "vm.sock.ctl")
    extra = ["--agent", "127.0.0.1:1", "--psk-file", str(tmp_path / "k")] if verb == "bind" else []
    rc, loaded = run_cli("vgpu", verb, *extra, "--backend", ctl)
    assert rc == 1  # refused: nothing listens there
    assert "vpcie.control.client" in loaded and "vpcie.control.messages" in loaded
    heavy = [m for m in loaded if m.startswith(HEAVY)]
    assert heavy == [], f"vpcie vgpu {verb} loaded {heavy}"


def test_a_missing_control_socket_loads_nothing_heavy_either(tmp_path: Path) -> None:
    rc, loaded = run_cli("vgpu", "status", "--backend", str(tmp_path / "gone.ctl"))
    assert rc == 2
    assert "vpcie.control.client" in loaded
    assert [m for m in loaded if m.startswith(HEAVY)] == []


def test_the_server_serves_a_device_without_importing_the_device_model() -> None:
    """vpcie.control.server takes any ServedDevice (status(), bound_info):
    the backend hands it a GpuDevice, the package itself does not import one."""
    code = (
        "import sys, vpcie.control.server; "
        "print(sorted(m for m in sys.modules"
        " if m.startswith(('vpcie.gpu.device', 'vpcie._native'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
