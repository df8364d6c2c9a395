"""Managed mode: a backend libvirt started (``--fd=N``, stdout/stderr
discarded, running as libvirt-qemu) still has a control socket and a log in
known places, named after its guest:

    RUN_DIR/NAME.ctl   (default /run/vpcie, $VPCIE_RUN_DIR)
    LOG_DIR/NAME.log   (default /var/log/vpcie, $VPCIE_LOG_DIR)

NAME is ``--name``, else the guest's name learned from the QEMU process at
the other end of the socket (identity.py), else ``backend-PID``. Until the
name is known, log records are held (a bounded number) and then written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from vpcie.backend.identity import learn_name
from vpcie.errors import ConfigError
from vpcie.fileerrors import current_user, os_error_line
from vpcie.places import control_socket, safe_name

LEARN_TIMEOUT_S = 60.0  # QEMU starts right after libvirt starts us; TCG boots are slow
MAX_HELD_RECORDS = 1000


@dataclass(frozen=True)
class ManagedPaths:
    run_dir: Path
    log_dir: Path

    def check(self) -> None:
        """Create both folders if needed; ConfigError (naming the folder and
        our user) unless we can create files in them."""
        for folder in (self.run_dir, self.log_dir):
            try:
                folder.mkdir(mode=0o750, parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(os_error_line("create folder", folder, exc)) from exc
            if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
                raise ConfigError(
                    f"cannot create files in {folder} as user {current_user()}: "
                    "make it a folder that user owns (see docs/INSTALL.md)"
                )

    def control(self, name: str) -> str:
        return control_socket(name, str(self.run_dir))

    def log(self, name: str) -> Path:
        return self.log_dir / f"{safe_name(name)}.log"


class HeldFileHandler(logging.Handler):
    """A log file whose path is known later: records before ``open`` are
    held (the newest MAX_HELD_RECORDS) and written first."""

    def __init__(self) -> None:
        super().__init__()
        self._held: deque[logging.LogRecord] = deque(maxlen=MAX_HELD_RECORDS)
        self._file: TextIO | None = None
        self.path: Path | None = None

    def open(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise ConfigError(os_error_line("open log file", path, exc)) from exc
        with self.lock:  # type: ignore[union-attr]
            self._file = os.fdopen(fd, "a", buffering=1)
            self.path = path
            held, self._held = list(self._held), deque(maxlen=MAX_HELD_RECORDS)
        for record in held:
            self.handle(record)

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None:
            self._held.append(record)
            return
        try:
            self._file.write(self.format(record) + "\n")
        except (OSError, ValueError):
            self.handleError(record)

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._file is not None:
                self._file.close()
                self._file = None
        super().close()


def fallback_name() -> str:
    return f"backend-{os.getpid()}"


async def learn_guest_name(fd: int, timeout: float = LEARN_TIMEOUT_S) -> str | None:
    """The guest's name from the QEMU peer of inherited socket ``fd``, retried
    (with backoff) until QEMU holds the other end or ``timeout`` passes."""
    sock = socket.socket(fileno=os.dup(fd))
    loop = asyncio.get_running_loop()
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return None  # a listener: no peer until QEMU connects, and maybe several
        deadline = loop.time() + timeout
        delay = 0.05
        while True:
            name = await asyncio.to_thread(learn_name, sock)  # a /proc walk: off the loop
            if name is not None or loop.time() >= deadline:
                return name
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
    finally:
        sock.close()
