"""Retry policy, pure: which outcomes retry, how long to wait, how many attempts.

- Retried on another replica (and held against the one that failed): a
  connection error, a timeout, HTTP 408/409/429, any 5xx, and a malformed
  answer (a 200 whose body is not the expected JSON).
- Given back to the caller at once (and held against no replica): any other
  4xx, i.e. the server says the request itself is wrong (400, 404, 413, 422;
  also 401/403, a wrong API key, which no other replica of the fleet accepts
  either).
- Backoff between attempts: "full jitter" exponential, uniform in
  ``[0, min(max, initial x 2^(n-1))]`` after the n-th failure of a request.
- What bounds a whole call (attempts, the wait for a replica, a deadline) is
  :class:`model_server.client.request_plan.RequestState`.
"""

from __future__ import annotations

import asyncio
import json
import random
from enum import Enum
from typing import NamedTuple

import httpx
import openai

try:  # the openai SDK of this project's pin runs on httpx2; older ones on httpx
    import httpx2
except ImportError:  # pragma: no cover
    httpx2 = None  # type: ignore[assignment]

from model_server.common.backoff import jittered_backoff_s
from model_server.config import ClientPolicy
from model_server.errors import RequestRejectedError

__all__ = [
    "rejected_from",
    "Attempt",
    "DeadlineExceeded",
    "MalformedResponse",
    "ReplicaHTTPError",
    "StreamEventError",
    "OutcomeKind",
    "RETRY_STATUSES",
    "backoff_s",
    "classify",
    "describe",
    "is_retryable_status",
    "probe_timeout_s",
]

RETRY_STATUSES = frozenset({408, 409, 429})


class OutcomeKind(str, Enum):
    OK = "ok"
    REJECTED = "rejected"  # the request is wrong: to the caller, no replica blamed
    CONNECTION = "connection"
    TIMEOUT = "timeout"
    SERVER = "server"  # 5xx, 408, 409, 429
    MALFORMED = "malformed"

    @property
    def retryable(self) -> bool:
        return self not in (OutcomeKind.OK, OutcomeKind.REJECTED)


class Attempt(NamedTuple):
    """One try of a request (or one probe round), kept for the final error."""

    replica: str
    error: str
    elapsed_s: float


class MalformedResponse(Exception):
    """A 200 answer whose body is not what the route returns."""


class ReplicaHTTPError(Exception):
    """A replica answered with an HTTP error status (before any stream began)."""

    def __init__(self, status_code: int, body: object, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.body = body
        self.message = message


class StreamEventError(Exception):
    """A stream carried an error event (SGLang's ``data: {"error": {...}}``) after it began."""

    def __init__(self, code: object, message: str) -> None:
        super().__init__(f"error event in the stream (code {code}): {message}")
        self.code = code
        self.message = message
        self.status_code = code if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599 else None


class DeadlineExceeded(TimeoutError):
    """An attempt missed one of its own deadlines: the first token, a chunk after a stall, or the whole answer."""

    def __init__(self, phase: str, limit_s: float, replica: str = "") -> None:
        where = f" from {replica}" if replica else ""
        super().__init__(f"no {phase}{where} within {limit_s:.2f}s ({phase} deadline)")
        self.phase = phase
        self.limit_s = limit_s


def is_retryable_status(status: int) -> bool:
    return status >= 500 or status in RETRY_STATUSES


def _types(name: str) -> tuple[type[BaseException], ...]:
    found = [getattr(httpx, name)]
    if httpx2 is not None and hasattr(httpx2, name):
        found.append(getattr(httpx2, name))
    return tuple(found)


# asyncio.TimeoutError is the builtin TimeoutError only from Python 3.11 on (asyncio.wait_for raises it).
_TIMEOUTS = (openai.APITimeoutError, TimeoutError, asyncio.TimeoutError) + _types("TimeoutException")
_CONNECTION = (openai.APIConnectionError, ConnectionError) + _types("TransportError") + _types("StreamError")
_MALFORMED = (MalformedResponse, openai.APIResponseValidationError, json.JSONDecodeError, UnicodeDecodeError)


def classify(err: BaseException) -> OutcomeKind | None:
    """The outcome an exception raised by a request stands for; None if it is not a request failure (a bug)."""
    if isinstance(err, (openai.APIStatusError, ReplicaHTTPError)):
        return OutcomeKind.SERVER if is_retryable_status(err.status_code) else OutcomeKind.REJECTED
    if isinstance(err, StreamEventError):  # a 4xx code: the engine refused the request; else it broke the stream
        code = err.status_code
        return OutcomeKind.REJECTED if code is not None and not is_retryable_status(code) else OutcomeKind.SERVER
    if isinstance(err, httpx.HTTPStatusError) or (httpx2 is not None and isinstance(err, httpx2.HTTPStatusError)):
        status = err.response.status_code
        return OutcomeKind.SERVER if is_retryable_status(status) else OutcomeKind.REJECTED
    if isinstance(err, _MALFORMED):
        return OutcomeKind.MALFORMED
    if isinstance(err, _TIMEOUTS):
        return OutcomeKind.TIMEOUT
    if isinstance(err, _CONNECTION):
        return OutcomeKind.CONNECTION
    return None


def describe(err: BaseException) -> str:
    """A one-line description of a failure for logs and the final error (never the API key)."""
    if isinstance(err, (openai.APIStatusError, ReplicaHTTPError)):
        return f"HTTP {err.status_code}: {str(err.message)[:200]}"
    if isinstance(err, (DeadlineExceeded, StreamEventError)):
        return f"{'timeout' if isinstance(err, DeadlineExceeded) else 'server error'}: {err}"[:300]
    kind = classify(err)
    label = {OutcomeKind.TIMEOUT: "timeout", OutcomeKind.CONNECTION: "connection error"}.get(kind, type(err).__name__)
    cause = err.__cause__ or err.__context__
    detail = str(err) or type(err).__name__
    if cause is not None and str(cause):
        detail = f"{detail} ({type(cause).__name__}: {cause})"
    return f"{label}: {detail}"[:300]


def backoff_s(failures: int, policy: ClientPolicy, rng: random.Random) -> float:
    """Full-jitter exponential backoff after the ``failures``-th failure of a request (seconds)."""
    return jittered_backoff_s(
        failures, policy.retry_backoff_initial_ms / 1000.0, policy.retry_backoff_max_ms / 1000.0, rng.random
    )


def probe_timeout_s(bound_s: float, policy: ClientPolicy) -> float:
    """A probe must answer within the bound itself (never beyond the ceiling)."""
    return min(bound_s, policy.request_timeout_ceiling_s)


def rejected_from(err: BaseException, replica: str) -> RequestRejectedError:
    """The caller-facing error for a request the server refused (a non-retryable 4xx)."""
    status = getattr(err, "status_code", None)
    if status is None:
        response = getattr(err, "response", None)
        status = getattr(response, "status_code", None)
    body = getattr(err, "body", None)
    detail = getattr(err, "message", None) or str(err)
    hint = "Fix the request (its parameters, model name or size)."
    if status in (401, 403):
        hint = "The API key is wrong or missing: export the variable named by api_key_env in the fleet table."
    return RequestRejectedError(
        f"replica {replica} rejected the request with HTTP {status}: {str(detail)[:300]}. {hint}",
        status=status,
        body=body,
        replica=replica,
    )
