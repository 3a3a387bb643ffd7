"""What the network did to one HTTP request, as a short phrase a user can act on.

Every reader that never raises (a gateway's status read, an engine's health
probe) says the same thing for the same failure: a refused connection means
nothing listens there; a timeout names the wait; anything else keeps the
library's type and words, so the cause is not lost.
"""

from __future__ import annotations

__all__ = ["describe_http_failure"]

DETAIL_CHARS = 80  # of the library's message: enough for errno and cause, short enough for a status row


def describe_http_failure(err: Exception, timeout_s: float) -> str:
    """``err`` (an ``httpx.HTTPError``, raised by a request with ``timeout_s``) in one short phrase."""
    import httpx  # noqa: PLC0415  (only when a request failed)

    detail = str(err)[:DETAIL_CHARS]
    if isinstance(err, httpx.TimeoutException):
        return f"no answer within {timeout_s:g} s"
    if isinstance(err, httpx.ConnectError):
        if "refused" in str(err).lower():
            return "connection refused: nothing listens there"
        return f"cannot connect ({detail})"
    return f"{type(err).__name__}: {detail}" if detail else type(err).__name__
