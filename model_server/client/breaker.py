"""A circuit breaker per replica: a pure state machine, the clock passed in.

    CLOSED --(breaker_failures failures in a row)--> OPEN
    OPEN --(breaker_cooldown_s elapsed, one request let through)--> HALF_OPEN
    HALF_OPEN --(the trial succeeds)--> CLOSED
    HALF_OPEN --(the trial fails)--> OPEN (the cooldown starts again)

A :class:`Breaker` never mutates: every event returns the next breaker, and
every transition is made in :meth:`Breaker._on`, so the diagram above is the
whole behaviour. While HALF_OPEN exactly one trial request is in flight; the
others see the replica as unavailable until the trial's outcome is known.

Only the trial moves a breaker that is not CLOSED: the outcome of a request
sent before the breaker opened (``trial=False``) is counted but neither
closes the breaker (a late success proves nothing about the replica now),
nor frees the trial slot (a late cancel), nor restarts the cooldown (a late
failure). The caller remembers whether its acquire took the trial
(:attr:`Breaker.takes_trial` just before :meth:`Breaker.acquire`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

__all__ = ["Breaker", "BreakerEvent", "BreakerState"]


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerEvent(str, Enum):
    ACQUIRE = "acquire"  # a request is about to be sent to the replica
    SUCCESS = "success"  # the replica answered (a rejected request counts: it answered)
    FAILURE = "failure"  # connection error, timeout, 5xx, 429, malformed answer
    RELEASE = "release"  # the request ended without telling anything (cancelled)
    RESET = "reset"  # a probe found the replica answering: start afresh


@dataclass(frozen=True)
class Breaker:
    failures_to_open: int = 5
    cooldown_s: float = 30.0
    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    opened_at: float | None = None  # monotonic time of the last transition to OPEN
    trial_in_flight: bool = False

    def __post_init__(self) -> None:
        if self.failures_to_open < 1:
            raise ValueError(f"failures_to_open must be >= 1, got {self.failures_to_open}")
        if self.cooldown_s <= 0:
            raise ValueError(f"cooldown_s must be > 0, got {self.cooldown_s}")

    # ---- queries -------------------------------------------------------------------

    def allows(self, now: float) -> bool:
        """Whether a request may be sent now (without changing anything)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return self.opened_at is None or now - self.opened_at >= self.cooldown_s
        return not self.trial_in_flight  # HALF_OPEN: one trial at a time

    @property
    def takes_trial(self) -> bool:
        """Whether an acquire now would be the half-open trial (ask before acquire())."""
        return self.state is not BreakerState.CLOSED

    def retry_in_s(self, now: float) -> float:
        """Seconds until an OPEN breaker lets a trial through (0 if it already does)."""
        if self.state is not BreakerState.OPEN or self.opened_at is None:
            return 0.0
        return max(0.0, self.cooldown_s - (now - self.opened_at))

    # ---- events --------------------------------------------------------------------

    def acquire(self, now: float) -> Breaker:
        return self._on(BreakerEvent.ACQUIRE, now)

    def success(self, now: float, trial: bool = False) -> Breaker:
        return self._on(BreakerEvent.SUCCESS, now, trial)

    def failure(self, now: float, trial: bool = False) -> Breaker:
        return self._on(BreakerEvent.FAILURE, now, trial)

    def release(self, now: float, trial: bool = False) -> Breaker:
        return self._on(BreakerEvent.RELEASE, now, trial)

    def reset(self, now: float) -> Breaker:
        return self._on(BreakerEvent.RESET, now)

    def _on(self, event: BreakerEvent, now: float, trial: bool = False) -> Breaker:
        """Every transition of the machine, in one place (``trial``: the event is the half-open trial's outcome)."""
        s = self.state
        stale = s is not BreakerState.CLOSED and not trial  # a request sent before the breaker opened
        if event is BreakerEvent.RESET:
            return replace(
                self, state=BreakerState.CLOSED, consecutive_failures=0, opened_at=None, trial_in_flight=False
            )
        if event is BreakerEvent.ACQUIRE:
            if not self.allows(now):
                raise RuntimeError(f"breaker is {s.value}: check allows() before acquire()")
            if s is BreakerState.OPEN:
                return replace(self, state=BreakerState.HALF_OPEN, trial_in_flight=True)
            if s is BreakerState.HALF_OPEN:
                return replace(self, trial_in_flight=True)
            return self
        if event is BreakerEvent.SUCCESS:
            if stale:
                return self  # proves nothing about the replica now: only the trial closes the breaker
            return replace(
                self, state=BreakerState.CLOSED, consecutive_failures=0, opened_at=None, trial_in_flight=False
            )
        if event is BreakerEvent.FAILURE:
            failures = self.consecutive_failures + 1
            if stale:  # count it, keep the cooldown (and any trial) running
                return replace(self, consecutive_failures=failures)
            if s is not BreakerState.CLOSED or failures >= self.failures_to_open:  # the trial failed, or too many
                return replace(
                    self, state=BreakerState.OPEN, consecutive_failures=failures, opened_at=now, trial_in_flight=False
                )
            return replace(self, consecutive_failures=failures)  # CLOSED, below the threshold
        # RELEASE: a half-open trial that told nothing lets the next request be the trial.
        return self if stale or s is BreakerState.CLOSED else replace(self, trial_in_flight=False)
