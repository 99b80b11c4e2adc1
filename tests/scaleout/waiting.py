"""Bounded waits for the scale-out tests: poll a condition with a deadline, never sleep a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

WAIT_S = 120  # a condition on a 2-core machine running a Ray cluster
POLL_S = 0.05

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], *, message: str, timeout: float = WAIT_S) -> T:
    """Poll `predicate` until it returns something truthy and return that.

    Raises TimeoutError carrying `message` (what never happened) after `timeout` seconds; an
    exception from `predicate` propagates at once, so it can fail fast on a dead process.
    """
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} (waited {timeout:g} s)")
        time.sleep(POLL_S)
    return value
