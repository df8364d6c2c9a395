"""A QEMU guest with a vpcie vGPU: the image from images/out, booted under TCG.

The command line is the one DESIGN.md verified: q35, guest RAM in a shared
memfd (vhost-user needs it), no display, the serial console on stdout, the
kernel and initramfs built by images/build.sh, and
``-device vhost-user-gpu-pci`` on a vpcie-backend's socket. The guest's /init
runs ``vpcie.run=PROGRAM`` with ``vpcie.args=A,B`` and ends with
``vpcie-guest: exit N``; this module streams the console and returns it.

A user's own programs and files go in without rebuilding the image:
``run_guest(..., files={"job.py": Path("job.py")})`` appends a second,
gzip'd cpio archive holding them under /opt/vpcie/user to a copy of the
initramfs (Linux unpacks concatenated archives, later over earlier).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vpcie.errors import ConfigError, ErrorCode, VgpuError

IMAGE_DIR = Path(__file__).resolve().parents[2] / "images" / "out"  # the repository's images/out
QEMU = "qemu-system-x86_64"
GUEST_TOOLS = "/opt/vpcie/guest_tools"  # where images/build.sh puts guest_tools
USER_DIR = "/opt/vpcie/user"  # where run_guest(files=...) puts the user's files
_USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")
_EXIT = re.compile(r"vpcie-guest: exit (\d+)")


@dataclass
class GuestRun:
    """What the guest printed, how its program ended, how long it all took."""

    lines: list[str] = field(default_factory=list)
    exit_code: int | None = None  # the program's, from /init's last line; None: never got there
    seconds: float = 0.0
    timed_out: bool = False

    def guest_lines(self) -> list[str]:
        return [line for line in self.lines if line.startswith("vpcie-guest:")]


def image_dir() -> Path:
    """images/out (or $VPCIE_IMAGE_DIR); ConfigError when the image is not built."""
    d = Path(os.environ.get("VPCIE_IMAGE_DIR", IMAGE_DIR))
    missing = [n for n in ("vmlinuz", "initramfs.gz") if not (d / n).is_file()]
    if missing:
        raise ConfigError(
            f"guest image not built ({', '.join(missing)} missing in {d}): "
            "run `bash scripts/setup.sh` (it runs images/build.sh)"
        )
    return d


def _newc(ino: int, name: str, mode: int, data: bytes = b"") -> bytes:
    """One entry of a "newc" cpio archive (the initramfs format: Linux's
    Documentation/driver-api/early-userspace/buffer-format.rst)."""
    raw = name.encode() + b"\0"
    nlink = 2 if mode & 0o040000 else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(raw), 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + raw
    return head + bytes(-len(head) % 4) + data + bytes(-len(data) % 4)


def user_archive(files: Mapping[str, Path]) -> bytes:
    """A gzip'd cpio archive with ``files`` (name in the guest -> file here)
    in USER_DIR; ConfigError for a name that is not a plain file name or a
    file that cannot be read."""
    out = [_newc(1, USER_DIR.lstrip("/"), 0o040755)]
    for ino, (name, src) in enumerate(sorted(files.items()), start=2):
        if not _USER_NAME.match(name):
            raise ConfigError(f"guest file name {name!r}: use letters, digits, '.', '_', '-'")
        try:
            data = Path(src).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {src} for the guest: {exc.strerror}") from None
        out.append(_newc(ino, f"{USER_DIR.lstrip('/')}/{name}", 0o100755, data))
    out.append(_newc(0, "TRAILER!!!", 0))
    return gzip.compress(b"".join(out), mtime=0)


def initramfs_with(files: Mapping[str, Path], out: Path, images: Path | None = None) -> Path:
    """Write the image's initramfs followed by ``user_archive(files)`` to ``out``."""
    base = (images or image_dir()) / "initramfs.gz"
    out.write_bytes(base.read_bytes() + user_archive(files))
    return out


def qemu_command(
    vgpu_socket: str | None,
    program: str | None = None,
    args: Sequence[str] = (),
    *,
    memory_mb: int = 512,
    images: Path | None = None,
    fbdev: bool = False,
    initrd: Path | None = None,
) -> list[str]:
    """``fbdev``: the guest keeps its DRM framebuffer console (2D traffic);
    ``initrd``: instead of the image's (e.g. from ``initramfs_with``)."""
    d = images or image_dir()
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise ConfigError(f"{QEMU} not found: run `bash scripts/setup.sh`")
    append = "console=ttyS0 panic=-1 rdinit=/init quiet"
    if fbdev:
        append += " vpcie.fbdev=1"
    if program:
        append += f" vpcie.run={program}"
        if args:
            append += " vpcie.args=" + ",".join(args)
    cmd = [
        qemu, "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", f"{memory_mb}M",
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        "-machine", "q35,memory-backend=mem",
        "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
        "-kernel", str(d / "vmlinuz"), "-initrd", str(initrd or d / "initramfs.gz"),
        "-append", append,
    ]  # fmt: skip
    if vgpu_socket is not None:
        cmd += [
            "-chardev", f"socket,id=vgpu,path={vgpu_socket}",
            "-device", "vhost-user-gpu-pci,chardev=vgpu",
        ]  # fmt: skip
    return cmd


async def run_guest(
    vgpu_socket: str | None,
    program: str | None = None,
    args: Sequence[str] = (),
    *,
    timeout: float = 300.0,
    on_line: Callable[[str], None] | None = None,
    memory_mb: int = 512,
    fbdev: bool = False,
    files: Mapping[str, Path] | None = None,
) -> GuestRun:
    """Boot the guest, run ``program`` in it, return its console. The VM is
    killed at ``timeout`` (``timed_out``); it never outlives this call.
    ``files``: the user's own files, at USER_DIR/NAME in the guest (e.g.
    ``program=f"{USER_DIR}/job.py", files={"job.py": Path("job.py")}``)."""
    if files:
        with tempfile.TemporaryDirectory(prefix="vpcie-guest-") as tmp:
            initrd = initramfs_with(files, Path(tmp) / "initramfs.gz")
            return await _run_guest(
                qemu_command(
                    vgpu_socket, program, args, memory_mb=memory_mb, fbdev=fbdev, initrd=initrd
                ),
                timeout,
                on_line,
            )
    cmd = qemu_command(vgpu_socket, program, args, memory_mb=memory_mb, fbdev=fbdev)
    return await _run_guest(cmd, timeout, on_line)


async def _run_guest(
    cmd: list[str], timeout: float, on_line: Callable[[str], None] | None
) -> GuestRun:
    run = GuestRun()
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout):
            while raw := await proc.stdout.readline():
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                run.lines.append(line)
                if on_line is not None:
                    on_line(line)
                m = _EXIT.search(line)
                if m:
                    run.exit_code = int(m.group(1))
            await proc.wait()
    except TimeoutError:
        run.timed_out = True
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        run.seconds = time.monotonic() - t0
    return run


def start_backend(
    workdir: Path, *args: str, timeout: float = 20.0
) -> tuple[subprocess.Popen[bytes], str]:
    """A vpcie-backend process (as in production) on ``workdir/vgpu.sock``,
    with ``args`` (e.g. ``--bind HOST:PORT --psk-file F``); its log is
    ``workdir/backend.log``. Returns once the socket exists."""
    sock = str(workdir / "vgpu.sock")
    with (workdir / "backend.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vpcie.backend_main", "--socket-path", sock, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_backend(proc)
            tail = (workdir / "backend.log").read_text(errors="replace")[-2000:]
            raise VgpuError(ErrorCode.INTERNAL, f"vpcie-backend did not start:\n{tail}")
        time.sleep(0.05)
    return proc, sock


def stop_backend(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
