"""An agent frees what a vanished client held: the idle timeout fires with
TLS as with PSK (a silent client, a client behind a partition made in
network namespaces), the device slot is freed for the next client, and
workers die with the agent's main process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_agent.testclient import AgentProcess, RawClient
from tests.conftest import ROOT
from tests.integration.agent_helpers import (
    SILENT_CLIENT,
    NsAgent,
    alive,
    children,
    client_tls,
    make_pki,
    netns_pair,
    wait_until,
)
from vpcie.errors import ErrorCode
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import Opcode

IDLE_S = 1.5
MARGIN_S = 3.0  # the worker's exit, the parent's reaping and state file, a loaded CI box


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"), sans=("127.0.0.1", "10.203.0.1"))


def _second_client_status(port: int, pki: Path) -> int:
    c = RawClient(port, tls=client_tls(pki))
    c.hello()
    c.auth()
    status = c.open()[0]
    c.sock.close()
    return status


def test_tls_silent_client_loses_worker_and_slot(pki: Path, tmp_path: Path) -> None:
    a = AgentProcess(tmp_path, "--tls-dir", str(pki), "--cert-name", "agent1",
                     "--idle-timeout", str(IDLE_S), "--max-sessions", "1")  # fmt: skip
    try:
        silent = RawClient(a.port, tls=client_tls(pki))
        silent.connect()
        t0 = time.monotonic()
        [s] = a.wait_sessions()
        # While it holds the device, the one slot is taken.
        assert _second_client_status(a.port, pki) == ErrorCode.QUOTA_EXCEEDED
        wait_until(lambda: not alive(s["pid"]), IDLE_S + MARGIN_S, "silent TLS worker exits")
        assert time.monotonic() - t0 >= IDLE_S * 0.9
        a.wait_sessions(lambda ss: ss == [], MARGIN_S)
        assert "event=session_idle" in a.log_text()
        fresh = RawClient(a.port, tls=client_tls(pki))
        fresh.connect()  # the device is free again
        assert fresh.call([rec(Opcode.NOP)]).status == 0
        fresh.close()
    finally:
        a.stop()


@pytest.fixture
def ns_agent(pki: Path, tmp_path: Path) -> Iterator[tuple[NsAgent, object]]:
    with netns_pair("lv") as net:
        a = NsAgent(tmp_path, net.exec_prefix(net.a), f"{net.addr_a}:0",
                    "--tls-dir", str(pki), "--cert-name", "agent1",
                    "--idle-timeout", str(IDLE_S), "--max-sessions", "1")  # fmt: skip
        try:
            yield a, net
        finally:
            a.stop()


def test_partitioned_tls_client_loses_worker_and_slot(
    ns_agent: tuple[NsAgent, object], pki: Path
) -> None:
    from tests.integration.agent_helpers import NetPair

    a, net = ns_agent
    assert isinstance(net, NetPair)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    client = subprocess.Popen(
        [*net.exec_prefix(net.b), sys.executable, "-c", SILENT_CLIENT,
         net.addr_a, str(a.port), *client_tls(pki)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        assert client.stdout is not None
        assert client.stdout.readline().split() == ["open", "0"]
        [s] = a.wait_sessions()
        net.set_link(net.b, net.if_b, up=False)  # the partition: the client vanishes
        t0 = time.monotonic()
        wait_until(lambda: not alive(s["pid"]), IDLE_S + MARGIN_S, "partitioned worker exits")
        a.wait_sessions(lambda ss: ss == [], MARGIN_S)
        assert time.monotonic() - t0 < IDLE_S + MARGIN_S
        # The slot is free: a client on the agent's side of the partition gets the device.
        second = subprocess.run(
            [*net.exec_prefix(net.a), sys.executable, "-c", SILENT_CLIENT,
             net.addr_a, str(a.port), *client_tls(pki)],
            input="", capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
        )  # fmt: skip
        assert second.stdout.split() == ["open", "0"], second.stderr
    finally:
        client.kill()
        client.wait(10)


def test_workers_die_with_the_main_process(tmp_path: Path) -> None:
    d = tmp_path / "psk"
    d.mkdir()
    (d / "psk").write_bytes(os.urandom(24).hex().encode())
    (d / "psk").chmod(0o600)
    psk = (d / "psk").read_bytes()
    a = AgentProcess(d, "--psk-file", str(d / "psk"), "--executor", "cpu")
    clients = [RawClient(a.port, psk=psk) for _ in range(2)]
    try:
        for c in clients:
            c.connect()
            assert c.call([rec(Opcode.NOP)]).status == 0
        pids = [s["pid"] for s in a.wait_sessions(lambda ss: len(ss) == 2 and all(
            s.get("env") for s in ss))]  # fmt: skip
        assert sorted(pids) == sorted(children(a.proc.pid))
        os.kill(a.proc.pid, signal.SIGKILL)  # the main process only, not its group
        a.proc.wait(10)
        wait_until(lambda: not any(alive(p) for p in pids), 5.0, "workers die with the agent")
        for c in clients:  # and their clients see the connection go
            c.sock.settimeout(5)
            with pytest.raises((ConnectionError, OSError)):
                c.call([rec(Opcode.NOP)])
    finally:
        a.stop()
