"""``vpcie vgpu`` against a real ``vpcie-backend`` process and a real agent."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, AgentProc

VPCIE = [sys.executable, "-m", "vpcie.cli.main"]


def vpcie(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VPCIE, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.fixture
def backend(tmp_path: Path) -> object:
    sock = tmp_path / "vgpu.sock"
    log = (tmp_path / "backend.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vpcie.backend_main", "--socket-path", str(sock)],
        stderr=log,
        cwd=ROOT,
    )
    ctl = Path(str(sock) + ".ctl")
    deadline = time.monotonic() + 20
    while not ctl.exists():
        assert proc.poll() is None, "vpcie-backend died"
        assert time.monotonic() < deadline, "no control socket"
        time.sleep(0.05)
    yield ctl
    proc.terminate()
    assert proc.wait(10) == 0
    log.close()


def test_bind_status_unbind(backend: Path, agent: AgentProc) -> None:
    r = vpcie("vgpu", "status", "--backend", str(backend))
    assert r.returncode == 0 and "binding : unbound" in r.stdout
    r = vpcie(
        "vgpu", "bind", "--backend", str(backend),
        "--agent", agent.address, "--psk-file", str(agent.psk_file),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"bound: {agent.address}")
    r = vpcie("vgpu", "status", "--backend", str(backend), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["binding"] == "bound"
    r = vpcie("vgpu", "unbind", "--backend", str(backend))
    assert r.returncode == 0 and "unbound" in r.stdout


def test_errors_are_one_line_and_nonzero(backend: Path, agent: AgentProc, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("definitely-not-the-key")
    r = vpcie(
        "vgpu", "bind", "--backend", str(backend),
        "--agent", agent.address, "--psk-file", str(wrong),
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.startswith("vpcie: error: bind refused:") and r.stderr.count("\n") == 1
    r = vpcie("vgpu", "status", "--backend", str(tmp_path / "nope.ctl"))
    assert r.returncode == 2 and "no control socket" in r.stderr
    r = vpcie("vgpu", "bind", "--backend", str(backend), "--agent", "127.0.0.1:1")
    assert r.returncode == 2  # argparse: --psk-file or --tls-dir is required


def test_bind_of_a_bound_vgpu_needs_replace(
    backend: Path, agent_factory: Any, tmp_path: Path
) -> None:
    first, second = agent_factory(), agent_factory()

    def bind(agent: AgentProc, *extra: str) -> subprocess.CompletedProcess[str]:
        return vpcie(
            "vgpu", "bind", "--backend", str(backend),
            "--agent", agent.address, "--psk-file", str(agent.psk_file), *extra,
        )  # fmt: skip

    assert bind(first).returncode == 0
    r = bind(second)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("vpcie: error: bind refused: this vGPU is already bound to ")
    assert f"{first.address} device=any" in r.stderr and "--replace" in r.stderr
    assert r.stderr.count("\n") == 1
    r = vpcie("vgpu", "status", "--backend", str(backend), "--json")
    assert json.loads(r.stdout)["target"].startswith(f"{first.address} ")  # unchanged
    r = bind(second, "--replace")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        f"bound: {second.address} device=any auth=psk (replaced {first.address} device=any "
        "auth=psk)"
    )
    r = vpcie("vgpu", "status", "--backend", str(backend), "--json")
    assert json.loads(r.stdout)["target"].startswith(f"{second.address} ")
