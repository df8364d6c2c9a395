"""Liveness across network namespaces (tests/netlab.py): a lossy, slow or
loaded but healthy link never loses a session; a killed, stopped or
unreachable agent does, within the documented times and with the reason that
says which (docs/PROTOCOL.md "Liveness").

The agent runs in one namespace on its veth address with mutual TLS (it
refuses PSK off loopback); the client runs in this process, its sockets made
in the other namespace. Faults are nftables rules in the agent's namespace.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netlab import DelayRelay, LabAgent, NetLab, busy_workers, stop_workers, unavailable
from vpcie.control.target import client_tls_context
from vpcie.errors import ErrorCode, VgpuError
from vpcie.tunnel import Runstate, TunnelClient
from vpcie.tunnel.liveness import PING_INTERVAL_NS, LivenessConfig

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "")

MiB = 1 << 20
SANS = [f"10.231.{n}.2" for n in range(16, 216)]  # every address a lab may give the agent


def agent_cli(*args: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "host_agent.main", *args], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    agent_cli("pki", "init", "--dir", str(d))
    agent_cli("pki", "issue", "--dir", str(d), "--name", "agent", "--server", "--san", *SANS)
    agent_cli("pki", "issue", "--dir", str(d), "--name", "backend", "--client")
    return d

PING_INTERVAL = PING_INTERVAL_NS / 1e9


@pytest.fixture
def lab() -> Iterator[NetLab]:
    with NetLab() as lab:
        yield lab


@pytest.fixture
def agent(lab: NetLab, pki: Path, tmp_path: Path) -> LabAgent:
    return lab.start_agent(tmp_path / "agent", pki)


async def connect(
    lab: NetLab, agent: LabAgent, pki: Path, *, port: int = 0, host: str = "", **kw: object
) -> TunnelClient:
    """A TLS session made from the client's namespace (its socket stays there).
    Through a relay (``host``/``port``) the agent's certificate is still checked
    against the agent's own address, as a backend behind a proxy would."""
    with lab.inside(lab.client_ns):
        return await TunnelClient.connect(
            host or agent.host,
            port or agent.port,
            ssl=client_tls_context(str(pki), "backend"),
            server_hostname=agent.host,
            timeout=20,
            **kw,  # type: ignore[arg-type]
        )


async def round_trip(c: TunnelClient, handle: int, size: int, seed: int) -> None:
    """``size`` bytes up and back down; the checksums must match."""
    data = os.urandom(64) * (size // 64)
    data = hashlib.sha256(seed.to_bytes(8, "little")).digest() + data[32:]
    await c.copy_h2d(handle, 0, data)
    back = bytearray(size)
    await c.copy_d2h(handle, 0, back)
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()


async def wait_lost(c: TunnelClient, timeout: float) -> float:
    """Seconds until ``c`` is LOST (polled with a deadline)."""
    t0 = time.monotonic()
    while c.state is not Runstate.LOST:
        assert time.monotonic() - t0 < timeout, f"not lost after {timeout} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


# -- no false loss ---------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_five_percent_loss_each_way_64mib_for_60s(
    lab: NetLab, agent: LabAgent, pki: Path
) -> None:
    c = await connect(lab, agent, pki, name="lossy")
    handle = await c.alloc(64 * MiB)
    lab.loss(5)
    t0, rounds = time.monotonic(), 0
    while time.monotonic() - t0 < 60:
        await round_trip(c, handle, 64 * MiB, rounds)  # raises DEVICE_LOST on a loss
        rounds += 1
    assert c.state is Runstate.READY, c.lost_reason
    lab.heal()
    await c.close()
    assert rounds >= 1


@pytest.mark.timeout(240)
@pytest.mark.parametrize("loss", [0, 5], ids=["clean-link", "5pct-loss"])
def test_four_copiers_and_four_busy_workers_on_two_cpus(
    lab: NetLab, agent: LabAgent, pki: Path, loss: int
) -> None:
    """Four backends (processes, tests/net_copier.py) copy 64 MiB up and down
    at once for 30 s beside four processes spinning on the 2 CPUs; then the
    same with 5% loss each way on top (the two failures the report saw, at once)."""
    if loss:
        lab.loss(loss)
    workers = busy_workers(4, 120)
    try:
        cmd = ["ip", "netns", "exec", lab.client_ns, sys.executable, "-m", "tests.net_copier"]
        cmd += [agent.host, str(agent.port), str(pki), "30", "64"]
        root = Path(__file__).resolve().parents[2]  # where `-m tests.net_copier` resolves
        copiers = [
            subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=root) for _ in range(4)
        ]
        results = [json.loads(p.communicate(timeout=200)[0]) for p in copiers]
    finally:
        stop_workers(workers)
    agent_log = "\n".join(ln for ln in agent.log_tail if "session" in ln or "lost" in ln)
    for r in results:
        assert r["lost"] == "" and r["bad"] == 0 and r["rounds"] >= 1, (results, agent_log)


@pytest.mark.timeout(120)
async def test_fifty_ms_added_delay_each_way(lab: NetLab, agent: LabAgent, pki: Path) -> None:
    with lab.inside(lab.client_ns):
        relay = await DelayRelay((agent.host, agent.port), delay=0.05).start()
    try:
        c = await connect(lab, agent, pki, host="127.0.0.1", port=relay.port, name="slow")
        handle = await c.alloc(16 * MiB)
        t0, rounds = time.monotonic(), 0
        while time.monotonic() - t0 < 15:
            await round_trip(c, handle, 16 * MiB, rounds)
            rounds += 1
        assert c.rtt is not None and c.rtt >= 0.1  # the delay is there, each way
        assert c.state is Runstate.READY, c.lost_reason
        await c.close()
    finally:
        await relay.close()


# -- real losses, found in time --------------------------------------------------------


async def test_killed_agent_is_lost_within_1s(lab: NetLab, agent: LabAgent, pki: Path) -> None:
    c = await connect(lab, agent, pki, name="kill")
    await c.nop()
    agent.signal_all(signal.SIGKILL)
    took = await wait_lost(c, 5)
    assert took < 1.0 and "connection to agent" in c.lost_reason
    with pytest.raises(VgpuError) as e:
        await c.nop()
    assert e.value.code is ErrorCode.DEVICE_LOST


async def test_partition_is_lost_after_unreachable_after_not_before(
    lab: NetLab, agent: LabAgent, pki: Path
) -> None:
    c = await connect(lab, agent, pki, name="partition")
    await c.nop()
    lab.partition()
    took = await wait_lost(c, 8)
    assert 3.5 < took < 5.0, (took, c.lost_reason)
    assert "no ACK from agent" in c.lost_reason or "troubled link" in c.lost_reason


async def test_partition_timeout_is_a_knob(lab: NetLab, agent: LabAgent, pki: Path) -> None:
    live = LivenessConfig.from_seconds(1.0, 2.0)
    c = await connect(lab, agent, pki, name="knob", liveness=live)
    await c.nop()
    lab.partition()
    took = await wait_lost(c, 8)
    assert 1.5 < took < 3.0, (took, c.lost_reason)


async def test_stopped_agent_is_hung_within_hang_after(
    lab: NetLab, agent: LabAgent, pki: Path
) -> None:
    c = await connect(lab, agent, pki, name="stop")
    await c.nop()
    agent.signal_all(signal.SIGSTOP)
    try:
        took = await wait_lost(c, 5)
    finally:
        agent.signal_all(signal.SIGCONT)
    # The rule counts silence from the agent's last byte (its last PONG, up to
    # one ping interval before the stop), so the loss may come that much sooner
    # after SIGSTOP; the silence it reports is at least hang_after.
    assert 1.0 - PING_INTERVAL < took < 2.0, (took, c.lost_reason)
    assert "host answers but the agent is silent for 1." in c.lost_reason, c.lost_reason


async def test_stopped_agent_mid_upload_is_hung(lab: NetLab, agent: LabAgent, pki: Path) -> None:
    """Stopped while we upload: its kernel takes bytes until its receive
    buffer is full, then nothing moves; no trouble on the link -> HUNG."""
    c = await connect(lab, agent, pki, name="stop-upload")
    handle = await c.alloc(64 * MiB)
    agent.signal_all(signal.SIGSTOP)
    try:
        up = asyncio.ensure_future(c.copy_h2d(handle, 0, bytes(64 * MiB)))
        took = await wait_lost(c, 6)
        with pytest.raises(VgpuError):
            await up
    finally:
        agent.signal_all(signal.SIGCONT)
    assert took < 3.0 and "host answers but the agent is silent" in c.lost_reason


# -- the lane: the same rule in C, on a real TCP connection ------------------------------


def lane_pair(lab: NetLab) -> tuple[socket.socket, socket.socket]:
    """A TCP connection across the lab: (the lane's end, the silent 'agent')."""
    with lab.inside(lab.agent_ns):
        srv = socket.create_server((lab.agent_ip, 0))
    with lab.inside(lab.client_ns):
        ours = socket.create_connection(srv.getsockname(), timeout=5)
    peer, _ = srv.accept()
    srv.close()
    ours.setblocking(False)
    return ours, peer


def lane_lost_after(lab: NetLab, live: LivenessConfig, fault: str) -> tuple[float, bytes]:
    from vpcie._native import native_available
    from vpcie.gpu.native_lane import LOST, NativeLane

    if not native_available():
        pytest.skip("native module not built")
    ours, peer = lane_pair(lab)
    lane = NativeLane(16, 1 << 16)
    try:
        assert lane.add(1, ours.fileno(), 7, 0, 1, 0, live)
        if fault == "partition":
            lab.partition()
        t0 = time.monotonic()
        while (ev := lane.next_event()) is None:
            assert time.monotonic() - t0 < 10, "the lane never gave up"
            time.sleep(0.01)
        assert ev.kind == LOST
        return time.monotonic() - t0, ev.data
    finally:
        lane.close()
        ours.close()
        peer.close()


def test_lane_trouble_present_is_not_lost_before_unreachable_after(lab: NetLab) -> None:
    live = LivenessConfig.from_seconds(1.0, 2.5)
    took, why = lane_lost_after(lab, live, "partition")
    # Our bytes count as waiting from the last tick that saw none unacked, up to
    # a tick before the partition: not lost before unreachable_after - 2 ticks.
    assert 2.5 - 2 * PING_INTERVAL < took < 3.5, (took, why)
    assert why.startswith((b"no ACK from agent's host", b"agent silent for")), why


def test_lane_silent_peer_on_tcp_is_hung(lab: NetLab) -> None:
    took, why = lane_lost_after(lab, LivenessConfig(), "none")
    # Silence counts from the lane's last sign of life, up to a tick before t0.
    assert 1.0 - PING_INTERVAL < took < 2.0, (took, why)
    assert why.startswith(b"agent's host answers but the agent is silent for 1."), why
