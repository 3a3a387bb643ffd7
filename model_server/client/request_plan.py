"""One request's retry loop as a plan of actions, free of I/O (sans-IO).

:func:`request_plan` is a generator that *decides* and never waits: it yields
an action (send to this replica with these deadlines, sleep this long, probe
the group) and is sent back the action's result. The sync client and the
async client each drive the same plan, so the retry logic exists once and
tests can run it with a fake clock.

What bounds a call (all in :class:`RequestState`, shared by every segment of
a resumed stream):

- ``client.max_retry`` counts *attempts*: HTTP requests that carry the
  caller's request to one replica. Probe requests are not attempts (a probe
  round asks every replica for one token); they are listed in the final
  error and bounded by the wait below.
- ``client.wait_for_replica_s``: how long a call may wait for *some* replica
  to start answering, across attempts, probe rounds and backoffs. Time spent
  receiving text from a replica does not count, so a long generation is never
  cut by it, while a fleet that restarts within it costs latency, not errors.
- ``client.request_deadline_s`` (optional): a hard bound on the whole call.

An attempt takes at most half the time left (before the wait bound or the
deadline) while another replica is untried, so a hung replica cannot use it up alone.

The plan returns a :class:`Done` or raises a client error: RequestRejectedError
(from the server's refusal, at once) or GroupUnavailableError (every attempt
and probe round listed) when one of the bounds above is spent.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from model_server.client.deadlines import AttemptDeadlines
from model_server.client.metrics import ClientMetrics
from model_server.client.replica_group import Lease, ReplicaGroup
from model_server.client.retry import Attempt, OutcomeKind, backoff_s, describe, rejected_from
from model_server.config import ClientPolicy
from model_server.errors import GroupUnavailableError

__all__ = ["Call", "CallResult", "Done", "Probe", "RequestState", "Sleep", "request_plan"]

log = logging.getLogger("model_server.client")

MIN_TIMEOUT_S = 0.001


@dataclass(frozen=True)
class Call:
    """Send the request to ``lease.spec`` under these deadlines; answer with a CallResult."""

    lease: Lease
    deadlines: AttemptDeadlines

    @property
    def timeout_s(self) -> float:
        """The first-token deadline: for an unstreamed answer, the whole attempt's limit."""
        return self.deadlines.first_token_s


@dataclass(frozen=True)
class Sleep:
    delay_s: float


@dataclass(frozen=True)
class Probe:
    """Run (or wait for) one probe round of the group; answer True if some replica answered.

    Both limits are cut to what the request has left: ``timeout_s`` for the probes, ``wait_s`` for
    waiting on the round another caller is running.
    """

    seen_rounds: int  # the group's probe_rounds when the plan asked: a round finished since then counts
    timeout_s: float
    wait_s: float


@dataclass(frozen=True)
class CallResult:
    kind: OutcomeKind
    value: Any = None
    error: BaseException | None = None
    output_tokens: int | None = None


@dataclass(frozen=True)
class Done:
    value: Any
    lease: Lease
    reprobe: bool  # the reply showed a replica to re-probe: do it in the background


@dataclass
class RequestState:
    """What one call has spent: attempts, probe rounds, time; shared by the segments of a resumed stream."""

    policy: ClientPolicy
    started_s: float
    attempts_used: int = 0
    probe_rounds: int = 0
    failures: int = 0  # failed attempts and empty probe rounds, for the backoff
    resumes: int = 0
    receiving_s: float = 0.0  # time spent receiving text from a replica: not waiting
    attempts: list[Attempt] = field(default_factory=list)
    tried: set[str] = field(default_factory=set)
    last_error: BaseException | None = None

    @property
    def hard_deadline_s(self) -> float | None:
        d = self.policy.request_deadline_s
        return None if d is None else self.started_s + d

    def waited_s(self, now: float) -> float:
        return max(0.0, now - self.started_s - self.receiving_s)

    def spent(self, now: float) -> str | None:
        """Why the call must give up now, or None."""
        p = self.policy
        if self.attempts_used >= p.max_retry:
            return f"all {self.attempts_used} attempts of the budget failed (client.max_retry = {p.max_retry})"
        hard = self.hard_deadline_s
        if hard is not None and now >= hard:
            return f"the call's deadline of {p.request_deadline_s:g} s passed (client.request_deadline_s)"
        waited = self.waited_s(now)
        if waited >= p.wait_for_replica_s:
            return (
                f"no replica started answering within {waited:.1f} s (client.wait_for_replica_s = "
                f"{p.wait_for_replica_s:g}): {self.attempts_used} attempt(s), {self.probe_rounds} probe round(s)"
            )
        return None

    def left_s(self, now: float) -> float:
        """Time left before the wait bound or the hard deadline, whichever comes first."""
        left = self.policy.wait_for_replica_s - self.waited_s(now)
        hard = self.hard_deadline_s
        if hard is not None:
            left = min(left, hard - now)
        return max(MIN_TIMEOUT_S, left)

    def cap(self, timeout_s: float, now: float) -> float:
        return max(MIN_TIMEOUT_S, min(timeout_s, self.left_s(now)))

    def cap_attempt(self, timeout_s: float, now: float, others_untried: bool) -> float:
        """An attempt's first-token limit: within what is left, and leaving room for another replica."""
        left = self.left_s(now)
        if others_untried:
            left /= 2
        return max(MIN_TIMEOUT_S, min(timeout_s, left))


Action = Call | Sleep | Probe


def request_plan(
    group: ReplicaGroup,
    policy: ClientPolicy,
    state: RequestState,
    *,
    rng: random.Random,
    clock: Callable[[], float],
    metrics: ClientMetrics,
    hold_lease: bool = False,
    prompt_tokens: int = 0,
) -> Generator[Action, Any, Done]:
    """Attempts for one request (or one segment of a resumed stream).

    ``hold_lease`` leaves the successful lease for the caller to release (streams: the answer is
    still arriving); ``prompt_tokens`` (an estimate) lengthens the first-token deadline.
    """
    while True:
        now = clock()
        why = state.spent(now)
        if why is not None:
            raise GroupUnavailableError(group.name, state.attempts, why) from state.last_error
        lease = group.acquire(rng, state.tried) if group.built else None
        if lease is None:
            found = yield Probe(
                group.probe_rounds, state.cap(group.probe_timeout_s(), now), state.cap(group.probe_wait_s(), now)
            )
            state.probe_rounds += 1
            if found:
                continue
            state.attempts.append(Attempt("probe of every replica", group.last_round_summary, clock() - now))
            state.failures += 1
            yield Sleep(state.cap(backoff_s(state.failures, policy, rng), clock()))
            continue
        state.attempts_used += 1
        metrics.attempt(group.name, lease.spec.name)
        deadlines = group.attempt_deadlines(prompt_tokens)
        others = group.size > len(state.tried | {lease.spec.name})
        first_token_s = state.cap_attempt(deadlines.first_token_s, clock(), others)
        result: CallResult = yield Call(lease, AttemptDeadlines(first_token_s, deadlines.stall_s))
        if result.kind is OutcomeKind.OK:
            metrics.latency(group.name, lease.spec.name, clock() - lease.started_s)
            reprobe = False if hold_lease else group.release(lease, OutcomeKind.OK, output_tokens=result.output_tokens)
            return Done(result.value, lease, reprobe)
        assert result.error is not None
        if result.kind is OutcomeKind.REJECTED:
            group.release(lease, OutcomeKind.REJECTED)
            raise rejected_from(result.error, lease.spec.name) from result.error
        state.last_error = result.error
        error = describe(result.error)
        group.release(lease, result.kind, error=error)
        note_failure(group, state, lease, result.kind, error, clock() - lease.started_s, metrics)
        if state.spent(clock()) is not None:
            continue  # the top of the loop raises with every attempt listed
        delay = state.cap(backoff_s(state.failures, policy, rng), clock())
        metrics.failover(group.name, lease.spec.name)
        log.warning(
            "failover in group '%s': attempt %d/%d on %s failed (%s); next replica in %.0f ms",
            group.name,
            state.attempts_used,
            policy.max_retry,
            lease.spec.name,
            error,
            delay * 1000,
        )
        yield Sleep(delay)


def note_failure(
    group: ReplicaGroup,
    state: RequestState,
    lease: Lease,
    kind: OutcomeKind,
    error: str,
    elapsed_s: float,
    metrics: ClientMetrics,
) -> None:
    """Book a failed attempt (or a broken segment) in the call's state and the metrics."""
    metrics.failure(group.name, lease.spec.name, kind.value)
    state.attempts.append(Attempt(lease.spec.name, error, elapsed_s))
    state.tried.add(lease.spec.name)
    state.failures += 1
