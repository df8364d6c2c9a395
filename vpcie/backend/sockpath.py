"""Claiming a unix socket path without taking anyone else's.

A backend must not unlink what it did not make: a second backend started on
a live backend's path would otherwise steal its listener (QEMU then reaches
the wrong process) and remove it on exit, and a mistyped ``--socket-path``
naming a regular file would delete that file. The decision is a pure
function of what is at the path (``decide``); the edges look (``inspect``),
bind, and release only the socket we bound (same inode).
"""

from __future__ import annotations

import enum
import errno
import grp
import os
import pwd
import socket
import stat
from dataclasses import dataclass

from vpcie.errors import ConfigError
from vpcie.fileerrors import os_error_line


class PathState(enum.Enum):
    ABSENT = "absent"
    STALE_SOCKET = "stale socket"  # a socket file nobody listens on: a crashed run
    LIVE_SOCKET = "live socket"  # someone accepts connections there
    NOT_SOCKET = "not a socket"
    NO_FOLDER = "no folder"


def decide(path: str, state: PathState) -> bool:
    """Whether to unlink ``path`` before binding; ConfigError where we must not start."""
    if state is PathState.ABSENT:
        return False
    if state is PathState.STALE_SOCKET:
        return True
    if state is PathState.LIVE_SOCKET:
        raise ConfigError(
            f"{path}: another process (a running vpcie-backend?) listens there; "
            "stop it or choose another path"
        )
    if state is PathState.NOT_SOCKET:
        raise ConfigError(f"{path} exists and is not a socket: refusing to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    raise ConfigError(f"{path}: folder {folder} does not exist (create it first)")


def inspect(path: str) -> PathState:
    """What is at ``path``: a connect test tells a live socket from a stale one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        folder = os.path.dirname(os.path.abspath(path))
        return PathState.ABSENT if os.path.isdir(folder) else PathState.NO_FOLDER
    except NotADirectoryError:
        return PathState.NO_FOLDER
    if not stat.S_ISSOCK(st.st_mode):
        return PathState.NOT_SOCKET
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a full accept backlog answers EAGAIN: still live
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return PathState.STALE_SOCKET
    except BlockingIOError:
        return PathState.LIVE_SOCKET
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise ConfigError(os_error_line("connect to", path, exc)) from exc
        return PathState.STALE_SOCKET
    finally:
        probe.close()
    return PathState.LIVE_SOCKET


@dataclass(frozen=True)
class SocketAccess:
    """--socket-owner/--socket-group/--socket-mode, resolved at start."""

    uid: int = -1
    gid: int = -1
    mode: int | None = None

    @classmethod
    def parse(cls, owner: str | None, group: str | None, mode: str | None) -> SocketAccess:
        uid = gid = -1
        if owner:
            try:
                uid = int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
            except KeyError:
                raise ConfigError(f"--socket-owner {owner}: no such user") from None
        if group:
            try:
                gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
            except KeyError:
                raise ConfigError(f"--socket-group {group}: no such group") from None
        value = None
        if mode is not None:
            try:
                value = int(mode, 8)
            except ValueError:
                value = -1
            if not 0 <= value <= 0o777:
                raise ConfigError(f"--socket-mode {mode}: give octal permission bits, e.g. 0660")
        return cls(uid, gid, value)

    def apply(self, path: str, default_mode: int | None = None) -> None:
        mode = self.mode if self.mode is not None else default_mode
        try:
            if self.uid != -1 or self.gid != -1:
                os.chown(path, self.uid, self.gid)
            if mode is not None:
                os.chmod(path, mode)
        except OSError as exc:
            raise ConfigError(os_error_line("set owner/mode of", path, exc)) from exc


class ClaimedSocket:
    """A listening unix socket at a path we checked; ``release`` unlinks the
    path only while it is still the socket we bound.

    The socket is bound under a temporary name, given its owner and mode,
    listening, and only then renamed onto ``path``: nobody can connect to it
    with the wrong permissions, and nobody finds the path refusing connections.
    """

    def __init__(self, path: str, access: SocketAccess | None = None,
                 default_mode: int | None = None, backlog: int = 1) -> None:  # fmt: skip
        replace = decide(path, inspect(path))
        self.path = path
        self._ident: tuple[int, int] | None = None
        folder, base = os.path.split(os.path.abspath(path))
        temp = os.path.join(folder, f".{base}.{os.getpid()}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.lexists(temp):  # our own pid's leftover: nobody else's
                os.unlink(temp)
            self.sock.bind(temp)
        except OSError as exc:
            self.sock.close()
            raise ConfigError(os_error_line("create socket", path, exc)) from exc
        try:
            (access or SocketAccess()).apply(temp, default_mode)
            self.sock.listen(backlog)
            if not replace and os.path.lexists(path):  # appeared since we looked
                decide(path, inspect(path))
            os.rename(temp, path)
        except OSError as exc:
            self._abandon(temp)
            raise ConfigError(os_error_line("create socket", path, exc)) from exc
        except BaseException:
            self._abandon(temp)
            raise
        self._ident = _ident(path)

    def _abandon(self, temp: str) -> None:
        self.sock.close()
        try:
            os.unlink(temp)
        except OSError:
            pass

    def release(self) -> None:
        self.sock.close()
        if self._ident is not None and _ident(self.path) == self._ident:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self._ident = None


def _ident(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
