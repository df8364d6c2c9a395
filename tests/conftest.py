"""Shared fixtures: real processes the suite starts and stops itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def _say(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


def wait_for(
    pred: Callable[[], T], timeout: float, what: str | Callable[[], str], interval: float = 0.01
) -> T:
    """Poll ``pred`` until it returns something truthy, and return that.

    Use it instead of sleeping a fixed time and then asserting: a loaded
    machine then makes a test slower, never flaky. On the deadline it fails
    saying what did not happen (``what``: text, or a function called only
    then, e.g. to add a log)."""
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {_say(what)}")
        time.sleep(interval)
    return got


async def until(
    pred: Callable[[], T], timeout: float, what: str | Callable[[], str], interval: float = 0.005
) -> T:
    """``wait_for`` for asyncio tests: the event loop runs between polls."""
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {_say(what)}")
        await asyncio.sleep(interval)
    return got


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


@dataclass
class AgentProc:
    """A real ``vpcie-agent serve`` on loopback with a PSK and the CPU executor."""

    port: int
    psk_file: Path
    proc: subprocess.Popen[bytes]
    log: Path
    host: str = "127.0.0.1"
    extra: list[str] = field(default_factory=list)

    @property
    def psk(self) -> bytes:
        return self.psk_file.read_bytes().strip()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def kill(self) -> None:
        """SIGKILL the agent and every worker it started (its process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_agent(tmp: Path, *extra: str, psk: bytes = b"lab-secret-0123456789") -> AgentProc:
    tmp.mkdir(parents=True, exist_ok=True)
    psk_file = tmp / "psk"
    psk_file.write_bytes(psk)
    psk_file.chmod(0o600)
    port = free_port()
    log = tmp / f"agent-{port}.log"
    cmd = [
        sys.executable, "-m", "host_agent.main", "serve",
        "--listen", f"127.0.0.1:{port}", "--psk-file", str(psk_file),
        "--executor", "cpu", *extra,
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    agent = AgentProc(port, psk_file, proc, log, extra=list(extra))
    try:
        wait_port("127.0.0.1", port, proc)
    except BaseException:
        agent.kill()
        raise
    return agent


@contextlib.contextmanager
def tls_agent_proc(tls_dir: Path, cert_name: str = "agent1") -> Iterator[int]:
    """A real ``vpcie-agent serve`` with mutual TLS (CPU executor) on 127.0.0.1,
    serving ``cert_name`` from ``tls_dir``; yields its port."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "host_agent.main", "serve", "--listen", f"127.0.0.1:{port}",
            "--tls-dir", str(tls_dir), "--cert-name", cert_name, "--executor", "cpu",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_port("127.0.0.1", port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProc]:
    a = start_agent(tmp_path / "agent")
    yield a
    a.stop()


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[object]:
    started: list[AgentProc] = []

    def make(*extra: str) -> AgentProc:
        a = start_agent(tmp_path / f"agent{len(started)}", *extra)
        started.append(a)
        return a

    yield make
    for a in started:
        a.stop()


# The pool's stores (vpcie/pool/): one real etcd for the session, and a
# ``pool_url`` that runs a test once per store with a store of its own.


@pytest.fixture(scope="session")
def etcd_url() -> Iterator[str]:
    from vpcie.testing.etcd import EtcdServer

    with EtcdServer() as etcd:
        yield etcd.url


@pytest.fixture(params=["sqlite", "etcd"])
def pool_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """``sqlite:///TMP/pool.db`` (a fresh file) or ``etcd://127.0.0.1:PORT/PREFIX``
    (the session's etcd, a key prefix no other test uses)."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/pool.db"
    import uuid

    url: str = request.getfixturevalue("etcd_url")
    return f"{url}/t-{uuid.uuid4().hex[:12]}"
