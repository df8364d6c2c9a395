"""The tests' own waiting helpers (tests/conftest.py): they return what the
condition returned, and fail saying what did not happen."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import until, wait_for


def test_wait_for_returns_the_first_truthy_value() -> None:
    calls = iter([0, None, [], "ready"])
    assert wait_for(lambda: next(calls), 5, "never") == "ready"


def test_wait_for_fails_on_the_deadline_saying_what() -> None:
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"not within 0\.05 s: the flag was never set"):
        wait_for(lambda: False, 0.05, lambda: "the flag was never set")
    assert 0.05 <= time.monotonic() - t0 < 2.0


async def test_until_lets_the_loop_run_between_polls() -> None:
    flag: list[int] = []
    asyncio.get_running_loop().call_later(0.02, flag.append, 1)
    assert await until(lambda: flag, 5, "the callback never ran") == [1]
    with pytest.raises(AssertionError, match=r"not within 0\.02 s: nothing"):
        await until(lambda: 0, 0.02, "nothing")
