"""Waiting for a set of worker threads with one deadline, as both pipelines do when they stop."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future

__all__ = ["finish_all"]

log = logging.getLogger(__name__)


def finish_all(futures: Iterable[Future], deadline_s: float, what: str) -> int:
    """Wait for every future until ``deadline_s`` (``time.monotonic()``); log and count those still running.

    The threads catch their own errors; an exception here is the timeout (or an error they let through).
    """
    late = 0
    for future in futures:
        try:
            future.result(timeout=max(0.1, deadline_s - time.monotonic()))
        except Exception:  # noqa: BLE001 - logged; a stop must go on with the others
            late += 1
            log.error("%s did not finish in time", what)
    return late
