"""Helpers for the agent's process-model tests: a fleet PKI made with the real
CLI, the agent's processes and memory from /proc, polling with a deadline,
and a pair of network namespaces joined by a veth (pyroute2)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from host_agent.testclient import AgentProcess
from tests.conftest import ROOT


def agent_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "host_agent.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def make_pki(d: Path, *, sans: tuple[str, ...] = ("127.0.0.1",)) -> Path:
    """ca + agent1 (server) + backend1 (client) in ``d``."""
    for args in (
        ["init", "--dir", str(d)],
        ["issue", "--dir", str(d), "--name", "agent1", "--server", "--san", *sans],
        ["issue", "--dir", str(d), "--name", "backend1", "--client"],
    ):
        r = agent_cli("pki", *args)
        assert r.returncode == 0, r.stderr
    return d


def client_tls(pki: Path, name: str = "backend1") -> tuple[str, str, str]:
    return str(pki / "ca.crt"), str(pki / f"{name}.crt"), str(pki / f"{name}.key")


def wait_until(pred: Callable[[], object], timeout: float, what: str) -> float:
    """Poll ``pred`` until true; returns the seconds it took."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def pss_kib(pid: int) -> int:
    """Proportional set size of ``pid`` and its children (KiB)."""
    total = 0
    for p in (pid, *children(pid)):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


@dataclass
class NetPair:
    """Two namespaces joined by a veth: ``a`` holds ``addr_a``, ``b`` ``addr_b``."""

    a: str
    b: str
    if_a: str
    if_b: str
    addr_a: str = "10.203.0.1"
    addr_b: str = "10.203.0.2"

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def set_link(self, ns: str, ifname: str, up: bool) -> None:
        from pyroute2 import NetNS

        with NetNS(ns) as n:
            idx = n.link_lookup(ifname=ifname)[0]
            n.link("set", index=idx, state="up" if up else "down")


@contextmanager
def netns_pair(tag: str) -> Iterator[NetPair]:
    from pyroute2 import IPRoute, NetNS, netns

    uniq = f"{tag}{os.getpid() % 100000}"
    pair = NetPair(f"vpag-a-{uniq}", f"vpag-b-{uniq}", f"vpa{uniq}"[:15], f"vpb{uniq}"[:15])
    netns.create(pair.a)
    netns.create(pair.b)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=pair.if_a, kind="veth", peer=pair.if_b)
            for ifname, ns in ((pair.if_a, pair.a), (pair.if_b, pair.b)):
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.link("set", index=idx, net_ns_fd=ns)
        for ns, ifname, addr in (
            (pair.a, pair.if_a, pair.addr_a),
            (pair.b, pair.if_b, pair.addr_b),
        ):
            with NetNS(ns) as n:
                lo = n.link_lookup(ifname="lo")[0]
                n.link("set", index=lo, state="up")
                idx = n.link_lookup(ifname=ifname)[0]
                n.addr("add", index=idx, address=addr, prefixlen=30)
                n.link("set", index=idx, state="up")
        yield pair
    finally:
        for ns in (pair.a, pair.b):  # removing a namespace removes its veth end
            try:
                netns.remove(ns)
            except OSError:
                pass


class NsAgent(AgentProcess):
    """``vpcie-agent serve`` run through a command prefix (``ip netns exec NS``)."""

    def __init__(self, workdir: Path, prefix: list[str], listen: str, *args: str) -> None:
        self.state = workdir / f"agent-ns-{time.monotonic_ns()}.json"
        self.log = workdir / (self.state.stem + ".log")
        cmd = [
            *prefix, sys.executable, "-m", "host_agent.main", "serve", "--listen", listen,
            "--state-file", str(self.state), "--name", "test-agent", *args,
        ]  # fmt: skip
        self.logf = open(self.log, "wb")  # closed by stop()
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=self.logf, cwd=ROOT)
        self.port = self._wait_port()


# A client in another namespace: TLS, HELLO, AUTH, OPEN, print the OPEN
# status, then stay silent until stdin closes.
SILENT_CLIENT = r"""
import sys
from host_agent.testclient import RawClient
host, port, ca, cert, key = sys.argv[1:6]
c = RawClient(int(port), tls=(ca, cert, key), host=host)
c.hello(); c.auth()
print("open", c.open()[0], flush=True)
sys.stdin.read()
"""
