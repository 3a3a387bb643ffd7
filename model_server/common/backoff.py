"""Capped exponential backoff with jitter, shared by the client and the launcher.

A request's retries use full jitter (``floor_share=0``: anywhere in [0, cap]),
which spreads the retries of many callers best; a server's restarts keep at
least half the delay (``floor_share=0.5``), so a crash loop never restarts at
once, yet replicas that crashed together do not come back in lockstep.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["jittered_backoff_s"]


def jittered_backoff_s(
    attempt: int, initial_s: float, max_s: float, rand: Callable[[], float], floor_share: float = 0.0
) -> float:
    """Delay before ``attempt`` (1-based): initial x 2^(attempt-1), capped at max_s, times a share in [floor_share, 1).

    ``rand`` returns a float in [0, 1) (``random.random``), so tests can pin it.
    """
    if attempt <= 0:
        return 0.0
    cap_s = min(max_s, initial_s * 2.0 ** min(attempt - 1, 60))
    return cap_s * (floor_share + (1.0 - floor_share) * rand())
