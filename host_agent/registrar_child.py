"""``vpcie-agent serve --pool URL``: the registrar child process.

The agent's main process forks its workers, so it must stay single-threaded
and never load the pool client (aetcd starts grpc threads). It starts
``python -m vpcie.fleet.registrar`` instead, once it listens: a plain
fork+exec (subprocess, no thread); the child dies with the agent
(PR_SET_PDEATHSIG, set by the child itself with a getppid re-check) and
stays in the agent's process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from host_agent.logs import log
from vpcie.errors import ConfigError

WILDCARDS = ("", "0.0.0.0", "::")
STOP_WAIT_S = 3.0  # the registrar revokes its alive key on SIGTERM: give it that long


@dataclass(frozen=True)
class PoolOptions:
    url: str
    ttl: float
    address: str  # HOST:PORT as backends reach the agent; "" = from --listen
    name: str
    psk_file: str | None
    tls_dir: str | None
    tls_name: str


def check_url(url: str) -> None:
    """Refuse what no store opens, now, not in a child's log later."""
    if not url or ("://" in url and not url.startswith(("sqlite:///", "etcd://"))):
        raise ConfigError(f"--pool {url!r}: expected sqlite:///PATH, a path, or etcd://HOST:PORT")


def advertised(opts: PoolOptions, listen_host: str, port: int) -> str:
    if opts.address:
        return opts.address
    import socket

    host = socket.gethostname() if listen_host in WILDCARDS else listen_host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def command(opts: PoolOptions, address: str) -> list[str]:
    cmd = [
        sys.executable, "-m", "vpcie.fleet.registrar", "--pool", opts.url,
        "--agent-name", opts.name, "--address", address, "--ttl", f"{opts.ttl:g}",
        "--parent-pid", str(os.getpid()),
    ]  # fmt: skip
    if opts.psk_file:
        return [*cmd, "--psk-file", os.path.abspath(opts.psk_file)]
    assert opts.tls_dir is not None
    return [*cmd, "--tls-dir", os.path.abspath(opts.tls_dir), "--tls-name", opts.tls_name]


class RegistrarChild:
    def __init__(self, opts: PoolOptions, listen_host: str) -> None:
        self.opts = opts
        self.listen_host = listen_host
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> None:
        """Agent.on_listening: start the registrar for the port we listen on."""
        address = advertised(self.opts, self.listen_host, port)
        self.proc = subprocess.Popen(command(self.opts, address), stdin=subprocess.DEVNULL)
        log("info", "registrar_started", pid=self.proc.pid, pool=self.opts.url, address=address)

    def stop(self) -> None:
        """SIGTERM (it revokes the alive key: the agent is "down" at once),
        SIGKILL if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
