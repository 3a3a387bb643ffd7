"""Retry policy and the request plan, pure: no sockets, a fake clock, seeded random."""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest

from model_server.client.metrics import ClientMetrics
from model_server.client.replica_group import ProbeResult, ReplicaGroup
from model_server.client.request_plan import Call, CallResult, Done, Probe, RequestState, Sleep, request_plan
from model_server.client.retry import (
    MalformedResponse,
    OutcomeKind,
    backoff_s,
    classify,
    probe_timeout_s,
)
from model_server.config import ClientPolicy, RoutingPolicy, ServerKind, ServerSpec
from model_server.errors import GroupUnavailableError, RequestRejectedError

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


def test_probe_timeouts_follow_the_bound_below_the_ceiling() -> None:
    policy = ClientPolicy(request_timeout_ceiling_s=600)
    assert probe_timeout_s(3.0, policy) == 3.0 and probe_timeout_s(10_000, policy) == 600.0


def test_latency_growing_rate_sets_both_factors_it_used_to_mean_unless_they_are_given() -> None:
    assert ClientPolicy().probe_bound_growth == 20 and ClientPolicy().degraded_latency_factor == 20
    old = ClientPolicy(latency_growing_rate=4)  # a table from the original: one knob, two meanings
    assert (old.probe_bound_growth, old.degraded_latency_factor) == (4, 4)
    split = ClientPolicy(latency_growing_rate=4, degraded_latency_factor=8)
    assert (split.probe_bound_growth, split.degraded_latency_factor) == (4, 8)
    assert ClientPolicy(degraded_latency_factor=3).probe_bound_growth == 20  # each knob on its own
    with pytest.raises(ValueError):
        ClientPolicy(latency_growing_rate=1)


def test_the_bound_grows_by_probe_bound_growth_and_degradation_follows_its_own_factor() -> None:
    policy = ClientPolicy(initial_latency_s=3, probe_bound_growth=2, degraded_latency_factor=100)
    specs = [ServerSpec(name="r0", group="8", kind=ServerKind.completion, host="127.0.0.1", port=9000, model="m")]
    group = ReplicaGroup("8", specs, policy, clock=FakeClock())
    group.apply_probes([ProbeResult(specs[0], None, error="timeout", timed_out=True)])
    assert group.bound_s == 6  # x2, not x100


def test_the_state_counts_attempts_and_caps_timeouts_by_the_deadline_and_the_wait() -> None:
    state = RequestState(ClientPolicy(max_retry=2, request_deadline_s=10.0, wait_for_replica_s=8.0), started_s=0.0)
    assert state.spent(0) is None and state.cap(30.0, now=4.0) == 4.0  # the wait bound (8 s) comes first
    state.receiving_s = 5.0  # time spent receiving text does not count as waiting...
    assert state.cap(30.0, now=4.0) == 6.0  # ...so the hard deadline (10 s) is what is left
    state.attempts_used = 2
    assert "max_retry = 2" in state.spent(0)
    assert "request_deadline_s" in RequestState(ClientPolicy(request_deadline_s=10.0), 0.0).spent(10.0)
    waited = RequestState(ClientPolicy(wait_for_replica_s=5.0), 0.0).spent(6.0)
    assert "6.0 s" in waited and "wait_for_replica_s = 5" in waited
    assert RequestState(ClientPolicy(), 0.0).cap(30.0, now=1e9) == 0.001


def test_an_attempt_leaves_room_for_another_replica_under_a_deadline() -> None:
    state = RequestState(ClientPolicy(request_deadline_s=10.0, wait_for_replica_s=60), started_s=0.0)
    assert state.cap_attempt(30.0, 0.0, others_untried=True) == 5.0
    assert state.cap_attempt(30.0, 0.0, others_untried=False) == 10.0
    waiting = RequestState(ClientPolicy(wait_for_replica_s=8.0), started_s=0.0)
    assert waiting.cap_attempt(30.0, 0.0, others_untried=True) == 4.0  # the wait bound is shared the same way


# ---- the plan, driven by hand ---------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _group(n: int = 3, **policy_fields) -> tuple[ReplicaGroup, ClientPolicy, FakeClock]:
    policy_fields.setdefault("routing", RoutingPolicy.fastest)  # the tests follow fastest's order r0, r1, r2
    fields = dict(breaker_failures=2, breaker_cooldown_s=10, max_retry=6, build_rounds=2)
    policy = ClientPolicy(**dict(fields, **policy_fields))
    specs = [
        ServerSpec(name=f"r{i}", group="8", kind=ServerKind.completion, host="127.0.0.1", port=9000 + i, model="m")
        for i in range(n)
    ]
    clock = FakeClock()
    group = ReplicaGroup("8", specs, policy, clock=clock)
    latencies = [0.01 * (i + 1) for i in range(n)]
    group.apply_probes([ProbeResult(s, lat, output_tokens=1) for s, lat in zip(specs, latencies)])
    return group, policy, clock


def _plan(group: ReplicaGroup, policy: ClientPolicy, clock: FakeClock, state: RequestState | None = None, **kw):
    state = state or RequestState(policy, clock())
    return request_plan(group, policy, state, rng=random.Random(0), clock=clock, metrics=ClientMetrics(), **kw)


def test_failover_goes_to_the_next_best_replica_after_a_backoff() -> None:
    group, policy, clock = _group()
    plan = _plan(group, policy, clock)
    first = next(plan)
    assert isinstance(first, Call) and first.lease.spec.name == "r0"
    # the probes' median (20 ms) x 10 is under the floor: the first-token deadline is the floor
    assert first.timeout_s == policy.first_token_timeout_floor_s
    assert first.deadlines.stall_s == policy.stall_timeout_floor_s
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


def _run_refused(
    plan, group: ReplicaGroup, clock: FakeClock, probe_s: float = 0.0
) -> tuple[int, int, int, GroupUnavailableError]:
    """Drive a plan whose replicas all refuse; (calls, probe rounds, sleeps, the final error)."""
    action = next(plan)
    calls = probes = sleeps = 0
    with pytest.raises(GroupUnavailableError) as info:
        while True:
            if isinstance(action, Call):
                calls += 1
                clock.now += 0.5
                action = plan.send(CallResult(OutcomeKind.CONNECTION, error=httpx.ConnectError("refused", request=REQ)))
            elif isinstance(action, Probe):
                probes += 1
                clock.now += probe_s
                results = [ProbeResult(s, None, error="connection error: ConnectError: refused") for s in group.specs]
                action = plan.send(group.apply_probes(results))
            else:
                sleeps += 1
                clock.now += action.delay_s
                action = plan.send(None)
    return calls, probes, sleeps, info.value


def test_max_retry_counts_attempts_and_the_error_lists_them() -> None:
    group, policy, clock = _group(breaker_failures=100)  # breakers never open: every try is an attempt
    calls, probes, _, error = _run_refused(_plan(group, policy, clock), group, clock)
    assert calls == policy.max_retry and probes == 0
    assert len(error.attempts) == calls and "max_retry = 6" in str(error)
    assert {a.replica for a in error.attempts} == {"r0", "r1", "r2"}
    assert all(a.elapsed_s == pytest.approx(0.5) for a in error.attempts)
    assert "r0" in str(error) and "refused" in str(error)


def test_probe_rounds_are_not_attempts_they_are_bounded_by_the_wait_and_paced_by_backoff() -> None:
    group, policy, clock = _group(max_retry=20, wait_for_replica_s=10.0, retry_backoff_max_ms=2000)
    calls, probes, sleeps, error = _run_refused(_plan(group, policy, clock), group, clock, probe_s=0.01)
    assert calls == 6  # 3 replicas x breaker_failures 2, then every breaker is open
    assert probes >= 3 and sleeps >= probes  # rounds keep coming, each after a backoff...
    assert clock.now == pytest.approx(10.0, abs=0.05)  # ...until the wait bound, not after three rounds
    assert "wait_for_replica_s = 10" in str(error) and f"{probes} probe round(s)" in str(error)
    rounds = [a for a in error.attempts if a.replica == "probe of every replica"]
    assert len(rounds) == probes and "3 refused or dropped the connection" in rounds[0].error
    assert "within" not in rounds[0].error  # nothing was waited for: the error does not say it was


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


# ---- review findings: each failed before its fix ---------------------------------------------


def test_asyncio_timeouts_are_timeouts() -> None:
    import asyncio

    assert classify(asyncio.TimeoutError()) is OutcomeKind.TIMEOUT  # not builtin TimeoutError before Python 3.11


def test_the_latency_bound_comes_back_down_once_probes_find_replicas_again() -> None:
    policy = ClientPolicy(
        initial_latency_s=3, latency_growing_rate=20, request_timeout_ceiling_s=600, latency_bound_max_s=2000
    )
    specs = [
        ServerSpec(name=f"r{i}", group="8", kind=ServerKind.completion, host="127.0.0.1", port=9000 + i, model="m")
        for i in range(2)
    ]
    group = ReplicaGroup("8", specs, policy, clock=FakeClock())
    silent = [ProbeResult(s, None, error="timeout", timed_out=True) for s in specs]
    group.apply_probes(silent)
    group.apply_probes(silent)
    assert group.bound_s == pytest.approx(1200) and group.probe_timeout_s() == 600
    group.apply_probes([ProbeResult(specs[0], 0.2, output_tokens=1), silent[1]])
    assert group.bound_s == pytest.approx(3.0)  # back to the initial bound: a hung replica costs 3 s, not 600 s
    assert group.probe_timeout_s() == pytest.approx(3.0)
    group.apply_probes(silent)
    group.apply_probes([ProbeResult(specs[0], 25.0, output_tokens=1), ProbeResult(specs[1], 40.0, output_tokens=1)])
    assert group.bound_s == pytest.approx(50.0)  # a slow fleet: twice the fastest answer, not the grown 60 s


def test_a_degraded_replica_gets_its_reprobe_even_if_one_was_running_when_it_degraded() -> None:
    group, policy, clock = _group(n=2, latency_ewma_alpha=1.0, degraded_latency_factor=4, reprobe_interval_s=10)
    rng = random.Random(0)

    def answer(name: str, elapsed_s: float) -> bool:
        lease = group.acquire(rng, tried={"r0", "r1"} - {name})
        assert lease is not None and lease.spec.name == name
        clock.now += elapsed_s
        return group.release(lease, OutcomeKind.OK, output_tokens=1)

    assert not answer("r0", 0.01)  # its baseline
    assert group.try_start_reprobe()  # a re-probe is running (for another reason)...
    assert not answer("r0", 1.0)  # ...when r0 turns degraded: none can start now
    assert group.snapshot()["r0"].degraded
    group.end_reprobe()
    assert not answer("r1", 0.02)  # within reprobe_interval_s of the last one
    clock.now = 20.0
    assert answer("r1", 0.02)  # the interval passed and r0 is still degraded: re-probe now


def test_stale_outcomes_do_not_drive_a_half_open_breaker() -> None:
    group, policy, clock = _group(n=2)  # breaker_failures 2, cooldown 10
    rng = random.Random(0)
    only_r0 = {"r1"}
    stale = [group.acquire(rng, tried=only_r0) for _ in range(3)]  # sent while the breaker was closed
    for lease in stale:
        group.first_token(lease, 0.01)  # streaming, not stuck: only the breaker is under test here
    for _ in range(2):
        group.release(group.acquire(rng, tried=only_r0), OutcomeKind.TIMEOUT, error="timeout")
    assert group.snapshot()["r0"].breaker.value == "open"
    clock.now = 1.0
    group.release(stale[0], OutcomeKind.OK, output_tokens=1)  # a late success proves nothing about r0 now
    assert group.snapshot()["r0"].breaker.value == "open"
    clock.now = 10.0
    trial = group.acquire(rng, tried=only_r0)
    assert trial is not None and trial.spec.name == "r0" and trial.trial
    group.release(stale[1], None)  # a late cancel must not free the trial slot
    assert group.acquire(rng, tried=only_r0).spec.name == "r1"  # r0 is taken by its trial
    group.release(stale[2], OutcomeKind.TIMEOUT, error="timeout")  # a late failure: no reopening
    assert group.snapshot()["r0"].breaker.value == "half_open"
    group.release(trial, OutcomeKind.OK, output_tokens=1)
    assert group.snapshot()["r0"].breaker.value == "closed"


def test_a_probe_round_is_cut_to_the_request_deadline() -> None:
    policy = ClientPolicy(initial_latency_s=100, request_timeout_ceiling_s=600, request_deadline_s=1.0)
    specs = [ServerSpec(name="r0", group="8", kind=ServerKind.completion, host="127.0.0.1", port=9000, model="m")]
    clock = FakeClock()
    group = ReplicaGroup("8", specs, policy, clock=clock)  # not built: the plan must probe first
    probe = next(_plan(group, policy, clock))
    assert isinstance(probe, Probe)
    assert probe.timeout_s <= 1.0 and probe.wait_s <= 1.0


def test_a_probe_round_cut_short_by_a_deadline_does_not_grow_the_bound() -> None:
    policy = ClientPolicy(initial_latency_s=3, latency_growing_rate=20, request_timeout_ceiling_s=600)
    specs = [ServerSpec(name="r0", group="8", kind=ServerKind.completion, host="127.0.0.1", port=9000, model="m")]
    group = ReplicaGroup("8", specs, policy, clock=FakeClock())
    silent = [ProbeResult(specs[0], None, error="timeout", timed_out=True)]
    group.apply_probes(silent, timeout_s=0.5)  # the request had 0.5 s left: this says nothing about the bound
    assert group.bound_s == 3
    group.apply_probes(silent, timeout_s=3.0)
    assert group.bound_s == 60


def test_the_latency_bound_grows_no_further_than_latency_bound_max_s() -> None:
    policy = ClientPolicy(initial_latency_s=3, latency_growing_rate=20, latency_bound_max_s=60)
    specs = [ServerSpec(name="r0", group="8", kind=ServerKind.completion, host="127.0.0.1", port=9000, model="m")]
    group = ReplicaGroup("8", specs, policy, clock=FakeClock())
    silent = [ProbeResult(specs[0], None, error="timeout", timed_out=True)]
    for _ in range(4):
        group.apply_probes(silent)
    assert group.bound_s == 60 and group.probe_timeout_s() == 60  # it reached 1200 s and more before the cap
