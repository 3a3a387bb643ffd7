"""One replica's live state: latency normalised per token, degradation, probes."""

from __future__ import annotations

import pytest

from model_server.client.breaker import Breaker, BreakerState
from model_server.client.replica import Endpoint
from model_server.config import ServerKind, ServerSpec

SPEC = ServerSpec(name="r", group="8", kind=ServerKind.completion, host="127.0.0.1", port=9000, model="m")


def _endpoint(factor: float = 3.0, failures: int = 2) -> Endpoint:
    return Endpoint(SPEC, breaker=Breaker(failures, 10.0), ewma_alpha=0.5, degraded_factor=factor)


def test_latency_is_per_output_token_and_the_first_reply_replaces_the_probe_seed() -> None:
    e = _endpoint()
    e.probe_ok(0, elapsed_s=0.05, output_tokens=1)
    assert e.latency_s == pytest.approx(0.05)
    e.start(1)
    e.succeed(1, elapsed_s=1.0, output_tokens=100)
    assert e.latency_s == pytest.approx(0.01)  # not blended with the probe's 0.05
    e.start(2)
    e.succeed(2, elapsed_s=2.0, output_tokens=100)
    assert e.latency_s == pytest.approx(0.015)  # EWMA, alpha 0.5
    assert e.baseline_s == pytest.approx(0.01)


def test_in_flight_counts_and_outcomes() -> None:
    e = _endpoint()
    e.start(0)
    e.start(0)
    assert e.in_flight == 2 and e.attempts == 2
    e.fail(1, "timeout")
    e.reject(1)
    assert e.in_flight == 0 and e.failures == 1 and e.rejected == 1
    assert e.consecutive_failures == 0  # the rejected request proved the replica answers
    e.start(2)
    e.cancel(2)
    assert e.in_flight == 0 and e.successes == 0


def test_much_slower_than_its_own_baseline_is_degraded_and_a_probe_clears_it() -> None:
    e = _endpoint(factor=3.0)
    for t in range(3):
        e.start(t)
        assert not e.succeed(t, elapsed_s=0.1, output_tokens=10)  # 10 ms/token
    e.start(5)
    newly = e.succeed(5, elapsed_s=1.0, output_tokens=10)  # 100 ms/token: EWMA 55 ms > 3 x 10 ms
    assert newly and e.degraded
    e.start(6)
    assert not e.succeed(6, elapsed_s=1.0, output_tokens=10)  # still degraded, not *newly*
    e.probe_ok(7, elapsed_s=0.2, output_tokens=1)
    assert not e.degraded and e.baseline_s is None and e.latency_s == pytest.approx(0.2)


def test_failures_open_the_breaker_and_a_probe_closes_it() -> None:
    e = _endpoint(failures=2)
    for t in range(2):
        e.start(t)
        e.fail(t, "connection error")
    assert e.breaker.state is BreakerState.OPEN and not e.available(5) and e.last_error == "connection error"
    e.probe_failed(6, "refused")
    assert e.breaker.state is BreakerState.OPEN
    e.probe_ok(7, 0.01, 1)
    assert e.breaker.state is BreakerState.CLOSED and e.available(7)


def test_embedding_latency_is_per_request() -> None:
    e = _endpoint()
    e.start(0)
    e.succeed(0, elapsed_s=0.3, output_tokens=None)
    assert e.latency_s == pytest.approx(0.3)
    snap = e.snapshot()
    assert snap.name == "r" and snap.address == "127.0.0.1:9000" and snap.successes == 1


def test_bad_alpha_is_refused() -> None:
    with pytest.raises(ValueError):
        Endpoint(SPEC, breaker=Breaker(), ewma_alpha=0.0, degraded_factor=2.0)


def test_replicas_known_only_from_probes_compete_fairly_with_busy_ones() -> None:
    import random

    from model_server.client.replica_group import ProbeResult, ReplicaGroup
    from model_server.client.retry import OutcomeKind
    from model_server.config import ClientPolicy, RoutingPolicy

    specs = [
        ServerSpec(name=n, group="8", kind=ServerKind.completion, host="127.0.0.1", port=9100 + i, model="m")
        for i, n in enumerate(["busy", "idle", "slow"])
    ]
    now = [0.0]
    group = ReplicaGroup("8", specs, ClientPolicy(routing=RoutingPolicy.fastest), clock=lambda: now[0])
    # probes: 50 ms for a 1-token answer on busy and idle, 500 ms on slow
    group.apply_probes([ProbeResult(specs[0], 0.05, 1), ProbeResult(specs[1], 0.05, 1), ProbeResult(specs[2], 0.5, 1)])
    lease = group.acquire(random.Random(0))
    assert lease.spec.name == "busy"
    now[0] = 0.6  # a 100-token reply in 0.6 s: 6 ms/token, far below the 50 ms/token of a 1-token probe
    group.release(lease, OutcomeKind.OK, output_tokens=100)
    # Unscaled, "busy" (6 ms/token) would beat "idle" (50 ms/token, a probe) forever. Scaled by busy's
    # reply/probe ratio, idle counts as 6 ms/token too (and slow as 60): a tie that in-flight breaks.
    held = group.acquire(random.Random(0))
    assert held.spec.name == "busy"
    assert group.acquire(random.Random(0)).spec.name == "idle"  # busy has one in flight, idle none
    p2c_group = ReplicaGroup("8", specs, ClientPolicy(routing=RoutingPolicy.p2c), clock=lambda: now[0])
    p2c_group.apply_probes(
        [ProbeResult(specs[0], 0.05, 1), ProbeResult(specs[1], 0.05, 1), ProbeResult(specs[2], 0.5, 1)]
    )
    first = p2c_group.acquire(random.Random(1))
    now[0] = 1.2
    p2c_group.release(first, OutcomeKind.OK, output_tokens=100)
    rng = random.Random(3)
    picks = []
    for _ in range(300):
        lease = p2c_group.acquire(rng)
        picks.append(lease.spec.name)
        p2c_group.release(lease, None)
    assert picks.count("slow") == 0
    assert min(picks.count("busy"), picks.count("idle")) > 60  # both fast ones share, busy or not
