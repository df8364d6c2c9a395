"""A real etcd for tests and benchmarks: Debian's /usr/bin/etcd on free
127.0.0.1 ports with a data dir of its own, stopped (and the dir removed) on
exit. Ready in 0.3-1 s on these machines (DESIGN.md)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

ETCD = "/usr/bin/etcd"
START_TIMEOUT = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """``with EtcdServer() as etcd: etcd.url`` -> ``etcd://127.0.0.1:PORT``."""

    def __init__(self, binary: str = ETCD, quota_bytes: int = 2 << 30) -> None:
        self.binary = binary
        self.quota_bytes = quota_bytes
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: Path | None = None

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.port}"

    def start(self) -> None:
        if not os.access(self.binary, os.X_OK):
            raise FileNotFoundError(f"{self.binary} is missing: apt-get install etcd-server")
        self.dir = Path(tempfile.mkdtemp(prefix="vpcie-etcd-"))
        self.port, peer = _free_port(), _free_port()
        log = (self.dir / "etcd.log").open("wb")
        self.proc = subprocess.Popen(
            [
                self.binary, "--name", "test", "--data-dir", str(self.dir / "data"),
                "--listen-client-urls", f"http://127.0.0.1:{self.port}",
                "--advertise-client-urls", f"http://127.0.0.1:{self.port}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"test=http://127.0.0.1:{peer}",
                "--quota-backend-bytes", str(self.quota_bytes),
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self.proc is not None and self.dir is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.dir / "etcd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {tail}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s,
            ):
                # ready = answers HTTP /health with a leader
                s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                if b'"health":"true"' in s.recv(4096):
                    return
            time.sleep(0.05)
        raise TimeoutError(f"etcd not healthy on 127.0.0.1:{self.port} after {START_TIMEOUT} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
