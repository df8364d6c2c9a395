"""GuestLogBudget: guest-caused log lines are capped; errors and the
operator's lines always pass; the next line that passes says what was dropped."""

from __future__ import annotations

import logging

from vpcie.backend.logbudget import GuestLogBudget


def record(name: str, level: int = logging.INFO, msg: str = "m") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_budget_burst_refill_and_the_drop_count() -> None:
    now = [0.0]
    budget = GuestLogBudget(rate=10, burst=5, clock=lambda: now[0])
    passed = [budget.filter(record("vpcie.gpu.device")) for _ in range(8)]
    assert passed == [True] * 5 + [False] * 3
    assert budget.filter(record("vpcie.virtqueue.device", logging.WARNING)) is False  # a child
    # Errors and lines from loggers a guest cannot drive always pass.
    assert budget.filter(record("vpcie.gpu.device", logging.ERROR))
    assert budget.filter(record("vpcie.control.server"))
    assert budget.filter(record("vpcie.backend"))
    now[0] = 0.15  # 1.5 tokens back
    first = record("vpcie.gpu.device", msg="refused %s")
    assert budget.filter(first)
    assert first.msg == "refused %s [4 guest-caused log lines dropped before this]"
    assert not budget.filter(record("vpcie.gpu.device"))
    assert budget.dropped_total == 5
