"""A server's life as an explicit state machine, and the pure restart decisions.

::

    WAITING_GPU -> STARTING -> READY
         ^            |  ^       |   (exit, hang, startup timeout)
         |            v  |       v
         +-------- RESTARTING <--+ ---- too many restarts in the window --> FAILED
    any state but FAILED/STOPPED -- stop --> STOPPED;  refused (port, memory) --> FAILED
    READY -- drain --> DRAINING -- no request left, or the drain timeout --> STOPPED or RESTARTING
                          |  undrain --> READY;  exit --> RESTARTING

DRAINING is asked for through the control API (control_api.py): the engine
keeps running the requests it has and is published as DRAINING so clients route
around it.

Everything here is a function of (state, event, now): no clock, no sleep, no
random source of its own, so it is tested in microseconds. The phases between
these states (GPU wait, port wait, startup, watching, backoff) and their
deadlines are the supervisor's step, in :mod:`model_server.launcher.steps`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from model_server.common.backoff import jittered_backoff_s

__all__ = [
    "FailureDecision",
    "RestartHistory",
    "ServerState",
    "can_transition",
    "decide_after_failure",
    "transition",
]


class ServerState(str, enum.Enum):
    WAITING_GPU = "WAITING_GPU"
    STARTING = "STARTING"
    READY = "READY"
    DRAINING = "DRAINING"
    RESTARTING = "RESTARTING"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


S = ServerState

_ALLOWED: dict[ServerState, frozenset[ServerState]] = {
    S.WAITING_GPU: frozenset({S.STARTING, S.FAILED, S.STOPPED}),
    S.STARTING: frozenset({S.READY, S.RESTARTING, S.FAILED, S.STOPPED}),
    S.READY: frozenset({S.DRAINING, S.RESTARTING, S.FAILED, S.STOPPED}),
    S.DRAINING: frozenset({S.READY, S.RESTARTING, S.FAILED, S.STOPPED}),
    S.RESTARTING: frozenset({S.WAITING_GPU, S.STARTING, S.FAILED, S.STOPPED}),
    S.FAILED: frozenset(),
    S.STOPPED: frozenset(),
}


def can_transition(current: ServerState | None, new: ServerState) -> bool:
    """Whether ``current -> new`` is a legal step (None: a server not started yet)."""
    if current is None:
        return new in (S.WAITING_GPU, S.STARTING, S.FAILED, S.STOPPED)
    return new in _ALLOWED[current]


def transition(current: ServerState | None, new: ServerState) -> ServerState:
    """``new`` if the step is legal, else ValueError (a supervisor bug, never user input)."""
    if not can_transition(current, new):
        raise ValueError(f"illegal server state transition {current} -> {new}")
    return new


@dataclass(frozen=True)
class RestartHistory:
    """Monotonic times of the restarts so far (never mutated: ``record`` returns a new one)."""

    times: tuple[float, ...] = ()

    def within(self, now: float, window_s: float) -> tuple[float, ...]:
        return tuple(t for t in self.times if now - t <= window_s)

    def record(self, now: float) -> RestartHistory:
        return RestartHistory((*self.times, now))

    @property
    def total(self) -> int:
        return len(self.times)


@dataclass(frozen=True)
class FailureDecision:
    """What to do after a crash or hang: restart after ``delay_s``, or give up (FAILED, ``reason``)."""

    restart: bool
    history: RestartHistory
    delay_s: float = 0.0
    reason: str = ""
    attempt: int = field(default=0)


def decide_after_failure(
    history: RestartHistory,
    now: float,
    *,
    cause: str,
    max_restarts: int,
    window_s: float,
    backoff_initial_s: float,
    backoff_max_s: float,
    rand: Callable[[], float],
    label: str = "crash loop",
    fix: str = "Read its log, fix the cause, start the pipeline again",
) -> FailureDecision:
    """Restart (with backoff), unless this restart would be more than ``max_restarts`` in ``window_s``.

    The backoff attempt number counts the restarts inside the window, so a
    server that was healthy for a long time starts again from the short delay.
    A start refused for want of its port is a failure too (``label`` and
    ``fix`` then say so): it waits inside the same budget with the same backoff.
    """
    recent = history.within(now, window_s)
    if len(recent) + 1 > max_restarts:
        return FailureDecision(
            restart=False,
            history=history,
            reason=(
                f"{label}: {cause}; it needed {len(recent) + 1} restarts within {window_s:g} s and "
                f"launch.max_restarts is {max_restarts}. {fix}"
            ),
        )
    attempt = len(recent) + 1
    delay = jittered_backoff_s(attempt, backoff_initial_s, backoff_max_s, rand, floor_share=0.5)
    return FailureDecision(restart=True, history=history.record(now), delay_s=delay, attempt=attempt)
