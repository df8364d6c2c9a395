"""Which guest is this backend for? Learned from the QEMU at the other end.

libvirt starts ``vpcie-backend --fd=N`` with one end of a socketpair and
gives QEMU the other, so nothing on our command line names the domain. QEMU's
own command line does (``-name guest=NAME,...``, ``-uuid``): we find the
process holding the peer end of our socket (SO_PEERCRED first: right for a
socket QEMU connected itself; for libvirt's socketpair it names libvirtd, so
then the kernel's socket diagnostics give the peer's inode and /proc says who
holds it). Parsing is pure (``qemu_name``); the lookups are at the edge.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
from collections.abc import Iterator, Sequence


def _split_opts(text: str) -> list[str]:
    """QEMU option syntax: ',' separates, ',,' is a literal comma."""
    parts, cur, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    parts.append("".join(cur))
    return parts


def qemu_name(argv: Sequence[str]) -> str | None:
    """The guest's name from a QEMU command line (``-name guest=NAME,...`` or
    ``-name NAME``), else its ``-uuid``; None when it has neither."""
    uuid = None
    for flag, value in itertools.pairwise(argv):
        if flag in ("-name", "--name"):
            for i, opt in enumerate(_split_opts(value)):
                if opt.startswith("guest="):
                    return opt[len("guest=") :] or None
                if i == 0 and "=" not in opt and opt:
                    return opt
        elif flag in ("-uuid", "--uuid"):
            uuid = value
    return uuid


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _peercred_pid(sock: socket.socket) -> int | None:
    try:
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except OSError:
        return None
    pid = int.from_bytes(cred[:4], "little")
    return pid or None


# sock_diag(7) for one unix socket: a netlink request by inode asking for the
# peer's inode (linux/unix_diag.h). Written out here (a 28-byte request)
# because pyroute2's synchronous API starts an event loop of the installed
# policy, and uvloop cannot open netlink sockets.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_UDIAG_SHOW_PEER = 4
_UNIX_DIAG_PEER = 2
_NLMSG = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
_UNIX_DIAG_MSG_SIZE = 16


def _peer_inode(sock: socket.socket) -> int | None:
    ino = os.fstat(sock.fileno()).st_ino
    req = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, _UDIAG_SHOW_PEER,
                              0xFFFFFFFF, 0xFFFFFFFF)  # fmt: skip
    msg = _NLMSG.pack(_NLMSG.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + req
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)
            nl.send(msg)
            reply = nl.recv(8192)
    except OSError:  # no sock_diag here (container, module missing): SO_PEERCRED is all
        return None
    return parse_peer_inode(reply)


def parse_peer_inode(reply: bytes) -> int | None:
    """UNIX_DIAG_PEER from a sock_diag reply (one message), or None."""
    if len(reply) < _NLMSG.size + _UNIX_DIAG_MSG_SIZE:
        return None
    length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(reply)
    if kind == _NLMSG_ERROR or length > len(reply):
        return None
    off = _NLMSG.size + _UNIX_DIAG_MSG_SIZE
    while off + 4 <= length:
        alen, atype = struct.unpack_from("=HH", reply, off)
        if alen < 4 or off + alen > length:
            return None
        if atype == _UNIX_DIAG_PEER and alen >= 8:
            peer: int = struct.unpack_from("=I", reply, off + 4)[0]
            return peer or None
        off += (alen + 3) & ~3  # attributes are 4-byte aligned
    return None


def _holders(inode: int) -> Iterator[int]:
    """Processes with an fd on socket ``inode`` (those we may look into)."""
    want = f"socket:[{inode}]"
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                if os.readlink(fd.path) == want:
                    yield int(entry.name)
                    break
        except OSError:
            continue


def learn_name(sock: socket.socket) -> str | None:
    """The guest name of the QEMU at the other end of ``sock``, or None (not
    connected yet, not QEMU, or /proc not readable as our user)."""
    pid = _peercred_pid(sock)
    if pid is not None and (name := qemu_name(_cmdline(pid))):
        return name
    inode = _peer_inode(sock)
    if inode is None:
        return None
    for holder in _holders(inode):
        if name := qemu_name(_cmdline(holder)):
            return name
    return None
