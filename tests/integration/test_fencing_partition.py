"""Fencing under a partition (the issue's must-show; docs/SECURITY.md "Lease
fencing"): the agent in one network namespace, two backends' clients in
another, each bound to its own address on the veth. A holds cpu0 under lease
token 5 and is cut off (nftables drops its address); the pool leases the
device again, B opens with token 9 and is served, A's worker is ended at
once. After the partition heals A can do nothing more, and reopening with
its old token is refused with STALE_LEASE: no expiry timer is involved."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_agent.testclient import RawClient
from tests.conftest import wait_for
from tests.integration.agent_helpers import alive
from tests.netlab import LabAgent, NetLab, unavailable
from vpcie.errors import ErrorCode
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import Opcode

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "")

SANS = [f"10.231.{n}.2" for n in range(16, 216)]  # every address a lab may give the agent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    for args in (
        ["init", "--dir", str(d)],
        ["issue", "--dir", str(d), "--name", "agent", "--server", "--san", *SANS],
        ["issue", "--dir", str(d), "--name", "backend", "--client"],
    ):
        r = subprocess.run([sys.executable, "-m", "host_agent.main", "pki", *args],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
    return d


@pytest.fixture
def lab() -> Iterator[NetLab]:
    with NetLab() as lab:
        yield lab


def _second_address(lab: NetLab) -> str:
    """Another address on the client's veth (B's), beside lab.client_ip (A's)."""
    from pyroute2 import NetNS

    addr = lab.client_ip.rsplit(".", 1)[0] + ".3"
    with NetNS(lab.client_ns) as ns:
        idx = ns.link_lookup(ifname=lab._veth[1])[0]
        ns.addr("add", index=idx, address=addr, prefixlen=24)
    return addr


def _cut_off(lab: NetLab, addr: str) -> None:
    """Drop every packet from and to ``addr`` in the agent's namespace."""
    lab.nft(lab.agent_ns, f"""table inet fencecut {{
  chain in {{ type filter hook input priority 0; ip saddr {addr} drop; }}
  chain out {{ type filter hook output priority 0; ip daddr {addr} drop; }}
}}""")  # fmt: skip


def _heal(lab: NetLab) -> None:
    lab.nft(lab.agent_ns, "table inet fencecut {}\ndelete table inet fencecut")


def test_partitioned_holder_is_fenced_out(lab: NetLab, pki: Path, tmp_path: Path) -> None:
    state = tmp_path / "agent-state.json"
    agent = LabAgent(tmp_path / "agent", lab.agent_ns, lab.agent_ip, pki)
    agent.extra_args = (*agent.extra_args, "--state-file", str(state))
    lab.agents.append(agent)
    agent.start()
    tls = (str(pki / "ca.crt"), str(pki / "backend.crt"), str(pki / "backend.key"))
    addr_b = _second_address(lab)

    def client(source: str) -> RawClient:
        with lab.inside(lab.client_ns):
            return RawClient(agent.port, tls=tls, host=lab.agent_ip, source=source)

    def sessions() -> list[dict[str, object]]:
        import json

        try:
            got: list[dict[str, object]] = json.loads(state.read_text())["sessions"]
        except (OSError, ValueError):
            return []
        return got

    # A: token 5 on cpu0, working.
    a = client(lab.client_ip)
    a.connect(device="cpu0", lease_token=5)
    h = a.call([rec(Opcode.MEM_ALLOC, 4096, 0)]).results[0]
    assert a.call([rec(Opcode.MEMSET, h, 7, 0, 4096)]).status == 0
    (sa,) = wait_for(sessions, 10, "A's session in the state file")
    assert sa["lease_token"] == 5 and sa["peer"]
    assert a.sock.getsockname()[0] == lab.client_ip

    _cut_off(lab, lab.client_ip)  # A is partitioned away; nothing tells it
    try:
        # The pool gives the device to B (token 9): served, and A's worker ends.
        b = client(addr_b)
        b.connect(device="cpu0", lease_token=9)
        assert b.sock.getsockname()[0] == addr_b
        assert b.call([rec(Opcode.NOP)]).status == 0
        wait_for(lambda: not alive(int(str(sa["pid"]))), 5, "A's worker gone")
        (sb,) = wait_for(lambda: [s for s in sessions() if s["pid"] != sa["pid"]] or None, 5,
                         "only B's session")  # fmt: skip
        assert len(sessions()) == 1 and sb["lease_token"] == 9
        assert any("fenced_out" in line and "lease_token=5" in line for line in agent.log_tail)
    finally:
        _heal(lab)

    # Healed: A's session is dead (its next command meets a closed connection) ...
    a.sock.settimeout(10)
    with pytest.raises(OSError):
        a.call([rec(Opcode.MEMSET, h, 8, 0, 4096)])
    a.sock.close()
    # ... and A cannot come back with its old lease.
    again = client(lab.client_ip)
    again.hello(), again.auth()
    status, _sid, message, _info = again.open(device="cpu0", lease_token=5)
    assert status == ErrorCode.STALE_LEASE and "older than 9" in message
    again.sock.close()
    assert b.call([rec(Opcode.NOP)]).status == 0  # B is untouched
    b.close()
