"""A real Linux guest on the vGPU: QEMU 10 (TCG) boots the image from
images/build.sh, its stock virtio_gpu driver (Debian's 6.12 kernel) carries
guest_tools' batches to vpcie-backend, and from there to a real vpcie-agent.

This is the check that the device serves what the real driver sends (not only
the harness's model of it): driver load, capset, context and buffer creation,
EXECBUFFER, the fence page, DMA into and out of guest pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import AgentProc
from vpcie.guestvm import GUEST_TOOLS, image_dir, run_guest

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(240)]

GUEST_TIMEOUT = 180.0


@pytest.fixture(scope="module", autouse=True)
def _image() -> None:
    if os.environ.get("VPCIE_SKIP_IMAGE") == "1":
        pytest.skip("VPCIE_SKIP_IMAGE=1: setup did not build the guest image")
    image_dir()  # ConfigError (a failure, not a skip) when setup did not build it


@contextlib.asynccontextmanager
async def backend(tmp_path: Path, *bind: str) -> AsyncIterator[str]:
    """vpcie-backend (its own process, as in production) on a unix socket."""
    sock = str(tmp_path / "vgpu.sock")
    log = (tmp_path / "backend.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vpcie.backend_main", "--socket-path", sock, *bind],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(400):
            if os.path.exists(sock) or proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert os.path.exists(sock), (tmp_path / "backend.log").read_text()
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_vpcie_demo_runs_a_real_guest() -> None:
    """The README's main job: `vpcie demo` boots a guest whose vGPU runs a
    GEMM and a 1 MiB round trip, checked inside the guest."""
    out = subprocess.run(
        [sys.executable, "-m", "vpcie.cli.main", "demo", "--size", "24", "--json"],
        capture_output=True,
        text=True,
        timeout=GUEST_TIMEOUT + 30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["verified"] and report["exit_code"] == 0
    lines = "\n".join(report["guest"])
    assert "NOT a GPU (CPU executor)" in lines  # honest about the executor
    assert "GEMM 24x24 fp32" in lines and "sha256 matches" in lines


async def test_guest_sees_no_gpu_bound(tmp_path: Path) -> None:
    """An unbound vGPU: the guest's driver loads and the vGPU answers, QUERY
    says no GPU is bound and work fails with NO_DEVICE: a clear error in the
    guest, not a hang."""
    async with backend(tmp_path) as sock:
        run = await run_guest(sock, f"{GUEST_TOOLS}/demo.py", ["8"], timeout=GUEST_TIMEOUT)
    lines = "\n".join(run.guest_lines())
    assert not run.timed_out, "\n".join(run.lines[-30:])
    assert "render node /dev/dri/renderD128" in lines
    assert "capset at driver load: no GPU bound to this vGPU" in lines
    assert "demo FAILED: VgpuError" in lines and "NO_DEVICE" in lines
    assert run.exit_code == 1


async def test_guest_on_a_bound_agent(tmp_path: Path, agent: AgentProc) -> None:
    """Bound through the backend's command line to a real agent over TCP."""
    async with backend(
        tmp_path, "--bind", agent.address, "--psk-file", str(agent.psk_file)
    ) as sock:
        run = await run_guest(sock, f"{GUEST_TOOLS}/demo.py", ["16"], timeout=GUEST_TIMEOUT)
    lines = "\n".join(run.guest_lines())
    assert run.exit_code == 0, "\n".join(run.lines[-30:])
    # Bound at the backend's start: the capset the driver cached says so.
    assert "capset at driver load: cpu-numpy (not a GPU) [NOT a GPU (CPU executor)]" in lines
    assert "GEMM 16x16 fp32" in lines and "demo ok" in lines
