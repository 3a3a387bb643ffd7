"""The load engine against real simulated servers on loopback: rate accuracy, faults, the CLI."""

from __future__ import annotations

import asyncio

import pytest

from model_server.bench.arrivals import build_schedule
from model_server.bench.faults import parse_faults
from model_server.bench.injector import FaultInjector, FaultTarget, pid_listening_on
from model_server.bench.lengths import LengthRange, RequestSource
from model_server.bench.report import build_result
from model_server.bench.runner import LoadPlan, run_load, warm_up
from model_server.bench.targets import OpenAITarget, RawTarget, RoundRobinTarget
from model_server.sim.process import SimProcess

ZERO_LATENCY = ("--ttft-ms", "0", "--tpot-ms", "0", "--ttft-per-prompt-token-ms", "0")


@pytest.fixture
def zero_sim():
    with SimProcess(args=ZERO_LATENCY) as sim:
        yield sim


async def _open_loop(target, rate, requests, *, output_len=1, timeout_s=10.0, injector=None):
    source = RequestSource(prompt_len=LengthRange(8, 8), output_len=LengthRange(output_len, output_len))
    await warm_up(target, source, 2, timeout_s)
    plan = LoadPlan(
        schedule=build_schedule("poisson", rate=rate, requests=requests, seed=5), request_timeout_s=timeout_s
    )
    try:
        return await run_load(target, source, plan, injector=injector)
    finally:
        await target.aclose()


def _rate_check(sim, target, rate, requests):
    outcome = asyncio.run(_open_loop(target, rate, requests))
    result = build_result(outcome, asked_rate=rate)
    assert result["sent"] == requests
    lag = result["dispatch_lag_s"]
    # Within 2% over the steady part of the run (median send lag at the 5th and
    # 95th percentile sends), so one stall of a shared machine does not decide it;
    # a generator that falls behind would show as a growing lag and fail here.
    assert result["steady_rate_ratio"] == pytest.approx(1.0, abs=0.02), lag
    # The plain figure (sent / time of the last send) is looser: the last send alone sets it.
    assert result["achieved_rate"] == pytest.approx(rate, rel=0.10), lag
    assert lag["p50"] < 0.25, lag  # loose: a 2-core machine shared with other test runs
    # No mid-run stall: 99% of sends within 100 ms of their schedule (measured p99 2-5 ms on an idle
    # 2-core machine; a CI run once saw 54 ms, one stall of the shared VM: 50 ms was too tight).
    assert lag["p99"] < 0.1, lag
    p50_ms, p99_ms, max_ms = (lag[k] * 1000 for k in ("p50", "p99", "max"))
    print(f"rate {rate}/s: send lag p50 {p50_ms:.2f} ms, p99 {p99_ms:.2f} ms, max {max_ms:.2f} ms")
    assert result["ok"] >= requests * 0.99, result["errors"]
    # the server saw them all (plus the warm-up requests)
    assert sim.stats()["by_route"]["/v1/chat/completions"] >= requests
    return result


@pytest.mark.timeout(90)
def test_achieved_rate_is_within_2_percent_of_200_per_s(zero_sim):
    """The open-loop generator sends each request on its schedule: 200/s for 6 s against a zero-latency sim.

    What the generator controls is *when each request is sent*; the achieved
    rate (sent / time of the last send) must be within 2% of the asked rate,
    and the typical send close to its scheduled time. Answers are never
    awaited before the next send, so the server's speed does not enter. The
    raw transport is the one for high rates on 2 cores (the openai SDK costs
    ~5x its CPU per request and saturates one core near 200/s).
    """
    _rate_check(zero_sim, RawTarget(zero_sim.base_url, zero_sim.model_name, timeout_s=10.0), 200.0, 1200)


@pytest.mark.timeout(90)
def test_sdk_transport_keeps_a_50_per_s_schedule(zero_sim):
    _rate_check(zero_sim, OpenAITarget(zero_sim.base_url, zero_sim.model_name, timeout_s=10.0), 50.0, 250)


def _windows(outcome):
    """(start, end, kind) of each fault from when the injector really applied it and its undo."""
    applied = outcome.faults
    assert all(a.ok for a in applied), [a.detail for a in applied]
    spans = []
    for on, off in zip(applied[::2], applied[1::2]):
        spans.append((on.applied_s, off.applied_s, on.event.action.value))
    return spans


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", [RawTarget, OpenAITarget])
def test_faults_on_a_schedule_show_in_the_records(transport):
    """500s, malformed bodies, dropped streams and SIGSTOP, applied during a run, each leave their mark."""
    with SimProcess(args=("--ttft-ms", "1", "--tpot-ms", "0.5")) as sim:
        name = f"127.0.0.1:{sim.port}"
        events = parse_faults(
            [
                f"0.4s 503s {name} 1 for 0.4s",
                f"1.0s malformed {name} 1 for 0.4s",
                f"1.6s drop {name} 1 for 0.4s",
                f"2.2s stop {name} for 0.4s",
            ]
        )
        injector = FaultInjector(events, {name: FaultTarget(name, sim.url, lambda: sim.pid)})
        target = transport(sim.base_url, sim.model_name, timeout_s=5.0)
        outcome = asyncio.run(_open_loop(target, 50.0, 150, output_len=4, timeout_s=5.0, injector=injector))
        assert sim.is_alive()
    windows = _windows(outcome)
    assert [w[2] for w in windows] == ["errors", "malformed", "drop", "stop"]
    families = {
        "errors": ("503",),
        "malformed": ("JSONDecodeError",),
        "drop": ("APIConnectionError", "RemoteProtocolError", "RawHTTPError", "IncompleteStream"),
    }
    failed = [r for r in outcome.records if not r.ok]
    seen = {kind for r in failed for kind, marks in families.items() if any(m in r.error for m in marks)}
    errors = sorted({r.error for r in failed})
    assert seen == {"errors", "malformed", "drop"}, errors
    assert all(any(m in r.error for marks in families.values() for m in marks) for r in failed), errors
    first_fault, last_fault = windows[0][0], windows[-1][1]
    assert all(r.ok for r in outcome.records if r.sent_s < first_fault - 0.05 or r.sent_s > last_fault + 0.3)
    if transport is RawTarget:
        # The raw client writes the request as soon as it is sent: each record's
        # send time places it in its window, so the failures line up with them.
        margin = 0.25
        for record in outcome.records:
            inside = [w for w in windows if w[0] + margin <= record.sent_s <= w[1] - margin]
            if not inside:
                continue
            kind, end = inside[0][2], inside[0][1]
            if kind == "stop":  # frozen, not failed: it waits until SIGCONT
                assert record.ok and record.e2e_s >= 0.8 * (end - record.sent_s), record
            else:
                assert not record.ok and any(m in record.error for m in families[kind]), (kind, record)
    assert len(outcome.records) == 150


@pytest.mark.timeout(60)
def test_round_robin_cycles_and_pids_are_found_by_port():
    with SimProcess(args=ZERO_LATENCY) as a, SimProcess(args=ZERO_LATENCY) as b:
        assert pid_listening_on("127.0.0.1", a.port) == a.pid
        assert pid_listening_on("127.0.0.1", b.port) == b.pid
        target = RoundRobinTarget([("a", a.base_url), ("b", b.base_url)], a.model_name, timeout_s=10.0)
        plan = LoadPlan(concurrency=2, requests=40, request_timeout_s=10.0)
        outcome = asyncio.run(_closed(target, plan))
        served = [s.stats()["by_route"].get("/v1/chat/completions", 0) for s in (a, b)]
    assert all(r.ok for r in outcome.records)
    assert served == [20, 20]
    assert sorted({r.server for r in outcome.records}) == ["a", "b"]


async def _closed(target, plan):
    try:
        return await run_load(target, RequestSource(prompt_len=LengthRange(4, 4), output_len=LengthRange(2, 2)), plan)
    finally:
        await target.aclose()


@pytest.mark.timeout(60)
def test_raw_target_reuses_its_connection(zero_sim):
    """Sequential requests go over one kept-alive connection (the body is read to its end)."""
    target = RawTarget(zero_sim.base_url, zero_sim.model_name, timeout_s=10.0)
    plan = LoadPlan(concurrency=1, requests=10, request_timeout_s=10.0)
    outcome = asyncio.run(_closed(target, plan))
    assert all(r.ok for r in outcome.records), [r.error for r in outcome.records]
    assert target.connections_opened <= 2, target.connections_opened
