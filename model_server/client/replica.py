"""One replica's live state, as the client sees it (pure: no I/O, clock passed in).

Latency is smoothed (EWMA) and, for completions, normalised per output token,
so that a 1-token probe and a 256-token reply can be compared with the same
yardstick. The first real reply replaces the probe's seed instead of blending
with it (a probe is mostly time-to-first-token, a reply mostly decoding).

*Degraded* means "much slower than this replica itself was": the smoothed
latency grew past ``degraded_factor`` x the best smoothed latency it has shown
since the last probe. A degraded replica is routed to only when nothing better
is left, and the group is re-probed.

An :class:`Endpoint` is not locked on its own: its :class:`~model_server.client.replica_group.ReplicaGroup`
mutates it under the group's lock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from model_server.client.breaker import Breaker, BreakerState
from model_server.config import ServerSpec

__all__ = ["Endpoint", "EndpointSnapshot"]


@dataclass(frozen=True)
class EndpointSnapshot:
    """A read-only copy of an endpoint's state, for stats, tables and tests."""

    name: str
    address: str
    breaker: BreakerState
    latency_s: float | None
    baseline_s: float | None
    in_flight: int
    consecutive_failures: int
    degraded: bool
    attempts: int
    successes: int
    failures: int
    rejected: int
    last_error: str | None
    timeouts: int = 0  # attempts whose deadline fired here


class Endpoint:
    """Live state of one replica: latency EWMA, in-flight count, failures, breaker, degraded flag."""

    def __init__(self, spec: ServerSpec, *, breaker: Breaker, ewma_alpha: float, degraded_factor: float) -> None:
        if not 0 < ewma_alpha <= 1:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {ewma_alpha}")
        self.spec = spec
        self.breaker = breaker
        self.ewma_alpha = ewma_alpha
        self.degraded_factor = degraded_factor
        self.latency_s: float | None = None  # smoothed, per output token for completions
        self.baseline_s: float | None = None  # lowest smoothed latency from real replies since the last probe
        self.from_probe = True  # latency_s is still the probe's seed
        self.probe_latency_s: float | None = None  # the last probe's latency (per token for completions)
        self.in_flight = 0
        self.waiting: dict[int, float] = {}  # lease token -> send time, for requests with no first token yet
        self.degraded = False
        self.attempts = 0
        self.successes = 0
        self.failures = 0
        self.rejected = 0
        self.timeouts = 0
        self.last_error: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def consecutive_failures(self) -> int:
        return self.breaker.consecutive_failures

    def available(self, now: float) -> bool:
        return self.breaker.allows(now)

    def stuck(self, now: float, after_s: float) -> bool:
        """Some request sent here has waited longer than ``after_s`` for its first token."""
        return any(now - t > after_s for t in self.waiting.values())

    @property
    def answered(self) -> bool:
        """The replica has answered a probe or a request since the client started."""
        return self.latency_s is not None

    def score_latency_s(self, probe_scale: float = 1.0) -> float:
        """The latency routing compares: unknown is worst.

        A replica known only from its probe is scaled by ``probe_scale`` (what
        real replies cost relative to probes on the replicas that had both),
        so that it competes fairly with replicas that have served traffic.
        """
        if self.latency_s is None:
            return math.inf
        return self.latency_s * probe_scale if self.from_probe else self.latency_s

    @property
    def reply_to_probe_ratio(self) -> float | None:
        """Smoothed reply latency / probe latency, once the replica has both."""
        if self.from_probe or not self.latency_s or not self.probe_latency_s:
            return None
        return self.latency_s / self.probe_latency_s

    # ---- request lifecycle -----------------------------------------------------------

    def start(self, now: float, token: int = 0) -> BreakerState:
        """A request is sent: count it, take the half-open trial if due. Returns the old breaker state."""
        old = self.breaker.state
        self.breaker = self.breaker.acquire(now)
        self.in_flight += 1
        self.attempts += 1
        self.waiting[token] = now
        return old

    def first_token(self, token: int) -> None:
        """The request ``token`` is answering: it no longer counts as waiting."""
        self.waiting.pop(token, None)

    def succeed(
        self, now: float, elapsed_s: float, output_tokens: int | None, *, trial: bool = False, token: int = 0
    ) -> bool:
        """The replica answered (``trial``: as the half-open trial). True if this reply made it newly degraded."""
        self._finish(token)
        self.breaker = self.breaker.success(now, trial)
        self.successes += 1
        sample = elapsed_s / max(1, output_tokens) if output_tokens is not None else elapsed_s
        if self.latency_s is None or self.from_probe:
            self.latency_s = sample
            self.from_probe = False
        else:
            self.latency_s += self.ewma_alpha * (sample - self.latency_s)
        if self.baseline_s is None or self.latency_s < self.baseline_s:
            self.baseline_s = self.latency_s
        was = self.degraded
        self.degraded = self.latency_s > self.degraded_factor * self.baseline_s
        return self.degraded and not was

    def reject(self, now: float, *, trial: bool = False, token: int = 0) -> None:
        """The replica answered that the request itself is wrong: not its fault."""
        self._finish(token)
        self.breaker = self.breaker.success(now, trial)
        self.rejected += 1

    def fail(self, now: float, error: str, *, trial: bool = False, token: int = 0) -> None:
        """Connection error, timeout, 5xx, 429 or malformed answer: held against the replica."""
        self._finish(token)
        self.breaker = self.breaker.failure(now, trial)
        self.failures += 1
        self.last_error = error
        if error.startswith("timeout"):
            self.timeouts += 1

    def cancel(self, now: float, *, trial: bool = False, token: int = 0) -> None:
        """The request ended without an outcome (the caller went away)."""
        self._finish(token)
        self.breaker = self.breaker.release(now, trial)

    def _finish(self, token: int) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.waiting.pop(token, None)

    # ---- probes ----------------------------------------------------------------------

    def probe_ok(self, now: float, elapsed_s: float, output_tokens: int | None) -> None:
        """A probe answered: re-seed the latency, forget degradation, close the breaker."""
        self.latency_s = elapsed_s / max(1, output_tokens) if output_tokens is not None else elapsed_s
        self.probe_latency_s = self.latency_s
        self.from_probe = True
        self.baseline_s = None
        self.degraded = False
        self.breaker = self.breaker.reset(now)

    def probe_failed(self, now: float, error: str) -> None:
        """A probe got no good answer within the bound: counts as a failure."""
        self.last_error = error
        if self.breaker.state is BreakerState.HALF_OPEN and self.breaker.trial_in_flight:
            return  # a trial request is deciding already
        # Half-open with no trial in flight: the probe is the trial, and it failed.
        self.breaker = self.breaker.failure(now, trial=self.breaker.state is BreakerState.HALF_OPEN)

    def snapshot(self) -> EndpointSnapshot:
        return EndpointSnapshot(
            name=self.name,
            address=self.spec.address,
            breaker=self.breaker.state,
            latency_s=self.latency_s,
            baseline_s=self.baseline_s,
            in_flight=self.in_flight,
            consecutive_failures=self.consecutive_failures,
            degraded=self.degraded,
            attempts=self.attempts,
            successes=self.successes,
            failures=self.failures,
            rejected=self.rejected,
            last_error=self.last_error,
            timeouts=self.timeouts,
        )
