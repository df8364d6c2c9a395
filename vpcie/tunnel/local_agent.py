"""A real ``vpcie-agent`` as a child process on loopback (demo, benchmarks, tests).

Starts ``python -m host_agent.main serve --listen 127.0.0.1:0`` in its own
process group (the agent runs one worker process per session: killing the
group kills the agent *and* its workers, like a host going down), learns the
port from the agent's ``event=listening address=HOST:PORT`` log line, and
keeps the last log lines for error messages.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from types import TracebackType

from vpcie.errors import VpcieError

_LISTENING = re.compile(r"event=listening address=(\S+):(\d+)")
START_TIMEOUT = 20.0  # s; a cold start imports NumPy on a loaded 2-core machine


class AgentStartError(VpcieError):
    """The local vpcie-agent exited or did not listen in time."""


class LocalAgent:
    """``with LocalAgent(tmpdir) as agent: TunnelClient.connect(agent.host, agent.port,
    psk=agent.psk)``. PSK mode unless ``tls_dir`` is given (then mutual TLS)."""

    def __init__(
        self,
        workdir: Path,
        *,
        tls_dir: Path | None = None,
        executor: str = "cpu",
        extra_args: tuple[str, ...] = (),
        python: str = sys.executable,
    ) -> None:
        self.workdir = workdir
        self.tls_dir = tls_dir
        self.executor = executor
        self.extra_args = extra_args
        self.python = python
        self.host = "127.0.0.1"
        self.port = 0
        self.psk: bytes | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_tail: deque[str] = deque(maxlen=200)
        self._listening = threading.Event()
        self._drain: threading.Thread | None = None

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "host_agent.main", "serve", "--listen", "127.0.0.1:0"]
        if self.tls_dir is not None:
            cmd += ["--tls-dir", str(self.tls_dir)]
        else:
            psk_file = self.workdir / "agent.psk"
            if self.psk is None:
                self.psk = secrets.token_hex(32).encode()
                fd = os.open(psk_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(self.psk)
            cmd += ["--psk-file", str(psk_file)]
        return [*cmd, "--executor", self.executor, "--name", "local-agent", *self.extra_args]

    def start(self, timeout: float = START_TIMEOUT) -> LocalAgent:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.workdir,
            start_new_session=True,
        )
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = " | ".join(list(self.log_tail)[-3:]) or "no output"
                raise AgentStartError(f"vpcie-agent did not start listening: {tail}")
        return self

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log_tail.append(line)
            if not self._listening.is_set():
                m = _LISTENING.search(line)
                if m:
                    self.port = int(m.group(2))
                    self._listening.set()

    def kill(self) -> None:
        """SIGKILL the agent and its session workers (its process group)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL the group after ``timeout``."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers left behind, if any
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        if self._drain is not None:
            self._drain.join(2)

    def __enter__(self) -> LocalAgent:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
