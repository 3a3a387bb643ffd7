"""Fault injection: what is switched on, and the pure decision for one request.

`Faults` is a frozen value; the app swaps it whole when /sim/faults changes it.
`decide` maps (faults, the request's number since crash_after was armed, stream
or not, a seeded random source) to one `ReplyFault`; the app carries it out.
Draws happen only for rates above zero, so a seeded run is reproducible and an
engine with no faults makes no draws at all.

The token faults (``stall_after_tokens``, ``crash_after_tokens``,
``hang_before_first_token``) are no per-request draw: they are read live while
requests make tokens (streaming.py, engine.hold_unstreamed), so lifting one
wakes the requests it holds.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["FaultError", "Faults", "ReplyFault", "decide"]


class FaultError(ValueError):
    """A fault setting is invalid (bad name or value); the message says which and why."""


class ReplyFault(enum.Enum):
    """What an injected fault does to one model request (the app carries it out)."""

    PROCEED = "proceed"  # no fault: answer as usual
    CRASH = "crash"  # os._exit: the process is gone
    HANG = "hang"  # accept, never answer
    ERROR = "error"  # answer error_status in SGLang's error shape for the route
    MALFORMED = "malformed"  # a 200 whose body is not valid JSON
    DROP_STREAM = "drop_stream"  # cut the connection after the first chunk with text


def _is_probability(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value <= 1.0


def _is_error_status(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 400 <= value <= 599


def _is_positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _is_count_at_least(low: int) -> Callable[[Any], bool]:
    def ok(value: Any) -> bool:
        return value is None or (not isinstance(value, bool) and isinstance(value, int) and value >= low)

    return ok


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _unchanged(value: Any) -> Any:
    return value


# Every field of Faults: (does a JSON value fit, what it must be (for the message), how it is stored).
_RULES: dict[str, tuple[Callable[[Any], bool], str, Callable[[Any], Any]]] = {
    "error_rate": (_is_probability, "a number between 0 and 1", float),
    "error_status": (_is_error_status, "an HTTP error status 400-599", _unchanged),
    "hang": (_is_bool, "true or false", _unchanged),
    "slow_factor": (_is_positive_number, "a number > 0", float),
    "crash_after": (_is_count_at_least(1), "an integer >= 1 or null", _unchanged),
    "malformed_rate": (_is_probability, "a number between 0 and 1", float),
    "drop_stream_rate": (_is_probability, "a number between 0 and 1", float),
    "stall_after_tokens": (_is_count_at_least(0), "an integer >= 0 or null", _unchanged),
    "crash_after_tokens": (_is_count_at_least(0), "an integer >= 0 or null", _unchanged),
    "hang_before_first_token": (_is_bool, "true or false", _unchanged),
}


def _validate(name: str, value: Any) -> Any:
    rule = _RULES.get(name)
    if rule is None:
        raise FaultError(f"unknown fault {name!r}; known: {', '.join(Faults.names())}")
    fits, what, stored = rule
    if not fits(value):
        raise FaultError(f"{name} must be {what}, got {value!r}")
    return stored(value)


@dataclass(frozen=True)
class Faults:
    """The faults switched on. All off by default."""

    error_rate: float = 0.0
    error_status: int = 500
    hang: bool = False
    slow_factor: float = 1.0
    crash_after: int | None = None  # crash on the N-th model request since it was set
    malformed_rate: float = 0.0
    drop_stream_rate: float = 0.0
    # Token faults, read live while a request runs (see streaming.py):
    stall_after_tokens: int | None = None  # a stream sends K tokens, then nothing; longer unstreamed replies never come
    crash_after_tokens: int | None = None  # os._exit once a stream has sent K tokens
    hang_before_first_token: bool = False  # headers go out, no token ever does; unstreamed requests never answer

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_settings(cls, settings: Any) -> Faults:
        """The faults given as start flags (any object with attributes of the same names)."""
        return cls().updated({name: getattr(settings, name) for name in cls.names()})

    def updated(self, changes: Mapping[str, Any]) -> Faults:
        """A copy with `changes` applied; FaultError names the first bad key or value."""
        if not isinstance(changes, Mapping):
            raise FaultError(f"faults must be a JSON object of name: value, got {type(changes).__name__}")
        clean = {str(name): _validate(str(name), value) for name, value in changes.items()}
        return dataclasses.replace(self, **clean)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def decide(faults: Faults, *, request_number: int, stream: bool, rng: random.Random) -> ReplyFault:
    """The fault (if any) that hits one model request.

    `request_number` counts model requests (1-based) since crash_after was set.
    Order: crash, hang, error, then malformed (any answer) or dropped stream.
    """
    if faults.crash_after is not None and request_number >= faults.crash_after:
        return ReplyFault.CRASH
    if faults.hang:
        return ReplyFault.HANG
    if faults.error_rate > 0 and rng.random() < faults.error_rate:
        return ReplyFault.ERROR
    if faults.malformed_rate > 0 and rng.random() < faults.malformed_rate:
        return ReplyFault.MALFORMED
    if stream and faults.drop_stream_rate > 0 and rng.random() < faults.drop_stream_rate:
        return ReplyFault.DROP_STREAM
    return ReplyFault.PROCEED
