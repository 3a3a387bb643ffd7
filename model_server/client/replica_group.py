"""The replicas of one group and their shared, locked state (no I/O).

Every thread (or task) of a ModelServer asks a :class:`ReplicaGroup` for a
replica (:meth:`acquire`), sends its request without holding any lock, then
reports the outcome (:meth:`release`). Probe results arrive the same way
(:meth:`apply_probes`). The lock is held only for these few assignments; the
log lines they cause (one per breaker change, degradation) are written after
it is released.
"""

from __future__ import annotations

import itertools
import logging
import random
import statistics
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from model_server.client.breaker import Breaker, BreakerState
from model_server.client.control_view import ControlView
from model_server.client.deadlines import AttemptDeadlines, StreamTiming, attempt_deadlines
from model_server.client.replica import Endpoint, EndpointSnapshot
from model_server.client.retry import OutcomeKind, probe_timeout_s
from model_server.client.routing import Candidate, choose
from model_server.config import ClientPolicy, ServerKind, ServerSpec

__all__ = ["Lease", "ProbeResult", "ReplicaGroup"]

log = logging.getLogger("model_server.client")

PROBE_WAIT_SLACK_S = 2.0  # a probe round's bookkeeping beyond its timeouts
BOUND_HEADROOM = 2.0  # after a round that found replicas: bound = this x the fastest probe (at least the initial bound)
STUCK_SHARE = 0.5  # a request waiting for its first token past this share of its deadline marks the replica stuck

_tokens = itertools.count(1)


@dataclass(frozen=True)
class Lease:
    """One request's hold on a replica, from acquire to release."""

    group: str
    spec: ServerSpec
    started_s: float
    trial: bool = False  # this request is the replica's half-open trial: only its outcome moves the breaker
    token: int = field(default_factory=lambda: next(_tokens), compare=False)


@dataclass(frozen=True)
class ProbeResult:
    spec: ServerSpec
    latency_s: float | None  # None: no good answer within the bound
    output_tokens: int | None = None
    error: str | None = None
    timed_out: bool = False  # no answer within the bound (as opposed to a refusal or an error answer)
    # The replica answered, but refused the probe itself (400/401/404/...): it is up, and the
    # caller's real request will get the same refusal as a RequestRejectedError with its reason.
    rejected: str | None = None
    # The round ended before this probe did (another replica had answered): nothing is known of it.
    pending: bool = False

    @property
    def ok(self) -> bool:
        """The replica is up and answered within the bound (perhaps refusing the probe)."""
        return self.latency_s is not None

    @property
    def usable(self) -> bool:
        """Up, in time, and the probe itself was served."""
        return self.latency_s is not None and self.rejected is None


class ReplicaGroup:
    """Replicas of one group: routing, outcomes, breakers, the latency bound, the rebuild bookkeeping."""

    def __init__(
        self,
        name: str,
        specs: Sequence[ServerSpec],
        policy: ClientPolicy,
        *,
        clock: Callable[[], float],
        view: ControlView | None = None,
    ) -> None:
        """``view``: what the pipelines' control APIs say of the replicas (None: the client's probes alone)."""
        if not specs:
            raise ValueError(f"group '{name}' has no servers")
        self.name = name
        self.kind = specs[0].kind
        self.policy = policy
        self._clock = clock
        self._view = view
        self._lock = threading.Lock()
        self._endpoints = {
            s.name: Endpoint(
                s,
                breaker=Breaker(policy.breaker_failures, policy.breaker_cooldown_s),
                ewma_alpha=policy.latency_ewma_alpha,
                degraded_factor=policy.degraded_latency_factor,
            )
            for s in specs
        }
        self.bound_s = policy.initial_latency_s
        self.timing = StreamTiming()
        self.built = False
        self.probe_rounds = 0  # completed probe rounds: lets waiting threads see that one finished
        self.last_round_found = False
        self.last_round_summary = "no probe round yet"
        self.reprobe_running = False
        self.last_reprobe_s: float | None = None
        self._probed_at_once: frozenset[str] = frozenset()  # heard READY again: their at-once re-probe was asked

    @property
    def per_token(self) -> bool:
        return self.kind is ServerKind.completion

    @property
    def size(self) -> int:
        return len(self._endpoints)

    @property
    def specs(self) -> tuple[ServerSpec, ...]:
        return tuple(e.spec for e in self._endpoints.values())

    # ---- requests ----------------------------------------------------------------------

    def acquire(self, rng: random.Random, tried: Iterable[str] = ()) -> Lease | None:
        """The replica for the next attempt (its in-flight count taken), or None if no breaker lets one through."""
        now = self._clock()
        notes: list[str] = []
        with self._lock:
            endpoints = list(self._endpoints.values())
            ratios = [r for r in (e.reply_to_probe_ratio for e in endpoints) if r is not None]
            scale = statistics.median(ratios) if ratios else 1.0
            stuck_after = STUCK_SHARE * attempt_deadlines(self.policy, self.timing, 0).first_token_s
            held_out = self._held_out()
            candidates = [
                Candidate(
                    e.name,
                    e.score_latency_s(scale),
                    e.in_flight,
                    e.available(now) and e.name not in held_out,
                    e.degraded,
                    e.stuck(now, stuck_after),
                )
                for e in endpoints
            ]
            index = choose(candidates, self.policy.routing, rng, frozenset(tried))
            if index is None:
                return None
            chosen = endpoints[index]
            lease = Lease(self.name, chosen.spec, now, chosen.breaker.takes_trial)
            old = chosen.start(now, lease.token)
            if old is not chosen.breaker.state:
                notes.append(
                    f"breaker of {chosen.name} (group '{self.name}'): {old.value} -> {chosen.breaker.state.value} "
                    "(trial request)"
                )
        for note in notes:
            log.info(note)
        return lease

    def attempt_deadlines(self, prompt_tokens: int = 0) -> AttemptDeadlines:
        """The deadlines of the next attempt, from what the group has shown (see model_server.client.deadlines)."""
        with self._lock:
            return attempt_deadlines(self.policy, self.timing, prompt_tokens)

    def first_token(self, lease: Lease, seconds: float) -> None:
        """The request of ``lease`` got its first text ``seconds`` after it was sent.

        A half-open trial that answers closes its breaker now: the rest of a long stream must not keep
        the replica shut to every other request.
        """
        closed_from: BreakerState | None = None
        with self._lock:
            e = self._endpoints[lease.spec.name]
            e.first_token(lease.token)
            self.timing.observe_ttft(seconds)
            if lease.trial and e.breaker.state is not BreakerState.CLOSED:
                closed_from = e.breaker.state
                e.breaker = e.breaker.success(self._clock(), trial=True)
        if closed_from is not None:
            log.warning(
                "breaker of %s (group '%s'): %s -> closed (the trial request is answering)",
                lease.spec.name,
                self.name,
                closed_from.value,
            )

    def release(
        self,
        lease: Lease,
        kind: OutcomeKind | None,
        *,
        error: str = "",
        output_tokens: int | None = None,
        gap_s: float | None = None,
    ) -> bool:
        """Record an attempt's outcome (None: cancelled). Returns True if the group should be re-probed.

        ``gap_s``: a stream's mean gap between chunks, for the stall deadline.
        """
        now = self._clock()
        elapsed_s = now - lease.started_s
        reprobe = False
        degraded: list[str] = []
        with self._lock:
            e = self._endpoints[lease.spec.name]
            old = e.breaker.state
            trial, token = lease.trial, lease.token
            if kind is OutcomeKind.OK:
                if token in e.waiting:  # an unstreamed answer: the whole answer was its first token
                    self.timing.observe_ttft(elapsed_s)
                if gap_s is not None:
                    self.timing.observe_gap(gap_s)
                e.succeed(now, elapsed_s, output_tokens if self.per_token else None, trial=trial, token=token)
                # Asked on every answer, not only when a replica turns degraded: a re-probe refused
                # then (one running, or one too recent) must still come once the interval has passed.
                degraded = [x.name for x in self._endpoints.values() if x.degraded]
            elif kind is OutcomeKind.REJECTED:
                e.reject(now, trial=trial, token=token)
            elif kind is None:
                e.cancel(now, trial=trial, token=token)
            else:
                e.fail(now, error, trial=trial, token=token)
            reprobe = self._reprobe_now(now, degraded)
            new = e.breaker.state
            latency, baseline = e.latency_s, e.baseline_s
        if old is not new:
            log.warning(
                "breaker of %s (group '%s'): %s -> %s%s",
                lease.spec.name,
                self.name,
                old.value,
                new.value,
                f" after {error}" if error else "",
            )
        if reprobe and degraded:
            log.warning(
                "group '%s': degraded replica(s) %s (last answer from %s: %.4f s%s smoothed vs a baseline of %.4f s); "
                "re-probing the group",
                self.name,
                ", ".join(degraded),
                lease.spec.name,
                latency or 0.0,
                "/token" if self.per_token else "",
                baseline or 0.0,
            )
        return reprobe

    def _held_out(self) -> frozenset[str]:
        """Replicas the control view keeps from requests (not READY, or READY again and not yet probed)."""
        return self._view.held_out(self._endpoints) if self._view is not None else frozenset()

    def _unprobed(self) -> frozenset[str]:
        return self._view.unprobed(self._endpoints) if self._view is not None else frozenset()

    def _missing(self, unprobed: frozenset[str] | None = None) -> list[Endpoint]:
        """Replicas out of rotation that only a probe brings back: never answered, breaker open, or heard
        READY again from the control API and not yet probed."""
        unprobed = self._unprobed() if unprobed is None else unprobed
        return [
            e
            for e in self._endpoints.values()
            if not e.answered or e.breaker.state is BreakerState.OPEN or e.name in unprobed
        ]

    def _reprobe_now(self, now: float, degraded: Sequence[str]) -> bool:
        """Whether an answer should start the background re-probe: a replica the pipeline calls READY again
        is probed at once, the first time (one round at a time); after that, and for degraded or missing
        replicas, at most every reprobe_interval_s (a replica that never answers our probe costs no storm)."""
        unprobed = self._unprobed()
        self._probed_at_once &= unprobed  # those probed since: a later return probes at once again
        if unprobed - self._probed_at_once and not self.reprobe_running:
            self._probed_at_once |= unprobed
            return True
        return bool(degraded or self._missing(unprobed)) and self._reprobe_due(now)

    def suspects(self) -> frozenset[str]:
        """Replicas whose breaker a timeout opened: a probe round does not wait for them (they may be hung)."""
        with self._lock:
            return frozenset(
                e.name
                for e in self._endpoints.values()
                if e.breaker.state is not BreakerState.CLOSED and (e.last_error or "").startswith("timeout")
            )

    def wants_reprobe(self) -> bool:
        """Whether a background re-probe has anything to find: a degraded replica, or one out of rotation.

        The re-probe asks the whole group, so the replica that comes back is compared with fresh
        probes of the others, not with their older replies.
        """
        with self._lock:
            return any(e.degraded for e in self._endpoints.values()) or bool(self._missing())

    def probe_specs(self) -> tuple[ServerSpec, ...]:
        """The replicas a probe round asks: all but those the control view calls not READY."""
        skip = self._view.not_ready(self._endpoints) if self._view is not None else frozenset()
        return tuple(e.spec for e in self._endpoints.values() if e.name not in skip)

    def note_round_without_probes(self) -> bool:
        """A probe round with nothing to ask (the control API calls every replica not READY): it found none."""
        with self._lock:
            self.probe_rounds += 1
            self.last_round_found = False
            self.last_round_summary = "none asked: the control API says no replica is READY"
        return False

    def _reprobe_due(self, now: float) -> bool:
        if self.reprobe_running:
            return False
        interval = self.policy.reprobe_interval_s
        return self.last_reprobe_s is None or now - self.last_reprobe_s >= interval

    def try_start_reprobe(self) -> bool:
        """Claim the group's one background re-probe slot."""
        with self._lock:
            if self.reprobe_running:
                return False
            self.reprobe_running = True
            self.last_reprobe_s = self._clock()
            return True

    def end_reprobe(self) -> None:
        with self._lock:
            self.reprobe_running = False

    # ---- probes -------------------------------------------------------------------------

    def apply_probes(self, results: Sequence[ProbeResult], timeout_s: float | None = None) -> bool:
        """Fold one probe round into the state. Returns True if some replica answered.

        ``timeout_s``: the probes' timeout, if a request's deadline cut it below the bound's
        (such a round's silence does not grow the bound).
        """
        now = self._clock()
        changes: list[tuple[str, BreakerState, BreakerState]] = []
        back: list[tuple[str, float]] = []
        results = [r for r in results if not r.pending]
        with self._lock:
            found = any(r.ok for r in results)
            for r in results:
                e = self._endpoints.get(r.spec.name)
                if e is None:
                    continue
                old = e.breaker.state
                was_missing = not e.answered or old is BreakerState.OPEN
                if r.ok:
                    e.probe_ok(now, r.latency_s or 0.0, r.output_tokens if self.per_token else None)
                    if self._view is not None:
                        self._view.probed(e.name)
                    if was_missing and self.built:
                        back.append((e.name, r.latency_s or 0.0))
                else:
                    e.probe_failed(now, r.error or "no answer")
                if old is not e.breaker.state:
                    changes.append((e.name, old, e.breaker.state))
            usable = [r.latency_s for r in results if r.usable and r.latency_s is not None]
            self.timing.seed_ttft(usable)
            # A longer bound helps only a fleet that is slow, not one where some replica refused or
            # erred (it is up): a hung replica among them would only make every later round longer.
            cut_short = timeout_s is not None and timeout_s < probe_timeout_s(self.bound_s, self.policy)
            grow = not found and not cut_short and bool(results) and all(r.timed_out for r in results)
            if found:
                self.built = True
            if usable:
                # Back down after a recovery: the bound follows the fastest answer, never below the initial
                # one (else one slow spell would pin every timeout at the ceiling for good).
                self.bound_s = max(self.policy.initial_latency_s, min(self.bound_s, BOUND_HEADROOM * min(usable)))
            elif grow:
                self.bound_s = min(self.bound_s * self.policy.probe_bound_growth, self.policy.latency_bound_max_s)
            self.probe_rounds += 1
            self.last_round_found = found
            self.last_round_summary = _summary(results)
            bound = self.bound_s
        for name, old, new in changes:
            log.warning("breaker of %s (group '%s'): %s -> %s (probe)", name, self.name, old.value, new.value)
        for name, latency in back:
            log.warning(
                "replica %s of group '%s' answers again (probe %.3f s): back in rotation", name, self.name, latency
            )
        if grow:
            log.warning(
                "no replica of group '%s' answered a probe in time; the latency bound grows to %.2f s", self.name, bound
            )
        elif not found:
            log.warning("no replica of group '%s' answered a probe (%s)", self.name, self.last_round_summary)
        return found

    # ---- queries -------------------------------------------------------------------------

    def probe_timeout_s(self) -> float:
        with self._lock:
            return probe_timeout_s(self.bound_s, self.policy)

    def probe_wait_s(self) -> float:
        """How long a caller waits for another caller's probe round before giving up on it."""
        return self.probe_timeout_s() + self.policy.connect_timeout_s + PROBE_WAIT_SLACK_S

    def snapshot(self) -> dict[str, EndpointSnapshot]:
        with self._lock:
            return {name: e.snapshot() for name, e in self._endpoints.items()}


def _summary(results: Sequence[ProbeResult]) -> str:
    """What a probe round found, in words: 'none answered: 2 refused the connection, 1 timed out after 3.00 s'."""
    if any(r.ok for r in results):
        return f"{sum(r.ok for r in results)} of {len(results)} answered"
    counts: dict[str, int] = {}
    for r in results:
        if r.timed_out:
            what = "timed out"
        elif r.error and r.error.startswith("connection error"):
            what = "refused or dropped the connection"
        else:
            what = f"answered {(r.error or 'badly').split(':')[0]}"
        counts[what] = counts.get(what, 0) + 1
    return "none answered: " + ", ".join(f"{n} {what}" for what, n in counts.items())
