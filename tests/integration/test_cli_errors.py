"""Errors for people from the real CLIs (vpcie, vpcie-agent, vpcie-backend):
each bad input is exactly one stderr line naming what is wrong, a non-zero
exit, and no traceback (STYLE.md habit 15)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_agent.testclient import AgentProcess
from tests.conftest import ROOT, AgentProc

AGENT = [sys.executable, "-m", "host_agent.main"]
VPCIE = [sys.executable, "-m", "vpcie.cli.main"]
BACKEND = [sys.executable, "-m", "vpcie.backend_main"]


def run(cmd: list[str], *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def one_line(r: subprocess.CompletedProcess[str], *words: str) -> str:
    """The failure's one stderr line; it names every one of ``words``."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    for args in (
        ["init", "--dir", str(d)],
        ["issue", "--dir", str(d), "--name", "agent", "--server"],
        ["issue", "--dir", str(d), "--name", "backend", "--client"],
    ):
        assert run(AGENT, "pki", *args).returncode == 0
    return d


@pytest.fixture(scope="module")
def tls_agent(pki: Path) -> Iterator[AgentProcess]:
    a = AgentProcess(pki, "--tls-dir", str(pki), "--executor", "cpu")
    yield a
    a.stop()


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A real vpcie-backend: (vhost-user socket, control socket)."""
    sock = tmp_path / "vgpu.sock"
    ctl = Path(f"{sock}.ctl")
    with (tmp_path / "backend.log").open("wb") as log:
        proc = subprocess.Popen([*BACKEND, "--socket-path", str(sock)], stderr=log, cwd=ROOT)
    deadline = time.monotonic() + 20
    while not (ctl.exists() and sock.exists()):
        assert proc.poll() is None and time.monotonic() < deadline, "backend did not start"
        time.sleep(0.05)
    yield sock, ctl
    proc.terminate()
    assert proc.wait(10) == 0


# -- vpcie-agent pki ------------------------------------------------------------------
def test_pki_init_into_a_folder_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line(run(AGENT, "pki", "init", "--dir", str(blocker / "pki")), str(blocker / "pki"))
    assert blocker.read_text() == "x"


def test_pki_issue_with_a_file_as_dir(tmp_path: Path) -> None:
    f = tmp_path / "notadir"
    f.write_text("x")
    r = run(AGENT, "pki", "issue", "--dir", str(f), "--name", "a", "--server")
    one_line(r, str(f), "not a folder")


# -- vpcie-agent serve ------------------------------------------------------------------
def test_serve_with_a_tls_dir_that_is_not_there(tmp_path: Path) -> None:
    r = run(AGENT, "serve", "--listen", "127.0.0.1:0", "--tls-dir", "no-such-pki", cwd=tmp_path)
    one_line(r, "no-such-pki", "No such file")


def test_serve_with_a_corrupt_key_names_the_key(pki: Path, tmp_path: Path) -> None:
    bad = tmp_path / "pki"
    bad.mkdir()
    for name in ("ca.crt", "agent.crt"):
        (bad / name).write_bytes((pki / name).read_bytes())
    (bad / "agent.key").write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n")
    r = run(
        AGENT, "serve", "--listen", "127.0.0.1:0", "--tls-dir", str(bad), "--cert-name", "agent"
    )
    line = one_line(r, str(bad / "agent.key"))
    assert "PEM lib" not in line


def test_serve_refuses_port_99999_and_a_negative_quota(pki: Path) -> None:
    one_line(run(AGENT, "serve", "--listen", "127.0.0.1:99999", "--tls-dir", str(pki)), "99999")
    r = run(AGENT, "serve", "--listen", "127.0.0.1:0", "--tls-dir", str(pki), "--mem-quota", "-1")
    assert r.returncode == 2
    one_line(r, "--mem-quota", "negative")


# -- vpcie vgpu -------------------------------------------------------------------------
def test_vgpu_bind_refuses_port_99999_and_a_negative_quota(
    backend: tuple[Path, Path], agent: AgentProc
) -> None:
    _sock, ctl = backend
    r = run(VPCIE, "vgpu", "bind", "--backend", str(ctl), "--agent", "127.0.0.1:99999",
            "--psk-file", str(agent.psk_file))  # fmt: skip
    one_line(r, "99999")
    r = run(VPCIE, "vgpu", "bind", "--backend", str(ctl), "--agent", agent.address,
            "--psk-file", str(agent.psk_file), "--mem-quota", "-4096")  # fmt: skip
    one_line(r, "--mem-quota", "negative")


def test_vgpu_bind_psk_to_a_tls_agent_says_it_expects_tls(
    backend: tuple[Path, Path], tls_agent: AgentProcess, tmp_path: Path
) -> None:
    psk = tmp_path / "psk"
    psk.write_bytes(b"lab-secret-0123456789")
    r = run(VPCIE, "vgpu", "bind", "--backend", str(backend[1]),
            "--agent", f"127.0.0.1:{tls_agent.port}", "--psk-file", str(psk))  # fmt: skip
    one_line(r, f"127.0.0.1:{tls_agent.port}", "expects TLS", "--tls-dir")


def test_vgpu_bind_relative_tls_dir_is_the_callers(
    backend: tuple[Path, Path], tls_agent: AgentProcess, pki: Path
) -> None:
    """The backend runs elsewhere: a relative --tls-dir means the caller's folder."""
    r = run(VPCIE, "vgpu", "bind", "--backend", str(backend[1]),
            "--agent", f"127.0.0.1:{tls_agent.port}", "--tls-dir", pki.name,
            cwd=pki.parent)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("bound: ")


def test_vgpu_status_on_the_vhost_user_socket_answers_at_once(
    backend: tuple[Path, Path],
) -> None:
    sock, _ctl = backend
    t0 = time.monotonic()
    r = run(VPCIE, "vgpu", "status", "--backend", str(sock))
    one_line(r, str(sock), "not answer as a vpcie control socket")
    assert time.monotonic() - t0 < 10  # the interpreter's start included; was 30 s


def test_vgpu_status_on_a_busy_vhost_user_socket_answers_quickly(
    backend: tuple[Path, Path],
) -> None:
    """With QEMU attached the backend accepts nobody else: we wait in its
    backlog, and the first answer's short deadline ends the wait."""
    sock, _ctl = backend
    with socket.socket(socket.AF_UNIX) as qemu:
        qemu.connect(str(sock))  # the backend now serves this connection only
        t0 = time.monotonic()
        r = run(VPCIE, "vgpu", "status", "--backend", str(sock))
        one_line(r, str(sock), "no answer")
        assert time.monotonic() - t0 < 10


def test_vgpu_errors_with_json_are_one_json_object(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ctl"
    r = run(VPCIE, "vgpu", "status", "--backend", str(missing), "--json")
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr == ""
    reply = json.loads(r.stdout)
    assert reply["ok"] is False and str(missing) in reply["error"]


def test_agent_errors_with_json_are_one_json_object() -> None:
    """`vpcie-agent inventory --json` fails as JSON on stdout too (no CuPy here:
    --executor cuda is refused)."""
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: --executor cuda would not be refused")
    r = run(AGENT, "inventory", "--json", "--executor", "cuda")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr == ""
    reply = json.loads(r.stdout)
    assert reply["ok"] is False and "CuPy" in reply["error"] and reply["status"] == 2


def test_vgpu_status_in_a_missing_folder(tmp_path: Path) -> None:
    ctl = tmp_path / "no-such-dir" / "vgpu.sock.ctl"
    one_line(run(VPCIE, "vgpu", "status", "--backend", str(ctl)), str(ctl.parent), "folder")


# -- vpcie-backend ----------------------------------------------------------------------
def test_backend_socket_in_a_missing_folder(tmp_path: Path) -> None:
    sock = tmp_path / "no-such-dir" / "vgpu.sock"
    one_line(run(BACKEND, "--socket-path", str(sock)), str(sock.parent), "does not exist")


def test_backend_migrate_drain_timeout_out_of_range(tmp_path: Path) -> None:
    for value in ("0", "-1", "99999"):
        one_line(
            run(
                BACKEND, "--socket-path", str(tmp_path / "v.sock"), "--migrate-drain-timeout", value
            ),
            "--migrate-drain-timeout",
        )


def test_backend_bind_with_a_corrupt_key_names_the_key(pki: Path, tmp_path: Path) -> None:
    bad = tmp_path / "pki"
    bad.mkdir()
    for name in ("ca.crt", "backend.crt"):
        (bad / name).write_bytes((pki / name).read_bytes())
    (bad / "backend.key").write_bytes((pki / "agent.key").read_bytes())  # not its key
    r = run(BACKEND, "--socket-path", str(tmp_path / "v.sock"), "--bind", "127.0.0.1:1",
            "--tls-dir", str(bad))  # fmt: skip
    line = one_line(r, str(bad / "backend.key"))
    assert "PEM lib" not in line and not (tmp_path / "v.sock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the backend as another user: needs root")
def test_backend_tls_file_it_cannot_read_names_file_and_user(pki: Path) -> None:
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="vpcie-pki-"))  # not under pytest's 0700 folder
    try:
        d.chmod(0o755)
        for name in ("ca.crt", "backend.crt", "backend.key"):
            shutil.copy(pki / name, d / name)  # the key stays 0600, root's
        (d / "ca.crt").chmod(0o644)
        (d / "backend.crt").chmod(0o644)
        r = subprocess.run(
            [*BACKEND, "--socket-path", str(d / "v.sock"), "--bind", "127.0.0.1:1",
             "--tls-dir", str(d)],
            capture_output=True, text=True, timeout=60, cwd=ROOT, user="nobody",
        )  # fmt: skip
        one_line(r, str(d / "backend.key"), "as user nobody", "Permission denied")
    finally:
        shutil.rmtree(d)
