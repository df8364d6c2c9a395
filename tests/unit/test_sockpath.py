"""sockpath.py: what a backend may do at a socket path (pure decide), what
inspect sees, and the claim/release pair that never removes another's file."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from vpcie.backend.sockpath import ClaimedSocket, PathState, SocketAccess, decide, inspect
from vpcie.errors import ConfigError


def test_decide() -> None:
    assert decide("/p", PathState.ABSENT) is False
    assert decide("/p", PathState.STALE_SOCKET) is True
    for state, words in (
        (PathState.LIVE_SOCKET, "listens there"),
        (PathState.NOT_SOCKET, "not a socket"),
        (PathState.NO_FOLDER, "does not exist"),
    ):
        with pytest.raises(ConfigError, match=words):
            decide("/p", state)


def test_inspect(tmp_path: Path) -> None:
    assert inspect(str(tmp_path / "x")) is PathState.ABSENT
    assert inspect(str(tmp_path / "no" / "x")) is PathState.NO_FOLDER
    (tmp_path / "f").write_text("")
    assert inspect(str(tmp_path / "f")) is PathState.NOT_SOCKET
    assert inspect(str(tmp_path / "f" / "x")) is PathState.NO_FOLDER
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "s"))
        assert inspect(str(tmp_path / "s")) is PathState.STALE_SOCKET
        s.listen(1)
        assert inspect(str(tmp_path / "s")) is PathState.LIVE_SOCKET


def test_release_leaves_a_successors_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    first = ClaimedSocket(path)
    first.sock.close()  # as if it died: the file is stale now
    second = ClaimedSocket(path)  # replaces it
    first.release()  # the first one's exit must not remove the second one's socket
    assert inspect(path) is PathState.LIVE_SOCKET
    second.release()
    assert not os.path.exists(path)
    assert os.listdir(tmp_path) == []  # no temporary names left behind


def test_socket_access_parse() -> None:
    assert SocketAccess.parse(None, None, None) == SocketAccess()
    assert SocketAccess.parse("0", "0", "660") == SocketAccess(0, 0, 0o660)
    assert SocketAccess.parse("root", "root", "0600").mode == 0o600
    for owner, group, mode, words in (
        ("no-such-user-q", None, None, "--socket-owner"),
        (None, "no-such-group-q", None, "--socket-group"),
        (None, None, "rw", "--socket-mode"),
        (None, None, "1777", "--socket-mode"),
        (None, None, "9", "--socket-mode"),
    ):
        with pytest.raises(ConfigError, match=words):
            SocketAccess.parse(owner, group, mode)
