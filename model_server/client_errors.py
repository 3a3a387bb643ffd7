"""The client's exceptions (the tree is drawn in :mod:`model_server.client`).

Every error the client raises on purpose is built here, from the library
error that caused it, by :func:`rejected_from`; callers ``raise ... from err``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from model_server.errors import ClientError
from model_server.retry import Attempt

__all__ = [
    "ClientError",
    "GroupUnavailableError",
    "InvalidRequestError",
    "RequestRejectedError",
    "StreamInterruptedError",
    "UnexpectedAnswerError",
    "UnknownGroupError",
    "rejected_from",
]


class UnknownGroupError(ClientError, KeyError):
    """The fleet table has no group of that name."""

    def __init__(self, group: str, known: Iterable[str], source: str = "the fleet table") -> None:
        self.group = group
        self.known = tuple(known)
        super().__init__(
            f"{source} has no group '{group}'. Its groups are: {', '.join(repr(g) for g in self.known) or 'none'}. "
            f"Ask for one of these, or add [[servers]] entries with group = \"{group}\"."
        )

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InvalidRequestError(ClientError, TypeError, ValueError):
    """The caller's arguments cannot make a request (unknown keyword, NaN, not JSON, ...): no attempt was spent.

    Also a TypeError and a ValueError, the errors Python itself raises for bad arguments.
    """

    def __init__(self, message: str, *, argument: str | None = None) -> None:
        self.argument = argument
        super().__init__(message)


class UnexpectedAnswerError(ClientError):
    """A replica gave a well-formed answer that does not fit the request (e.g. the wrong number of vectors).

    Not held against the replica, not retried: the mismatch is between the request and the answer.
    """


class RequestRejectedError(ClientError):
    """The server says the request itself is wrong (400, 404, 413, 422, ...): not retried, no replica blamed."""

    def __init__(self, message: str, *, status: int | None, body: object = None, replica: str | None = None) -> None:
        self.status = status
        self.body = body
        self.replica = replica
        super().__init__(message)


class GroupUnavailableError(ClientError):
    """Every attempt failed: no replica of the group answered within the retry budget."""

    def __init__(self, group: str, attempts: Sequence[Attempt], reason: str) -> None:
        self.group = group
        self.attempts: tuple[Attempt, ...] = tuple(attempts)
        lines = "; ".join(f"#{i + 1} {a.replica}: {a.error} after {a.elapsed_s:.2f}s" for i, a in enumerate(self.attempts))
        super().__init__(
            f"group '{group}' is unavailable: {reason}. Attempts: {lines or 'none'}. "
            f"Check that its servers are up (`model-server probe --group {group}`); to wait longer for a fleet "
            f"that restarts, raise client.wait_for_replica_s (or client.max_retry) in the fleet table."
        )


class StreamInterruptedError(ClientError):
    """A stream broke after text arrived and was not resumed; ``text`` holds what was received.

    ``why_not_resumed`` says why no (further) resume was tried; ``resumes`` counts those done before.
    """

    def __init__(self, group: str, replica: str, text: str, cause: str, why_not_resumed: str = "", resumes: int = 0) -> None:
        self.group = group
        self.replica = replica
        self.text = text
        self.why_not_resumed = why_not_resumed
        self.resumes = resumes
        why = f" It was not resumed: {why_not_resumed}." if why_not_resumed else ""
        super().__init__(
            f"the stream from replica {replica} of group '{group}' broke after {len(text)} characters ({cause}).{why} "
            f"The text received so far is in .text; send the request again to get a whole answer."
        )


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
