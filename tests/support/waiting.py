"""The one way tests wait: on state the code under test exposes (a gauge, a queue length, a flag), polled until it
holds, with a deadline that fails the test naming what never happened. Never a sleep that hopes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def until(check: Callable[[], T], what: str, timeout: float = 30.0, *, every: float = 0.02,
          stop: Callable[[], str | None] | None = None) -> T:
    """`check()`'s first truthy value, polled every `every` s for at most `timeout` s (AssertionError naming
    `what` after it); `stop()` returning a reason fails at once (the state can no longer come)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if stop is not None and (reason := stop()):
            raise AssertionError(f"{what}: {reason}")
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(every)
    return value
