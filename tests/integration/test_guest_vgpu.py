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
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.conftest import AgentProc
from vpcie._native import native_available
from vpcie.testing.guestvm import (
    GUEST_TOOLS,
    USER_DIR,
    image_dir,
    run_guest,
    start_backend,
    stop_backend,
)

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(240)]

GUEST_TIMEOUT = 180.0


@pytest.fixture(scope="module", autouse=True)
def _image() -> None:
    if os.environ.get("VPCIE_SKIP_IMAGE") == "1":
        pytest.skip("VPCIE_SKIP_IMAGE=1: setup did not build the guest image")
    image_dir()  # ConfigError (a failure, not a skip) when setup did not build it


@contextlib.asynccontextmanager
async def backend(tmp_path: Path, *args: str) -> AsyncIterator[str]:
    """vpcie-backend (its own process, as in production) on a unix socket."""
    proc, sock = start_backend(tmp_path, *args)
    try:
        yield sock
    finally:
        stop_backend(proc)


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


USER_PROGRAM = """\
import sys
from guest_tools.vgpu import Device
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import Opcode

size = int(open(sys.argv[1]).read())
with Device() as dev:  # found among the render nodes by its capset
    print("user: device", dev.path, "args", sys.argv[1:], flush=True)
    buf = dev.buffer(size)
    buf.write(bytes(range(256)) * (size // 256))
    h = dev.run([rec(Opcode.MEM_ALLOC, size, 0)]).check().value(0)
    dev.run([rec(Opcode.COPY_H2D, h, buf.resource_id, 0, 0, size)]).check()
    dev.run([rec(Opcode.MEMSET, h, 7, 0, 16)]).check()
    dev.run([rec(Opcode.COPY_D2H, h, buf.resource_id, 0, 0, size)]).check()
    print("user: read back", bytes(buf.read(0, 20)).hex(), flush=True)
sys.exit(3)
"""


async def test_users_own_program(tmp_path: Path, agent: AgentProc) -> None:
    """README.md "Your own program in the guest": a
    program and a data file from this machine, added to the initramfs by
    ``run_guest(files=...)``, run with arguments; Device() finds the vGPU
    by itself; the program's exit status comes back."""
    job, size = tmp_path / "job.py", tmp_path / "size.txt"
    job.write_text(USER_PROGRAM)
    size.write_text("4096")
    async with backend(
        tmp_path, "--bind", agent.address, "--psk-file", str(agent.psk_file)
    ) as sock:
        run = await run_guest(
            sock,
            f"{USER_DIR}/job.py",
            [f"{USER_DIR}/size.txt", "x"],
            files={"job.py": job, "size.txt": size},
            timeout=GUEST_TIMEOUT,
        )
    out = "\n".join(run.lines)
    assert run.exit_code == 3, "\n".join(run.lines[-30:])
    assert f"user: device /dev/dri/renderD128 args ['{USER_DIR}/size.txt', 'x']" in out
    assert "user: read back " + "07" * 16 + "10111213" in out


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


async def test_hostile_tenant_in_a_real_guest(tmp_path: Path, agent: AgentProc) -> None:
    """Through the real driver: a malformed batch and a truncated one are
    refused (counted on the fence page), naming another context's buffer is
    INVALID_HANDLE, ranges outside a buffer are OUT_OF_RANGE at the right
    record, and every context keeps working afterwards."""
    async with backend(
        tmp_path, "--bind", agent.address, "--psk-file", str(agent.psk_file)
    ) as sock:
        run = await run_guest(sock, f"{GUEST_TOOLS}/checks.py", ["hostile"], timeout=GUEST_TIMEOUT)
    lines = "\n".join(run.guest_lines())
    for name in ("malformed-batch", "foreign-buffer", "out-of-range"):
        assert f"check {name} ok" in lines, lines or "\n".join(run.lines[-30:])
    assert run.exit_code == 0


@pytest.mark.parametrize("what", ["unbind", "kill"])
async def test_held_work_ends_with_device_lost(
    tmp_path: Path, agent_factory: Callable[..., AgentProc], what: str
) -> None:
    """Work held on the agent (EVENT_WAIT) when the operator unbinds the GPU,
    or when the agent dies: the guest sees DEVICE_LOST on its fence page within
    2 s; then new work is NO_DEVICE (unbound) or DEVICE_LOST (its session is
    gone), never a hang."""
    from vpcie.control.client import control_request

    agent = agent_factory()
    done: list[object] = []
    tasks: list[asyncio.Task[None]] = []

    async def act(ctl: str) -> None:
        if what == "unbind":
            done.append(await control_request(ctl, {"op": "unbind"}))
        else:
            agent.kill()  # the agent and its session workers
            done.append("killed")

    async with backend(
        tmp_path, "--bind", agent.address, "--psk-file", str(agent.psk_file)
    ) as sock:

        def on_line(line: str) -> None:
            if line.strip() == "vpcie-guest: held" and not tasks:
                tasks.append(asyncio.get_running_loop().create_task(act(sock + ".ctl")))

        run = await run_guest(
            sock, f"{GUEST_TOOLS}/checks.py", [what], timeout=GUEST_TIMEOUT, on_line=on_line
        )
        await asyncio.gather(*tasks)
    lines = "\n".join(run.guest_lines())
    assert done, "the guest never said it held work:\n" + "\n".join(run.lines[-30:])
    assert "held batch ended with DEVICE_LOST" in lines, "\n".join(run.lines[-30:])
    after = "NO_DEVICE" if what == "unbind" else "DEVICE_LOST"
    assert f"work after it: {after}" in lines and "check held ok" in lines
    ms = float(lines.split("DEVICE_LOST after ")[1].split(" ms")[0])
    assert ms < 2000


async def test_guest_with_its_framebuffer_console(tmp_path: Path, agent: AgentProc) -> None:
    """The guest keeps the DRM framebuffer console (as a desktop guest would):
    the kernel's own 2D traffic (a scanout resource, transfers, flushes) is
    served by the null scanout with no error, next to the vGPU work."""
    from vpcie.control.client import control_request

    seen: list[asyncio.Task[dict[str, object]]] = []
    async with backend(
        tmp_path, "--bind", agent.address, "--psk-file", str(agent.psk_file)
    ) as sock:

        def on_line(line: str) -> None:
            if "demo ok" in line and not seen:
                req = control_request(sock + ".ctl", {"op": "status"})
                seen.append(asyncio.get_running_loop().create_task(req))

        run = await run_guest(
            sock,
            f"{GUEST_TOOLS}/demo.py",
            ["8"],
            timeout=GUEST_TIMEOUT,
            on_line=on_line,
            fbdev=True,
        )
        (status,) = await asyncio.gather(*seen)
    lines = "\n".join(run.guest_lines())
    assert "framebuffer console on: /dev/fb0" in lines and run.exit_code == 0, lines
    assert status["errors"] == 0, status
    assert isinstance(status["flushes"], int) and status["flushes"] > 0, status
    if native_available():
        # The driver's copy-free batches: served by the lane (C, no Python per
        # batch) once the context's session was idle and lent to it, else
        # checked in C by the Python path; its copies took the Python path.
        lane, native, submits = status["lane_submits"], status["submits_native"], status["submits"]
        assert isinstance(lane, int) and isinstance(native, int) and isinstance(submits, int)
        assert lane > 0 and status["lane_completed"], status
        assert submits > 0, status  # its copies (and each context's first batch)
    # The console's scanout resource at least (the demo's buffers may still be
    # on their way out: the kernel sends UNREF when it frees the object, later).
    assert isinstance(status["resources"], int) and status["resources"] >= 1
