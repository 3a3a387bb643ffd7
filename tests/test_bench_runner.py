"""The load engine and the fault injector, against in-process fake targets (no sockets)."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

from model_server.bench.arrivals import build_schedule
from model_server.bench.faults import parse_faults
from model_server.bench.injector import FaultInjector, FaultTarget, pid_from_status_file
from model_server.bench.lengths import LengthRange, RequestSource, request_index
from model_server.bench.runner import LoadPlan, Progress, run_load
from model_server.bench.targets import IncompleteStream, StreamPiece
from model_server.errors import BenchError

pytestmark = pytest.mark.timeout(30)


class FakeTarget:
    """Answers ``max_tokens`` pieces at once; hangs the requests whose prompt index is in ``hang``."""

    name = "fake"

    def __init__(self, *, hang=(), fail=(), incomplete=(), gate: asyncio.Event | None = None):
        self.hang, self.fail, self.incomplete = set(hang), set(fail), set(incomplete)
        self.gate = gate
        self.in_flight = 0
        self.max_in_flight = 0
        self.seen: list[int] = []

    async def _stream(self, request):
        index = request_index(request.prompt)
        self.seen.append(index)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if index in self.hang:
                await asyncio.Event().wait()  # never set: only the request timeout ends it
            if index in self.fail:
                raise ConnectionError("refused")
            await asyncio.sleep(0)
            for _ in range(request.max_tokens):
                yield StreamPiece("w ", None, False, "fake-1")
            if index in self.incomplete:
                raise IncompleteStream("the stream ended without a finish_reason")
            yield StreamPiece("", request.max_tokens, True, "fake-1")
        finally:
            self.in_flight -= 1

    def stream(self, request):
        return self._stream(request)

    async def aclose(self):
        pass


def test_open_loop_keeps_its_schedule_while_requests_hang():
    target = FakeTarget(hang={0, 1, 2, 3, 4}, fail={7}, incomplete={8})
    schedule = build_schedule("constant", rate=500.0, requests=100)
    source = RequestSource(prompt_len=LengthRange(4, 4), output_len=LengthRange(3, 3))
    plan = LoadPlan(schedule=schedule, request_timeout_s=1.0)
    outcome = asyncio.run(run_load(target, source, plan))
    records = outcome.records
    assert len(records) == 100 and [r.index for r in records] == list(range(100))
    # every request left although the first five never answered
    assert sorted(target.seen) == list(range(100))
    lags = sorted(r.dispatch_lag_s for r in records)
    assert lags[0] >= 0
    assert lags[94] < 0.05, lags[-10:]  # generous: a loaded 2-core machine
    hung = [r for r in records if r.index < 5]
    assert all(not r.ok and r.error == "timeout after 1s" for r in hung)
    assert records[7].error == "ConnectionError: refused"
    assert records[8].error.startswith("IncompleteStream")
    good = [r for r in records if r.ok]
    assert len(good) == 93
    assert all(r.output_tokens == 3 and r.ttft_s is not None and r.e2e_s >= r.ttft_s for r in good)
    assert {r.server for r in good} == {"fake-1"}


def test_closed_loop_holds_the_concurrency_and_the_count():
    gate = asyncio.Event()
    progress = Progress()

    async def main():
        target = FakeTarget(gate=gate)
        plan = LoadPlan(concurrency=4, requests=50, request_timeout_s=5.0)
        run = asyncio.create_task(
            run_load(target, RequestSource(output_len=LengthRange(2, 2)), plan, progress=progress)
        )
        for _ in range(1000):  # let the workers block on the gate
            if progress.in_flight == 4:
                break
            await asyncio.sleep(0)
        assert progress.in_flight == 4 and progress.sent == 4
        gate.set()
        return target, await run

    target, outcome = asyncio.run(main())
    assert target.max_in_flight == 4
    assert len(outcome.records) == 50 and all(r.ok for r in outcome.records)
    assert progress.done == 50 and progress.failed == 0 and progress.in_flight == 0


def test_closed_loop_by_duration_stops_sending():
    plan = LoadPlan(concurrency=2, duration_s=0.2, request_timeout_s=5.0)
    outcome = asyncio.run(run_load(FakeTarget(), RequestSource(output_len=LengthRange(1, 1)), plan))
    assert outcome.records and all(r.ok for r in outcome.records)
    assert max(r.sent_s for r in outcome.records) < 0.2 + 0.1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "either --rate"),
        ({"concurrency": 2}, "needs --requests N or --duration S"),
        ({"concurrency": 0, "requests": 1}, "--concurrency is 0"),
        ({"concurrency": 1, "requests": 1, "request_timeout_s": 0}, "--timeout"),
    ],
)
def test_bad_plans_are_explained(kwargs, message):
    with pytest.raises(BenchError, match=message):
        LoadPlan(**kwargs)


def test_injector_applies_each_event_at_its_time_and_records_failures():
    now = [100.0]
    sent: list[tuple[int, int]] = []

    async def fake_sleep(seconds):
        now[0] += seconds

    pids = {"a": 4242, "b": None}
    targets = {name: FaultTarget(name, None, (lambda n=name: pids[n])) for name in ("a", "b")}
    events = parse_faults(["10s kill a", "20s stop b for 5s", "12s slow a 3"])
    injector = FaultInjector(events, targets, send_signal=lambda pid, sig: sent.append((pid, sig)))
    applied = asyncio.run(injector.run(100.0, clock=lambda: now[0], sleep=fake_sleep))
    assert [(a.event.describe(), a.applied_s, a.ok) for a in applied] == [
        ("10s kill a", 10.0, True),
        ("12s slow a 3", 12.0, False),
        ("20s stop b", 20.0, False),
        ("25s resume b", 25.0, False),
    ]
    assert sent == [(4242, signal.SIGKILL)]
    assert "no simulator control URL" in applied[1].detail
    assert "no pid known for b" in applied[2].detail
    assert applied[0].as_dict()["spec"] == "10s kill a"
    assert injector.not_applied() == []


def test_pid_from_status_file(tmp_path):
    status = tmp_path / "status.json"
    status.write_text(
        json.dumps({"pipeline": {}, "servers": {"chat-1": {"pid": 123, "state": "READY"}, "chat-2": {"pid": None}}})
    )
    assert pid_from_status_file(status, "chat-1") == 123
    assert pid_from_status_file(status, "chat-2") is None
    assert pid_from_status_file(status, "chat-9") is None
    status.write_text(json.dumps({"servers": [{"name": "x", "pid": 7}]}))  # not the pipeline's format
    assert pid_from_status_file(status, "x") is None
    status.write_text("{not json")
    assert pid_from_status_file(status, "x") is None
    assert pid_from_status_file(tmp_path / "missing.json", "x") is None


def test_a_target_that_does_not_stream_has_no_ttft_or_tpot():
    """One-piece answers: E2E only; TTFT/TPOT are None (not 0), and a TTFT/TPOT objective is never met by them."""
    from model_server.bench.stats import SloPolicy, summarize

    target = FakeTarget()
    target.streams = False
    plan = LoadPlan(concurrency=2, requests=10, request_timeout_s=5.0)
    outcome = asyncio.run(run_load(target, RequestSource(output_len=LengthRange(5, 5)), plan))
    assert all(r.ok and r.output_tokens == 5 and r.e2e_s is not None for r in outcome.records)
    assert all(r.ttft_s is None and r.tpot_s is None for r in outcome.records)
    result = summarize(outcome.records, slo=SloPolicy(tpot_s=10.0))
    assert result["tpot_s"]["count"] == 0 and result["tpot_s"]["p50"] is None
    assert result["ttft_s"]["count"] == 0 and result["e2e_s"]["count"] == 10
    assert result["slo"]["attained"] == 0 and result["slo"]["untimed"] == 10
    # streamed answers keep their token times and meet the same objective
    streamed = asyncio.run(run_load(FakeTarget(), RequestSource(output_len=LengthRange(5, 5)), plan))
    assert summarize(streamed.records, slo=SloPolicy(tpot_s=10.0))["slo"]["attained"] == 10


def test_pending_undos_are_applied_when_the_run_ends():
    """'25s stop a for 10s' in a 1 s run: the SIGCONT is still sent (at the end), the later kill is dropped."""
    sent: list[tuple[int, int]] = []
    targets = {"a": FaultTarget("a", None, lambda: 4242)}
    events = parse_faults(["0.01s stop a for 10s", "20s kill a"])
    injector = FaultInjector(events, targets, send_signal=lambda pid, sig: sent.append((pid, sig)))

    async def main():
        schedule = build_schedule("constant", rate=100.0, requests=20)
        return await run_load(
            FakeTarget(),
            RequestSource(output_len=LengthRange(1, 1)),
            LoadPlan(schedule=schedule, request_timeout_s=5.0),
            injector=injector,
        )

    outcome = asyncio.run(main())
    assert sent == [(4242, signal.SIGSTOP), (4242, signal.SIGCONT)]
    assert [(a.event.action.value, a.ok) for a in outcome.faults] == [("stop", True), ("resume", True)]
    resume = outcome.faults[1]
    assert resume.applied_s < 5.0  # recorded when it was really sent: at the end, not at its scheduled 10 s
    assert [e.describe() for e in outcome.faults_not_applied] == ["20s kill a"]


def test_a_status_file_pid_is_signalled_only_if_it_is_still_that_process(tmp_path):
    import os

    import psutil

    from model_server.bench.injector import StalePid

    me = psutil.Process()
    status = tmp_path / "status.json"
    status.write_text(
        json.dumps(
            {
                "servers": {
                    "same": {"pid": os.getpid(), "create_time": me.create_time()},
                    "reused": {"pid": os.getpid(), "create_time": me.create_time() - 1000.0},
                }
            }
        )
    )
    assert pid_from_status_file(status, "same") == os.getpid()
    with pytest.raises(StalePid):
        pid_from_status_file(status, "reused")
    sent: list[tuple[int, int]] = []
    targets = {n: FaultTarget(n, None, (lambda n=n: pid_from_status_file(status, n))) for n in ("same", "reused")}
    injector = FaultInjector(
        parse_faults(["0s resume same", "0s resume reused"]),
        targets,
        send_signal=lambda pid, sig: sent.append((pid, sig)),
    )
    applied = asyncio.run(injector.apply(injector.events[0], 0.0)), asyncio.run(injector.apply(injector.events[1], 0.0))
    assert sent == [(os.getpid(), signal.SIGCONT)]
    assert applied[0].ok and not applied[1].ok and "StalePid" in applied[1].detail


def test_warm_up_has_a_deadline():
    """A hung warm-up request ends at its timeout (model_server.common.aio.within, on every Python)."""
    from model_server.bench import runner

    target = FakeTarget(hang={-1, -2})

    async def main():
        return await asyncio.wait_for(runner.warm_up(target, RequestSource(output_len=LengthRange(1, 1)), 2, 0.05), 5.0)

    assert asyncio.run(main()) == 0
    assert target.in_flight == 0
