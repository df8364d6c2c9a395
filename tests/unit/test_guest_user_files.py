"""A user's own files in the guest (vpcie.testing.guestvm.user_archive): a second
cpio archive appended to the image's initramfs. Read back here with the
real ``cpio`` tool; booted in tests/integration/test_guest_vgpu.py."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from vpcie.errors import ConfigError
from vpcie.testing.guestvm import USER_DIR, initramfs_with, qemu_command, user_archive

pytestmark = pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool")


def unpack(archive: bytes, into: Path) -> None:
    into.mkdir()
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
        input=gzip.decompress(archive),
        cwd=into,
        check=True,
    )


def test_files_land_in_the_user_folder(tmp_path: Path) -> None:
    job = tmp_path / "job.py"
    job.write_text("print('hello from the user')\n")
    data = tmp_path / "weights.bin"
    data.write_bytes(bytes(range(256)) * 3 + b"odd")  # a length that is not 4-aligned
    unpack(user_archive({"job.py": job, "w.bin": data}), tmp_path / "root")
    user = tmp_path / "root" / USER_DIR.lstrip("/")
    assert sorted(p.name for p in user.iterdir()) == ["job.py", "w.bin"]
    assert (user / "job.py").read_text() == job.read_text()
    assert (user / "w.bin").read_bytes() == data.read_bytes()
    assert stat.S_IMODE((user / "job.py").stat().st_mode) == 0o755


def test_names_and_files_are_checked(tmp_path: Path) -> None:
    job = tmp_path / "job.py"
    job.write_text("")
    for bad in ("../etc/passwd", "/init", "a/b.py", "", ".hidden"):
        with pytest.raises(ConfigError, match="guest file name"):
            user_archive({bad: job})
    with pytest.raises(ConfigError, match=r"cannot read .*nope\.py for the guest"):
        user_archive({"nope.py": tmp_path / "nope.py"})


def test_initramfs_with_appends_to_the_image(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    base = gzip.compress(b"the image's own archive")
    (images / "initramfs.gz").write_bytes(base)
    (images / "vmlinuz").write_bytes(b"")
    job = tmp_path / "job.py"
    job.write_text("pass\n")
    out = initramfs_with({"job.py": job}, tmp_path / "initrd.gz", images)
    assert out.read_bytes() == base + user_archive({"job.py": job})
    if shutil.which("qemu-system-x86_64"):
        cmd = qemu_command(None, f"{USER_DIR}/job.py", images=images, initrd=out)
        assert cmd[cmd.index("-initrd") + 1] == str(out)
