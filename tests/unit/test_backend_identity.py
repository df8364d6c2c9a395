"""identity.py: the guest's name from a QEMU command line, and the
sock_diag reply parser (hostile input: only None or a number comes out)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys

import pytest

from vpcie.backend.identity import learn_name, parse_peer_inode, qemu_name
from vpcie.places import safe_name


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["qemu", "-name", "guest=web1,debug-threads=on"], "web1"),
        (["qemu", "-name", "guest=a,,b,debug-threads=on"], "a,b"),  # libvirt doubles commas
        (["qemu", "-name", "plain"], "plain"),
        (["qemu", "-name", "plain,process=p"], "plain"),
        (
            ["qemu", "-uuid", "c0ffee00-0000-4000-8000-000000000001"],
            "c0ffee00-0000-4000-8000-000000000001",
        ),
        (["qemu", "-uuid", "u", "-name", "guest=n"], "n"),  # the name wins over the uuid
        (["qemu", "-m", "512"], None),
        (["qemu", "-name"], None),
        (["qemu", "-name", "guest="], None),
        (["qemu", "-name", "process=p"], None),
    ],
)
def test_qemu_name(argv: list[str], name: str | None) -> None:
    assert qemu_name(argv) == name


@pytest.mark.parametrize(
    ("raw", "safe"),
    [("web1", "web1"), ("a/b", "a_b"), ("../x", "_x"), ("..", "_"), ("", "_"), ("a b", "a_b")],
)
def test_safe_name_is_one_plain_file_name(raw: str, safe: str) -> None:
    assert safe_name(raw) == safe
    assert "/" not in safe_name(raw * 50) and len(safe_name(raw * 50)) <= 100


def _reply(attrs: bytes, kind: int = 20, extra: int = 0) -> bytes:
    body = bytes(16) + attrs
    return struct.pack("=IHHII", 16 + len(body) + extra, kind, 0, 1, 0) + body


def test_parse_peer_inode() -> None:
    peer = struct.pack("=HHI", 8, 2, 4242)
    other = struct.pack("=HH", 5, 1) + b"n\0\0\0"  # an unaligned NAME first
    assert parse_peer_inode(_reply(other + peer)) == 4242
    assert parse_peer_inode(_reply(b"")) is None
    assert parse_peer_inode(_reply(peer, kind=2)) is None  # NLMSG_ERROR
    assert parse_peer_inode(_reply(peer, extra=4)) is None  # claims more than came
    assert parse_peer_inode(_reply(struct.pack("=HH", 0, 2))) is None  # zero-length attribute
    for cut in range(len(_reply(peer))):
        assert parse_peer_inode(_reply(peer)[:cut]) in (None, 4242)


def test_learn_name_finds_the_qemu_holding_the_peer_end() -> None:
    """As with libvirt's socketpair: SO_PEERCRED names the creator (this
    process, no -name), the holder of the other end is the QEMU."""
    ours, theirs = socket.socketpair()
    assert learn_name(theirs) is None  # we hold both ends: nobody to ask
    qemu = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", "-name", "guest=dom9"],
        pass_fds=[ours.fileno()],
    )
    ours.close()
    try:
        assert learn_name(theirs) == "dom9"
    finally:
        qemu.kill()
        qemu.wait()
        theirs.close()
    assert os.getpid() != qemu.pid
