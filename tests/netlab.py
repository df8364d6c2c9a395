"""A small network lab for fault tests: two network namespaces joined by a
veth pair (pyroute2), nftables loss / partition inside them, a delaying TCP
relay, and a vpcie-agent (mutual TLS) listening on its veth address.

    with NetLab() as lab:
        agent = lab.start_agent(pki_dir)          # in lab.agent_ns, on lab.agent_ip
        with lab.inside(lab.client_ns):           # this thread's sockets: client side
            ...TunnelClient.connect(lab.agent_ip, agent.port, ssl=...)
        lab.loss(5)                               # 5 % dropped each way
        lab.partition() / lab.heal()

Everything it makes lives in the two namespaces, so removing them (on exit,
also when a test fails) removes the veth pair and every nft table with them.
Needs root, nft and `ip`; ``unavailable()`` says why not (tests skip with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from vpcie.tunnel.local_agent import LocalAgent

_serial = itertools.count()


def unavailable() -> str | None:
    """Why the lab cannot run here ("": it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "pyroute2 is not installed"
    return None


class LabAgent(LocalAgent):
    """A LocalAgent started inside a namespace, listening on ``host``."""

    def __init__(self, workdir: Path, ns: str, host: str, tls_dir: Path) -> None:
        super().__init__(workdir, tls_dir=tls_dir, extra_args=("--name", "lab-agent"))
        self.ns = ns
        self.host = host

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--listen") + 1] = f"{self.host}:0"
        return ["ip", "netns", "exec", self.ns, *cmd]

    def signal_all(self, sig: int) -> None:
        """``sig`` to the agent and its session workers (its process group)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)


class NetLab:
    def __init__(self) -> None:
        n = next(_serial)
        tag = f"{os.getpid() % 100000}x{n}"
        self.agent_ns, self.client_ns = f"vpl-a{tag}", f"vpl-c{tag}"
        net = 16 + (os.getpid() + n) % 200
        self.agent_ip, self.client_ip = f"10.231.{net}.2", f"10.231.{net}.1"
        self._veth = (f"vpa{tag}"[:15], f"vpc{tag}"[:15])
        self.agents: list[LabAgent] = []

    # -- life --------------------------------------------------------------------
    def __enter__(self) -> NetLab:
        from pyroute2 import IPRoute, NetNS, netns

        try:
            for ns in (self.agent_ns, self.client_ns):
                netns.create(ns)
            va, vc = self._veth
            with IPRoute() as ip:
                ip.link("add", ifname=va, kind="veth", peer=vc)
                ip.link("set", index=ip.link_lookup(ifname=va)[0], net_ns_fd=self.agent_ns)
                ip.link("set", index=ip.link_lookup(ifname=vc)[0], net_ns_fd=self.client_ns)
            for ns, ifname, addr in (
                (self.agent_ns, va, self.agent_ip),
                (self.client_ns, vc, self.client_ip),
            ):
                with NetNS(ns) as nsr:
                    idx = nsr.link_lookup(ifname=ifname)[0]
                    nsr.addr("add", index=idx, address=addr, prefixlen=24)
                    nsr.link("set", index=idx, state="up")
                    nsr.link("set", index=nsr.link_lookup(ifname="lo")[0], state="up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        from pyroute2 import netns

        for agent in self.agents:
            agent.stop(timeout=2)
        for ns in (self.agent_ns, self.client_ns):
            with contextlib.suppress(OSError, FileNotFoundError):
                netns.remove(ns)  # its veth end and its nft tables go with it

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- where code runs -------------------------------------------------------------
    @contextlib.contextmanager
    def inside(self, ns: str) -> Iterator[None]:
        """This thread in ``ns`` (sockets made meanwhile stay there)."""
        from pyroute2 import netns

        netns.pushns(ns)
        try:
            yield
        finally:
            netns.popns()

    def start_agent(self, workdir: Path, tls_dir: Path) -> LabAgent:
        agent = LabAgent(workdir, self.agent_ns, self.agent_ip, tls_dir)
        self.agents.append(agent)
        agent.start()
        return agent

    # -- faults (nftables in the agent's namespace: both directions of the link) --------
    def nft(self, ns: str, script: str) -> None:
        r = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"],
            input=script, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"nft in {ns}: {r.stderr.strip()}")

    def _rules(self, rule: str) -> None:
        self.heal()
        self.nft(
            self.agent_ns,
            f"""table inet vplab {{
  chain in {{
    type filter hook input priority 0;
    iifname "lo" accept
    {rule}
  }}
  chain out {{
    type filter hook output priority 0;
    oifname "lo" accept
    {rule}
  }}
}}""",
        )

    def loss(self, percent: int) -> None:
        """Drop ``percent`` % of the packets each way, at random."""
        self._rules(f"numgen random mod 100 < {percent} drop")

    def partition(self) -> None:
        """Drop every packet each way (the agent's host unreachable)."""
        self._rules("drop")

    def heal(self) -> None:
        self.nft(self.agent_ns, "table inet vplab {}\ndelete table inet vplab")


class DelayRelay:
    """A TCP relay (asyncio, in the caller's loop and namespace) that holds
    each chunk ``delay`` s before passing it on, each way; at most ``window``
    bytes wait in each direction (then it stops reading: backpressure)."""

    def __init__(self, target: tuple[str, int], delay: float, window: int = 4 << 20) -> None:
        self.target, self.delay, self.window = target, delay, window
        self.server: asyncio.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1") -> DelayRelay:
        self.server = await asyncio.start_server(self._serve, host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            w.close()
            return
        for src, dst in ((r, uw), (ur, w)):
            t = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        room = asyncio.Semaphore(max(1, self.window // 65536))

        async def out() -> None:
            while True:
                due, chunk = await held.get()
                if not chunk:
                    break
                await asyncio.sleep(max(0.0, due - loop.time()))
                dst.write(chunk)
                await dst.drain()
                room.release()
            dst.close()

        sender = asyncio.create_task(out())
        try:
            while True:
                await room.acquire()
                chunk = await src.read(65536)
                await held.put((loop.time() + self.delay, chunk))
                if not chunk:
                    break
            await sender
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            dst.close()


def busy_workers(n: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    """``n`` processes that spin a CPU each for at most ``seconds``."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def wait_until(cond: object, timeout: float, step: float = 0.01) -> float:
    """Poll ``cond()`` until true; seconds it took (raises TimeoutError)."""
    t0 = time.monotonic()
    while not cond():  # type: ignore[operator]
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"not true after {timeout} s")
        time.sleep(step)
    return time.monotonic() - t0
