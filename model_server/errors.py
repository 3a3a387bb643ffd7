"""Every exception model-server raises on purpose, drawn once (as httpx draws its own).

One base, so an application can catch everything model-server raises with one
``except``; one branch per part of the project::

    ModelServerError
    ├── ConfigError                  the fleet table (or an option overriding it) is wrong
    ├── LaunchError                  the launch pipeline cannot start or keep a server
    ├── ClientError                  the client could not serve a request
    │   ├── UnknownGroupError        no such group in the table (also a KeyError); lists the groups
    │   ├── InvalidRequestError      the arguments cannot make a request (also TypeError, ValueError):
    │   │                            no attempt spent; .argument
    │   ├── RequestRejectedError     the server says the request is wrong (400/404/413/422, 401/403):
    │   │                            never retried, never held against a replica; .status, .body, .replica
    │   ├── UnexpectedAnswerError    a well-formed answer that does not fit the request: not retried
    │   ├── GroupUnavailableError    the call's bounds are spent and no replica answered;
    │   │                            .attempts = ((replica, error, elapsed_s), ...)
    │   └── StreamInterruptedError   a stream broke after text arrived and was not resumed;
    │                                .text = what arrived, .why_not_resumed, .resumes
    ├── SimError                     the simulated engine cannot start (bad settings, port in use)
    └── BenchError                   a bench option, trace, dataset or fault spec is wrong

Every message is one paragraph that names the thing that is wrong and the fix;
the CLI prints it and exits with status 2. Library errors are converted in one
place per half (the client's in :mod:`model_server.client.retry`), always
``raise ... from err``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from model_server.client.retry import Attempt

__all__ = [
    "BenchError",
    "ClientError",
    "ConfigError",
    "GroupUnavailableError",
    "InvalidRequestError",
    "LaunchError",
    "ModelServerError",
    "RequestRejectedError",
    "SimError",
    "StreamInterruptedError",
    "UnexpectedAnswerError",
    "UnknownGroupError",
]


class ModelServerError(Exception):
    """Base of every error model-server raises on purpose."""


class ConfigError(ModelServerError, ValueError):
    """The fleet table (or an option that overrides it) is invalid."""


class LaunchError(ModelServerError):
    """The launch pipeline cannot start or keep a server."""


class SimError(ModelServerError):
    """The simulated engine cannot start (bad settings file, port in use, ...)."""


class BenchError(ModelServerError, ValueError):
    """A benchmark input (rate, lengths, dataset, trace, fault schedule) is invalid."""


class ClientError(ModelServerError):
    """The client could not serve a request."""


class UnknownGroupError(ClientError, KeyError):
    """The fleet table has no group of that name."""

    def __init__(self, group: str, known: Iterable[str], source: str = "the fleet table") -> None:
        self.group = group
        self.known = tuple(known)
        super().__init__(
            f"{source} has no group '{group}'. Its groups are: {', '.join(repr(g) for g in self.known) or 'none'}. "
            f'Ask for one of these, or add [[servers]] entries with group = "{group}".'
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
        lines = "; ".join(
            f"#{i + 1} {a.replica}: {a.error} after {a.elapsed_s:.2f}s" for i, a in enumerate(self.attempts)
        )
        super().__init__(
            f"group '{group}' is unavailable: {reason}. Attempts: {lines or 'none'}. "
            f"Check that its servers are up (`model-server probe --group {group}`); to wait longer for a fleet "
            f"that restarts, raise client.wait_for_replica_s (or client.max_retry) in the fleet table."
        )


class StreamInterruptedError(ClientError):
    """A stream broke after text arrived and was not resumed; ``text`` holds what was received.

    ``why_not_resumed`` says why no (further) resume was tried; ``resumes`` counts those done before.
    """

    def __init__(
        self, group: str, replica: str, text: str, cause: str, why_not_resumed: str = "", resumes: int = 0
    ) -> None:
        why = f" It was not resumed: {why_not_resumed}." if why_not_resumed else ""
        super().__init__(
            f"the stream from replica {replica} of group '{group}' broke after {len(text)} characters ({cause}).{why} "
            f"The text received so far is in .text; send the request again to get a whole answer."
        )
        self.group = group
        self.replica = replica
        self.text = text
        self.why_not_resumed = why_not_resumed
        self.resumes = resumes
