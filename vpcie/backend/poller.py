"""Adaptive busy polling: keep the event loop spinning for a while after
activity, so the next guest kick and the agent's reply are picked up without
the thread sleeping and being woken (a cross-CPU wake-up costs tens of µs in
a VM, more than the work itself).

This is what DPDK/SPDK vhost-user back-ends do, bounded: the loop spins only
for ``window`` seconds after the last kick, then sleeps in epoll as usual. It
costs a CPU while it spins, so it is off by default (``vpcie-backend
--poll-us N``); turn it on where latency matters and a core is free for it.
"""

from __future__ import annotations

import asyncio
import time

MAX_POLL_WINDOW_S = 0.01  # never spin for more than 10 ms after activity


class BusyPoller:
    def __init__(self, window_s: float, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not 0 <= window_s <= MAX_POLL_WINDOW_S:
            raise ValueError(f"poll window {window_s} s outside 0..{MAX_POLL_WINDOW_S} s")
        self.window_s = window_s
        self._loop = loop
        self._until = 0.0
        self._spinning = False
        self.spins = 0  # loop turns spent polling (status, tests)

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    @property
    def spinning(self) -> bool:
        """Inside a window: the loop is being kept hot now."""
        return self._spinning

    def touch(self) -> None:
        """Activity: keep the loop hot for another window."""
        if not self.window_s:
            return
        self._until = time.monotonic() + self.window_s
        if not self._spinning:
            self._spinning = True
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._step)

    def _step(self) -> None:
        # A ready callback makes the loop's next epoll_wait use timeout 0: it
        # polls every fd (kick eventfds, the agent sockets) and comes back here.
        if time.monotonic() < self._until:
            self.spins += 1
            (self._loop or asyncio.get_running_loop()).call_soon(self._step)
        else:
            self._spinning = False
