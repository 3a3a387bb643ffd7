"""The one way tests wait: poll a condition until it holds, and fail at a deadline with what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout_s: float = 30.0,
    what: str | Callable[[], str] = "condition",
    interval_s: float = 0.02,
) -> T:
    """``condition()``'s first truthy value; AssertionError naming ``what`` once ``timeout_s`` has passed.

    ``what`` may be a function: it is called at the deadline, to show the state that was not reached.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what() if callable(what) else what}")
        time.sleep(interval_s)
