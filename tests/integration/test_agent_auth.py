"""Who may talk to an agent: mutual TLS and PSK, and every refusal case."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_agent.testclient import AgentProcess, RawClient
from vpcie.errors import ErrorCode
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import PROTOCOL_VERSION, AuthMode, FrameType, Opcode
from vpcie.protocol.frames import decode_payload, encode_open, encode_payload


def agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "host_agent.main", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    for args in (
        ["init", "--dir", str(d)],
        ["issue", "--dir", str(d), "--name", "agent1", "--server", "--san", "127.0.0.1"],
        ["issue", "--dir", str(d), "--name", "backend1", "--client"],
        ["init", "--dir", str(d / "other")],
        ["issue", "--dir", str(d / "other"), "--name", "intruder", "--client"],
    ):
        r = agent_cli("pki", *args)
        assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def tls_agent(pki: Path) -> Iterator[AgentProcess]:
    a = AgentProcess(pki, "--tls-dir", str(pki))
    yield a
    a.stop()


def test_pki_files_and_modes(pki: Path) -> None:
    for key in ("ca.key", "agent1.key", "backend1.key"):
        assert stat.S_IMODE((pki / key).stat().st_mode) == 0o600
    r = agent_cli("pki", "init", "--dir", str(pki))  # refuses to overwrite
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1


def _tls(
    pki: Path, name: str | None, ca_dir: Path | None = None
) -> tuple[str, str | None, str | None]:
    d = ca_dir or pki
    return (
        str(pki / "ca.crt"),
        str(d / f"{name}.crt") if name else None,
        str(d / f"{name}.key") if name else None,
    )


def test_mutual_tls_session_works(tls_agent: AgentProcess, pki: Path) -> None:
    c = RawClient(tls_agent.port, tls=_tls(pki, "backend1"))
    assert isinstance(c.sock, ssl.SSLSocket) and c.sock.version() == "TLSv1.3"
    info = c.connect()
    assert info["executor"] == 1
    data = os.urandom(100_000)
    h = c.call([rec(Opcode.MEM_ALLOC, len(data), 0)]).results[0]
    assert c.call([rec(Opcode.COPY_H2D, h, 0, 0, 0, len(data))], data).status == 0
    assert c.call([rec(Opcode.COPY_D2H, h, 0, 0, 0, len(data))]).data == data
    c.close()


def _refused(fn: object) -> None:
    """The TLS handshake or the first exchange fails."""
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c = fn()  # type: ignore[operator]
        c.sock.settimeout(5)
        c.hello()


def _wait_log(a: AgentProcess, text: str) -> None:
    deadline = time.monotonic() + 5
    while "event=tls_refused" not in a.log_text() or text not in a.log_text():
        assert time.monotonic() < deadline, a.log_text()
        time.sleep(0.05)


def test_tls_refuses_no_client_cert(tls_agent: AgentProcess, pki: Path) -> None:
    _refused(lambda: RawClient(tls_agent.port, tls=_tls(pki, None)))
    _wait_log(tls_agent, "certificate")


def test_tls_refuses_cert_from_other_ca(tls_agent: AgentProcess, pki: Path) -> None:
    _refused(lambda: RawClient(tls_agent.port, tls=_tls(pki, "intruder", pki / "other")))
    _wait_log(tls_agent, "certificate verify failed")


def test_tls_refuses_plain_tcp(tls_agent: AgentProcess) -> None:
    c = RawClient(tls_agent.port)
    c.sock.settimeout(5)
    with pytest.raises((ConnectionError, OSError)):
        c.hello(AuthMode.TLS)
    assert "event=tls_refused" in tls_agent.log_text()


@pytest.fixture(scope="module")
def psk_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProcess, bytes]]:
    d = tmp_path_factory.mktemp("psk")
    psk = os.urandom(24).hex().encode()
    (d / "psk").write_bytes(psk + b"\n")
    os.chmod(d / "psk", 0o600)
    a = AgentProcess(d, "--psk-file", str(d / "psk"))
    yield a, psk
    a.stop()


def _error_then_close(c: RawClient) -> int:
    frames = c.expect_closed()
    errors = [decode_payload("ERROR", f.payload) for f in frames if f.type == FrameType.ERROR]
    assert errors and errors[-1][1] == 1, frames
    code: int = errors[-1][0]
    return code


def test_psk_proof_and_session(psk_agent: tuple[AgentProcess, bytes]) -> None:
    a, psk = psk_agent
    from vpcie.protocol.frames import psk_mac

    c = RawClient(a.port, psk=psk)
    reply = c.hello()
    assert reply[4] == "test-agent"
    assert reply[3] == psk_mac(psk, b"agent", c.cnonce, c.snonce)  # agent proves the key
    f = c.auth()
    assert f.type == FrameType.AUTH and decode_payload("AUTH_REPLY", f.payload) == (0,)
    assert c.open()[0] == 0
    assert c.call([rec(Opcode.NOP)]).status == 0
    c.close()


def test_psk_wrong_key_refused(psk_agent: tuple[AgentProcess, bytes]) -> None:
    a, _psk = psk_agent
    c = RawClient(a.port, psk=b"not the key at all, sorry")
    c.hello()
    c.send(FrameType.AUTH, encode_payload("AUTH", b"\1" * 32))
    assert _error_then_close(c) == ErrorCode.PERMISSION_DENIED


def test_psk_auth_mode_mismatch_refused(psk_agent: tuple[AgentProcess, bytes]) -> None:
    a, psk = psk_agent
    c = RawClient(a.port, psk=psk)
    c.send(
        FrameType.HELLO,
        encode_payload(
            "HELLO", PROTOCOL_VERSION, PROTOCOL_VERSION, int(AuthMode.TLS), b"\0" * 32, "x"
        ),
    )
    assert _error_then_close(c) == ErrorCode.PERMISSION_DENIED


@pytest.mark.parametrize("first", ["open", "command", "command_after_hello"])
def test_frames_before_auth_refused(psk_agent: tuple[AgentProcess, bytes], first: str) -> None:
    a, psk = psk_agent
    c = RawClient(a.port, psk=psk)
    if first == "open":
        c.send(FrameType.OPEN, encode_open("", 0, 0, "x", 0, 0, ()))
    elif first == "command":
        c.send(FrameType.COMMAND, b"", seq=1)
    else:
        c.hello()
        c.send(FrameType.COMMAND, b"", seq=1)
    assert _error_then_close(c) == ErrorCode.PROTOCOL


def test_silent_peer_dropped_after_auth_deadline(psk_agent: tuple[AgentProcess, bytes]) -> None:
    a, _psk = psk_agent
    s = socket.create_connection(("127.0.0.1", a.port))
    s.settimeout(10)
    t0 = time.monotonic()
    assert s.recv(100) == b""
    assert 4.0 < time.monotonic() - t0 < 8.0
    s.close()


def test_psk_refused_off_loopback(tmp_path: Path) -> None:
    (tmp_path / "psk").write_bytes(b"k" * 32)
    r = agent_cli("serve", "--listen", "0.0.0.0:0", "--psk-file", str(tmp_path / "psk"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "loopback" in r.stderr
