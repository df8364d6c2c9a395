"""A budget for log lines a guest can cause.

Everything a guest does wrong is logged (a bad descriptor chain, a refused
command or batch, a new context), and a hostile guest can do it in a loop: a
backend must not fill the host's journal for it. ``GuestLogBudget`` is a
logging filter: records from the guest-facing loggers at WARNING or below
pass while a token bucket has tokens (a burst, refilled at a steady rate);
the rest are dropped and counted, and the next record that passes says how
many were dropped. Errors, and everything the operator causes, always pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

# Loggers whose records a guest can trigger at will.
GUEST_LOGGERS = (
    "vpcie.virtqueue",
    "vpcie.backend.core",
    "vpcie.backend.device",
    "vpcie.gpu.device",
)


class GuestLogBudget(logging.Filter):
    def __init__(
        self,
        rate: float = 20.0,
        burst: int = 100,
        loggers: tuple[str, ...] = GUEST_LOGGERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.rate, self.burst = rate, burst
        self._prefixes = tuple(f"{name}." for name in loggers)
        self._names = set(loggers)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self.dropped = 0  # since the last record that passed
        self.dropped_total = 0

    def _guest(self, record: logging.LogRecord) -> bool:
        name = record.name
        return record.levelno <= logging.WARNING and (
            name in self._names or name.startswith(self._prefixes)
        )

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._guest(record):
            return True
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            self.dropped += 1
            self.dropped_total += 1
            return False
        self._tokens -= 1
        if self.dropped:
            record.msg = f"{record.msg} [{self.dropped} guest-caused log lines dropped before this]"
            self.dropped = 0
        return True
