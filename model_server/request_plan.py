"""One request's retry loop as a plan of actions, free of I/O (sans-IO).

:func:`request_plan` is a generator that *decides* and never waits: it yields
an action (send to this replica with this timeout, sleep this long, probe the
group) and is sent back the action's result. The sync client and the async
client each drive the same plan with a dozen lines (``_drive``), so the retry
logic exists once and tests can run it with a fake clock.

The plan returns a :class:`Done` or raises a client error: RequestRejectedError
(from the server's refusal, at once) or GroupUnavailableError (every attempt
listed) when the budget, the deadline or the probe rounds are spent.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Union

from model_server.client_errors import GroupUnavailableError, rejected_from
from model_server.client_metrics import ClientMetrics
from model_server.config import ClientPolicy
from model_server.replica_group import Lease, ReplicaGroup
from model_server.retry import Attempt, AttemptBudget, OutcomeKind, backoff_s, describe

__all__ = ["Call", "CallResult", "Done", "Probe", "Sleep", "request_plan"]

log = logging.getLogger("model_server.client")


@dataclass(frozen=True)
class Call:
    """Send the request to ``lease.spec`` with this timeout; answer with a CallResult."""

    lease: Lease
    timeout_s: float


@dataclass(frozen=True)
class Sleep:
    delay_s: float


@dataclass(frozen=True)
class Probe:
    """Run (or wait for) one probe round of the group; answer True if some replica answered.

    Both limits are cut to the request's deadline: ``timeout_s`` for the probes, ``wait_s`` for
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
    reprobe: bool  # the reply showed a degraded replica: re-probe in the background


Action = Union[Call, Sleep, Probe]


def request_plan(
    group: ReplicaGroup,
    policy: ClientPolicy,
    *,
    rng: random.Random,
    clock: Callable[[], float],
    metrics: ClientMetrics,
    hold_lease: bool = False,
) -> Generator[Action, Any, Done]:
    """Attempts for one request; ``hold_lease`` leaves the successful lease for the caller to release (streams)."""
    start = clock()
    deadline = start + policy.request_deadline_s if policy.request_deadline_s is not None else None
    budget = AttemptBudget(policy.max_retry, start, deadline)
    attempts: list[Attempt] = []
    tried: set[str] = set()
    failures = 0
    empty_rounds = 0
    last_error: BaseException | None = None
    while True:
        now = clock()
        if budget.exhausted(now):
            spent = "the deadline of %.1f s passed" % policy.request_deadline_s if deadline and now >= deadline else (
                f"all {budget.used} attempts of the budget (client.max_retry = {policy.max_retry}) failed"
            )
            raise GroupUnavailableError(group.name, attempts, spent) from last_error
        lease = group.acquire(rng, tried) if group.built else None
        if lease is None:
            rounds_before = group.probe_rounds
            bound = group.bound_s
            found = yield Probe(
                rounds_before, budget.cap(group.probe_timeout_s(), now), budget.cap(group.probe_wait_s(), now)
            )
            budget.spend()
            if found:
                empty_rounds = 0
                continue
            empty_rounds += 1
            attempts.append(Attempt("probe of every replica", f"none answered within {bound:.2f}s", clock() - now))
            if empty_rounds >= policy.build_rounds:
                raise GroupUnavailableError(
                    group.name, attempts, f"no replica answered {empty_rounds} probe round(s) in a row (client.build_rounds)"
                ) from last_error
            failures += 1
            yield Sleep(budget.cap(backoff_s(failures, policy, rng), clock()))
            continue
        budget.spend()
        metrics.attempt(group.name, lease.spec.name)
        result: CallResult = yield Call(lease, budget.cap(group.request_timeout_s(), clock()))
        if result.kind is OutcomeKind.OK:
            metrics.latency(group.name, lease.spec.name, clock() - lease.started_s)
            reprobe = False if hold_lease else group.release(lease, OutcomeKind.OK, output_tokens=result.output_tokens)
            return Done(result.value, lease, reprobe)
        assert result.error is not None
        if result.kind is OutcomeKind.REJECTED:
            group.release(lease, OutcomeKind.REJECTED)
            raise rejected_from(result.error, lease.spec.name) from result.error
        last_error = result.error
        error = describe(result.error)
        group.release(lease, result.kind, error=error)
        metrics.failure(group.name, lease.spec.name, result.kind.value)
        attempts.append(Attempt(lease.spec.name, error, clock() - lease.started_s))
        tried.add(lease.spec.name)
        failures += 1
        if budget.exhausted(clock()):
            continue  # the top of the loop raises with every attempt listed
        delay = budget.cap(backoff_s(failures, policy, rng), clock())
        metrics.failover(group.name, lease.spec.name)
        log.warning(
            "failover in group '%s': attempt %d/%d on %s failed (%s); next replica in %.0f ms",
            group.name, budget.used, policy.max_retry, lease.spec.name, error, delay * 1000,
        )
        yield Sleep(delay)
