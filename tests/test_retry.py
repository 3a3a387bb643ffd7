"""Retry policy and the request plan, pure: no sockets, a fake clock, seeded random."""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest

from model_server.client_errors import GroupUnavailableError, RequestRejectedError
from model_server.client_metrics import ClientMetrics
from model_server.config import ClientPolicy, ServerKind, ServerSpec
from model_server.replica_group import ProbeResult, ReplicaGroup
from model_server.request_plan import Call, CallResult, Done, Probe, Sleep, request_plan
from model_server.retry import (
    AttemptBudget,
    MalformedResponse,
    OutcomeKind,
    backoff_s,
    classify,
    probe_timeout_s,
    request_timeout_s,
)

REQ = httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions")


def _status(code: int) -> openai.APIStatusError:
    response = httpx.Response(code, request=REQ, json={"error": {"message": "x"}})
    return openai.APIStatusError("x", response=response, body={"error": {"message": "x"}})


@pytest.mark.parametrize("code", [500, 502, 503, 504, 429, 408, 409])
def test_server_side_statuses_retry(code: int) -> None:
    assert classify(_status(code)) is OutcomeKind.SERVER and OutcomeKind.SERVER.retryable


@pytest.mark.parametrize("code", [400, 401, 403, 404, 413, 422])
def test_request_errors_go_to_the_caller(code: int) -> None:
    assert classify(_status(code)) is OutcomeKind.REJECTED and not OutcomeKind.REJECTED.retryable


def test_transport_failures_and_malformed_bodies_retry() -> None:
    assert classify(openai.APITimeoutError(request=REQ)) is OutcomeKind.TIMEOUT
    assert classify(httpx.ReadTimeout("slow", request=REQ)) is OutcomeKind.TIMEOUT
    assert classify(openai.APIConnectionError(request=REQ)) is OutcomeKind.CONNECTION
    assert classify(httpx.RemoteProtocolError("peer closed", request=REQ)) is OutcomeKind.CONNECTION
    assert classify(httpx.ConnectError("refused", request=REQ)) is OutcomeKind.CONNECTION
    assert classify(json.JSONDecodeError("bad", "{", 0)) is OutcomeKind.MALFORMED
    assert classify(MalformedResponse("x")) is OutcomeKind.MALFORMED
    assert classify(ValueError("a bug, not a replica's fault")) is None
    assert classify(TypeError("neither")) is None


def test_backoff_is_jittered_exponential_and_capped() -> None:
    policy = ClientPolicy(retry_backoff_initial_ms=100, retry_backoff_max_ms=1000)
    rng = random.Random(7)
    assert backoff_s(0, policy, rng) == 0.0
    for failures, cap_s in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (60, 1.0)]:
        draws = [backoff_s(failures, policy, rng) for _ in range(300)]
        assert all(0.0 <= d <= cap_s for d in draws)
        assert max(draws) > 0.8 * cap_s and min(draws) < 0.2 * cap_s  # spread over the whole range


def test_timeouts_follow_the_bound_within_floor_and_ceiling() -> None:
    policy = ClientPolicy(latency_growing_rate=20, request_timeout_floor_s=5, request_timeout_ceiling_s=600)
    assert request_timeout_s(3.0, policy) == 60.0
    assert request_timeout_s(0.01, policy) == 5.0
    assert request_timeout_s(1200.0, policy) == 600.0
    assert probe_timeout_s(3.0, policy) == 3.0 and probe_timeout_s(10_000, policy) == 600.0


def test_budget_counts_attempts_and_caps_timeouts_by_the_deadline() -> None:
    budget = AttemptBudget(max_attempts=2, started_s=0.0, deadline_s=10.0)
    assert not budget.exhausted(0) and budget.cap(30.0, now=4.0) == 6.0
    budget.spend()
    budget.spend()
    assert budget.exhausted(0)
    assert AttemptBudget(5, 0.0, 10.0).exhausted(10.0)
    assert AttemptBudget(5, 0.0).cap(30.0, now=1e9) == 30.0


# ---- the plan, driven by hand ---------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _group(n: int = 3, **policy_fields) -> tuple[ReplicaGroup, ClientPolicy, FakeClock]:
    policy = ClientPolicy(breaker_failures=2, breaker_cooldown_s=10, max_retry=6, build_rounds=2, **policy_fields)
    specs = [ServerSpec(name=f"r{i}", group="8", kind=ServerKind.completion, host="127.0.0.1", port=9000 + i, model="m")
             for i in range(n)]
    clock = FakeClock()
    group = ReplicaGroup("8", specs, policy, clock=clock)
    latencies = [0.01 * (i + 1) for i in range(n)]
    group.apply_probes([ProbeResult(s, lat, output_tokens=1) for s, lat in zip(specs, latencies)])
    return group, policy, clock


def _plan(group: ReplicaGroup, policy: ClientPolicy, clock: FakeClock, **kw):
    return request_plan(group, policy, rng=random.Random(0), clock=clock, metrics=ClientMetrics(), **kw)


def test_failover_goes_to_the_next_best_replica_after_a_backoff() -> None:
    group, policy, clock = _group()
    plan = _plan(group, policy, clock)
    first = next(plan)
    assert isinstance(first, Call) and first.lease.spec.name == "r0"
    assert first.timeout_s == request_timeout_s(policy.initial_latency_s, policy)
    pause = plan.send(CallResult(OutcomeKind.SERVER, error=_status(503)))
    assert isinstance(pause, Sleep) and 0 <= pause.delay_s <= policy.retry_backoff_initial_ms / 1000
    second = plan.send(None)
    assert isinstance(second, Call) and second.lease.spec.name == "r1"
    with pytest.raises(StopIteration) as stop:
        plan.send(CallResult(OutcomeKind.OK, value="answer", output_tokens=10))
    done: Done = stop.value.value
    assert done.value == "answer"
    snap = group.snapshot()
    assert snap["r0"].failures == 1 and snap["r1"].successes == 1
    assert all(s.in_flight == 0 for s in snap.values())


def test_a_rejected_request_is_raised_at_once_and_blames_no_replica() -> None:
    group, policy, clock = _group()
    plan = _plan(group, policy, clock)
    call = next(plan)
    err = _status(400)
    with pytest.raises(RequestRejectedError) as info:
        plan.send(CallResult(OutcomeKind.REJECTED, error=err))
    assert info.value.status == 400 and info.value.__cause__ is err
    snap = group.snapshot()[call.lease.spec.name]
    assert snap.failures == 0 and snap.rejected == 1 and snap.consecutive_failures == 0


def test_the_budget_bounds_attempts_and_the_error_lists_them() -> None:
    group, policy, clock = _group()
    plan = _plan(group, policy, clock)
    action = next(plan)
    calls = probes = 0
    with pytest.raises(GroupUnavailableError) as info:
        while True:
            if isinstance(action, Call):
                calls += 1
                clock.now += 0.5
                action = plan.send(CallResult(OutcomeKind.CONNECTION, error=httpx.ConnectError("refused", request=REQ)))
            elif isinstance(action, Probe):
                probes += 1
                action = plan.send(group.apply_probes([ProbeResult(s, None, error="refused") for s in group.specs]))
            else:
                action = plan.send(None)
    assert calls + probes == policy.max_retry  # probe rounds spend the same budget: no multiplication
    assert calls == 6  # 3 replicas x breaker_failures 2, then every breaker is open
    attempts = info.value.attempts
    assert len(attempts) == calls + probes
    assert {a.replica for a in attempts[:calls]} == {"r0", "r1", "r2"}
    assert all(a.elapsed_s == pytest.approx(0.5) for a in attempts[:calls])
    assert "r0" in str(info.value) and "refused" in str(info.value)


def test_every_breaker_open_means_a_probe_round_then_the_found_replica() -> None:
    group, policy, clock = _group(n=2)
    for name in ("r0", "r1"):
        for _ in range(2):
            lease = group.acquire(random.Random(0), tried={"r0", "r1"} - {name})
            assert lease is not None and lease.spec.name == name
            group.release(lease, OutcomeKind.TIMEOUT, error="timeout")
    plan = _plan(group, policy, clock)
    probe = next(plan)
    assert isinstance(probe, Probe)
    specs = group.specs
    call = plan.send(group.apply_probes([ProbeResult(specs[0], None, error="refused"), ProbeResult(specs[1], 0.02, 1)]))
    assert isinstance(call, Call) and call.lease.spec.name == "r1"


def test_a_deadline_ends_the_request_even_with_budget_left() -> None:
    group, policy, clock = _group(request_deadline_s=1.0)
    plan = _plan(group, policy, clock)
    call = next(plan)
    assert call.timeout_s <= 1.0
    clock.now = 1.5
    with pytest.raises(GroupUnavailableError, match="deadline") as info:  # no pointless backoff first
        plan.send(CallResult(OutcomeKind.TIMEOUT, error=httpx.ReadTimeout("slow", request=REQ)))
    assert len(info.value.attempts) == 1 and isinstance(info.value.__cause__, httpx.ReadTimeout)


def test_a_held_lease_stays_in_flight_until_released() -> None:
    group, policy, clock = _group()
    plan = _plan(group, policy, clock, hold_lease=True)
    call = next(plan)
    with pytest.raises(StopIteration) as stop:
        plan.send(CallResult(OutcomeKind.OK, value="stream"))
    assert group.snapshot()[call.lease.spec.name].in_flight == 1
    group.release(stop.value.value.lease, None)
    assert group.snapshot()[call.lease.spec.name].in_flight == 0
