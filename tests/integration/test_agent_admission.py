"""An unauthenticated peer costs the agent next to nothing and never delays
an authenticated one (docs/SECURITY.md "Before authentication")."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_agent.testclient import AgentProcess, RawClient
from tests.integration.agent_helpers import children, client_tls, make_pki, pss_kib, wait_until
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import Opcode
from vpcie.tunnel import TunnelClient

FLOOD = int(os.environ.get("VPCIE_TEST_FLOOD", "300"))
AUTH_S = 3.0
FLOOD_AUTH_S = 10.0  # the flood must still be pending while the legit client is timed


@pytest.fixture
def psk_agent(tmp_path: Path) -> Iterator[tuple[AgentProcess, bytes]]:
    psk = os.urandom(24).hex().encode()
    (tmp_path / "psk").write_bytes(psk)
    (tmp_path / "psk").chmod(0o600)
    # Caps above the flood: this measures what 300 pending connections cost
    # (test_caps_drop_the_oldest covers the caps).
    a = AgentProcess(tmp_path, "--psk-file", str(tmp_path / "psk"), "--executor", "cpu",
                     "--auth-timeout", str(FLOOD_AUTH_S), "--max-handshakes", "400")  # fmt: skip
    yield a, psk
    a.stop()


def _open_time(port: int, psk: bytes) -> float:
    async def one() -> float:
        t0 = time.monotonic()
        c = await TunnelClient.connect("127.0.0.1", port, psk=psk, timeout=20)
        took = time.monotonic() - t0
        assert (await c.nop()).ok
        await c.close()
        return took

    return asyncio.run(one())


def _silent(port: int, source: str) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def _accepted(pid: int) -> int:
    """TCP sockets the agent's main process holds."""
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            n += os.readlink(fd).startswith("socket:")
        except OSError:
            pass
    return n


def test_flood_of_silent_connections(psk_agent: tuple[AgentProcess, bytes]) -> None:
    a, psk = psk_agent
    pid = a.proc.pid
    unloaded = statistics.median(_open_time(a.port, psk) for _ in range(3))
    a.wait_sessions(lambda ss: ss == [])
    wait_until(lambda: not children(pid), 5, "workers of the unloaded runs gone")
    base_sockets, base_pss = _accepted(pid), pss_kib(pid)
    flood = [_silent(a.port, f"127.0.0.{2 + i % 10}") for i in range(FLOOD)]
    t_flood = time.monotonic()
    try:
        wait_until(lambda: _accepted(pid) >= base_sockets + FLOOD, FLOOD_AUTH_S / 2,
                   "the agent accepted the flood")  # fmt: skip
        grown_kib = pss_kib(pid) - base_pss
        assert children(pid) == [], "a process for an unauthenticated connection"
        # The main process forks its workers: it has started no thread (nor
        # imported NumPy, whose OpenBLAS would start some).
        assert len(list(Path(f"/proc/{pid}/task").iterdir())) == 1
        assert a.state_json()["sessions"] == []
        loaded = [_open_time(a.port, psk) for _ in range(3)]
        assert time.monotonic() - t_flood < FLOOD_AUTH_S, "measured after the flood was dropped"
        print(f"flood={FLOOD} grown={grown_kib} KiB unloaded={unloaded:.4f} s loaded={loaded}")
        # Memory: a socket and a few KB each, not a process (~23 MB) each.
        assert grown_kib < 8 * 1024, f"{FLOOD} silent connections took {grown_kib} KiB"
        # The legitimate backend's connect+open is not held up by the crowd.
        assert max(loaded) < 3 * unloaded + 0.5, (unloaded, loaded)
    finally:
        for s in flood:
            s.close()


def _read_to_eof(s: socket.socket, timeout: float) -> None:
    """Whatever the agent sent (its TLS flight), until it closes."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except (ConnectionError, ssl.SSLError):
        pass


def _client_hello() -> bytes:
    """The first flight of a real TLS client (then the caller stalls)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO())
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_half_handshakes_dropped_at_deadline(pki: Path, tmp_path: Path) -> None:
    a = AgentProcess(tmp_path, "--tls-dir", str(pki), "--cert-name", "agent1",
                     "--auth-timeout", str(AUTH_S))  # fmt: skip
    try:
        hello = _client_hello()
        t_first = time.monotonic()
        stalled = []
        for _ in range(20):  # a ClientHello, then nothing
            s = _silent(a.port, "127.0.0.2")
            s.sendall(hello)
            stalled.append(s)
        for _ in range(5):  # TLS done, our HELLO, then nothing
            c = RawClient(a.port, tls=client_tls(pki))
            c.hello()
            stalled.append(c.sock)
        t_last = time.monotonic()
        # Others go on meanwhile: a legitimate client is served at once.
        good = RawClient(a.port, tls=client_tls(pki))
        good.connect()
        assert good.call([rec(Opcode.NOP)]).status == 0
        assert time.monotonic() - t_last < 1.0
        _read_to_eof(stalled[0], AUTH_S + 5)
        assert time.monotonic() - t_first > AUTH_S - 0.5  # not before its deadline
        for s in stalled:
            _read_to_eof(s, AUTH_S + 5)
            s.close()
        assert time.monotonic() - t_last < AUTH_S + 3.0  # and all of them at theirs
        assert a.log_text().count("event=auth_timeout") >= 25
        assert good.call([rec(Opcode.NOP)]).status == 0
        good.close()
        assert [s["client"] for s in a.state_json()["sessions"]] in ([], ["test"])
    finally:
        a.stop()


def _closed_soon(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_caps_drop_the_oldest(tmp_path: Path) -> None:
    psk = os.urandom(24).hex().encode()
    (tmp_path / "psk").write_bytes(psk)
    (tmp_path / "psk").chmod(0o600)
    a = AgentProcess(tmp_path, "--psk-file", str(tmp_path / "psk"), "--executor", "cpu",
                     "--max-handshakes", "6", "--max-handshakes-per-source", "3",
                     "--auth-timeout", "30")  # fmt: skip
    try:
        first = [_silent(a.port, "127.0.0.2") for _ in range(3)]
        wait_until(lambda: _accepted(a.proc.pid) >= 4, 5, "three pending")
        fourth = _silent(a.port, "127.0.0.2")  # over the per-source cap: the oldest goes
        assert _closed_soon(first[0], 5)
        assert not _closed_soon(first[1], 0.2)
        others = [_silent(a.port, f"127.0.0.{3 + i}") for i in range(3)]  # 6 pending now
        late = _silent(a.port, "127.0.0.9")  # over the total: the oldest left goes
        assert _closed_soon(first[1], 5)
        assert not _closed_soon(first[2], 0.2)
        # An authenticating peer is admitted beside the full table, then leaves it.
        c = RawClient(a.port, psk=psk)
        c.connect()
        assert c.call([rec(Opcode.NOP)]).status == 0
        c.close()
        assert "event=handshake_evicted" in a.log_text()
        for s in [*first, fourth, *others, late]:
            s.close()
    finally:
        a.stop()
