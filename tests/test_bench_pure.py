"""Pure parts of the benchmark: arrivals, lengths, statistics, fault schedules, result shape."""

from __future__ import annotations

import json
import math
import re
import signal
import statistics
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import model_server.bench as bench
from model_server.bench.arrivals import ArrivalKind, build_schedule, read_trace
from model_server.bench.faults import ServerAction, parse_duration_s, parse_fault, parse_faults
from model_server.bench.lengths import (
    LengthRange,
    RequestSource,
    load_dataset,
    parse_length,
    request_index,
    synthetic_prompt,
)
from model_server.bench.report import build_result, result_lines, result_table, write_json
from model_server.bench.runner import RunOutcome
from model_server.bench.stats import RequestRecord, SloPolicy, percentile, summarize, summarize_values, within
from model_server.errors import BenchError

# ---- arrivals -------------------------------------------------------------------------


def _gaps(offsets):
    return [b - a for a, b in zip((0.0, *offsets), offsets)]


@pytest.mark.parametrize("kind", ["poisson", "gamma", "constant"])
def test_schedule_offers_exactly_the_asked_rate(kind):
    schedule = build_schedule(kind, rate=200.0, requests=1000, cv=2.0, seed=7)
    assert len(schedule) == 1000
    assert schedule.rate == pytest.approx(200.0, rel=1e-12)
    assert schedule.duration_s == pytest.approx(5.0)
    assert all(b >= a for a, b in zip(schedule.offsets_s, schedule.offsets_s[1:]))
    assert schedule.offsets_s[0] > 0


def test_poisson_gaps_have_cv_one_and_gamma_has_the_asked_cv():
    poisson = _gaps(build_schedule("poisson", rate=100, requests=20000, seed=1).offsets_s)
    bursty = _gaps(build_schedule("gamma", rate=100, requests=20000, cv=3.0, seed=1).offsets_s)
    constant = _gaps(build_schedule("constant", rate=100, requests=100).offsets_s)
    cv = lambda gaps: statistics.pstdev(gaps) / statistics.fmean(gaps)  # noqa: E731
    assert cv(poisson) == pytest.approx(1.0, abs=0.05)
    assert cv(bursty) == pytest.approx(3.0, rel=0.15)
    assert cv(constant) == pytest.approx(0.0, abs=1e-9)


def test_schedules_are_seeded():
    a = build_schedule("poisson", rate=50, requests=100, seed=3)
    b = build_schedule("poisson", rate=50, requests=100, seed=3)
    c = build_schedule("poisson", rate=50, requests=100, seed=4)
    assert a == b
    assert a != c


def test_trace_keeps_its_gaps_and_can_be_rescaled(tmp_path):
    trace = tmp_path / "arrivals.csv"
    trace.write_text("time_s,extra\n100.0,x\n100.5,y\n# comment\n\n101.0\n102.0\n", encoding="utf-8")
    times = read_trace(trace)
    assert times == (100.0, 100.5, 101.0, 102.0)
    own = build_schedule("trace", rate=None, requests=None, trace=times)
    # the first arrival one mean gap (2/3 s) after the start, then the trace's own gaps
    assert own.offsets_s == pytest.approx((2 / 3, 2 / 3 + 0.5, 2 / 3 + 1.0, 2 / 3 + 2.0))
    faster = build_schedule("trace", rate=own.rate * 2, requests=None, trace=times)
    assert faster.offsets_s == pytest.approx(tuple(t / 2 for t in own.offsets_s))
    first3 = build_schedule("trace", rate=None, requests=3, trace=times)
    assert len(first3) == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds 0 arrival"),
        ("1.0\n", "holds 1 arrival"),
        ("1\nabc\n", "line 2: 'abc' is not a number"),
        ("3\n3\n", "all arrival times are equal"),
    ],
)
def test_bad_trace_files_are_named(tmp_path, text, message):
    trace = tmp_path / "t.txt"
    trace.write_text(text, encoding="utf-8")
    with pytest.raises(BenchError, match=re.escape(message)):
        read_trace(trace)


def test_missing_trace_and_bad_rates_are_clear(tmp_path):
    with pytest.raises(BenchError, match="cannot read it"):
        read_trace(tmp_path / "nope.txt")
    with pytest.raises(BenchError, match="--rate is 0"):
        build_schedule("poisson", rate=0, requests=10)
    with pytest.raises(BenchError, match="needs --trace FILE"):
        build_schedule(ArrivalKind.trace, rate=1, requests=10)
    with pytest.raises(BenchError, match="--requests is 0"):
        build_schedule("poisson", rate=1, requests=0)
    with pytest.raises(BenchError, match="--cv"):
        build_schedule("gamma", rate=1, requests=3, cv=-1)


@settings(max_examples=60, deadline=None)
@given(st.floats(0.1, 5000), st.integers(1, 500), st.sampled_from(["poisson", "gamma", "constant"]), st.integers(0, 10))
def test_any_schedule_is_sorted_and_ends_at_n_over_rate(rate, n, kind, seed):
    s = build_schedule(kind, rate=rate, requests=n, cv=1.5, seed=seed)
    assert len(s) == n
    assert s.offsets_s[-1] == pytest.approx(n / rate)
    assert all(b >= a for a, b in zip(s.offsets_s, s.offsets_s[1:]))


# ---- lengths ---------------------------------------------------------------------------


def test_parse_length_fixed_and_range():
    assert parse_length("128", option="--prompt-len") == LengthRange(128, 128)
    assert parse_length(" 64:256 ", option="--prompt-len") == LengthRange(64, 256)
    for bad in ("abc", "0", "5:2", "1:2:3", ""):
        with pytest.raises(BenchError, match=r"--output-len is"):
            parse_length(bad, option="--output-len")


def test_synthetic_prompts_have_the_asked_word_count_and_differ():
    from model_server.sim.text import count_tokens  # the sim's tokenizer: one token per plain word

    for words in (1, 2, 17, 128):
        prompt = synthetic_prompt(words, 42)
        assert len(prompt.split()) == words
        assert count_tokens(prompt) == words
    assert synthetic_prompt(5, 1) != synthetic_prompt(5, 2)
    for index in (0, 1, 25, 26, 42, 10**6, -1, -30):  # warm-ups are negative
        assert request_index(synthetic_prompt(3, index)) == index
    assert request_index("hello there") is None and request_index("r42 x") is None and request_index("") is None


def test_request_source_uniform_is_seeded_and_in_range():
    a = [
        RequestSource(prompt_len=LengthRange(10, 20), output_len=LengthRange(1, 5), seed=9).make(i) for i in range(200)
    ]
    b = [
        RequestSource(prompt_len=LengthRange(10, 20), output_len=LengthRange(1, 5), seed=9).make(i) for i in range(200)
    ]
    assert a == b
    assert {r.max_tokens for r in a} == {1, 2, 3, 4, 5}
    assert min(r.prompt_words for r in a) >= 10 and max(r.prompt_words for r in a) <= 20
    assert len({r.prompt_words for r in a}) > 5


def test_dataset_lines_and_default_output_len(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hello there", "output_len": 7}\n\n{"prompt": "second"}\n', encoding="utf-8")
    rows = load_dataset(data)
    assert rows == (("hello there", 7), ("second", None))
    source = RequestSource(dataset=rows, output_len=LengthRange(33, 33))
    made = [source.make(i) for i in range(3)]
    assert [(r.prompt, r.max_tokens) for r in made] == [("hello there", 7), ("second", 33), ("hello there", 7)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json\n", "line 1: not valid JSON"),
        ('{"x": 1}\n', 'line 1: needs a non-empty string field "prompt"'),
        ('{"prompt": "a", "output_len": 0}\n', '"output_len" is 0'),
        ("\n", "has no requests"),
    ],
)
def test_bad_dataset_lines_are_named(tmp_path, text, message):
    data = tmp_path / "d.jsonl"
    data.write_text(text, encoding="utf-8")
    with pytest.raises(BenchError, match=re.escape(message)):
        load_dataset(data)


# ---- statistics -------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy():
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([5.0], 99) == 5.0
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 100.0
    with pytest.raises(ValueError):
        percentile([], 50)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1e3), min_size=1, max_size=200), st.floats(0, 100))
def test_percentile_matches_numpy(values, q):
    numpy = pytest.importorskip("numpy")
    assert percentile(sorted(values), q) == pytest.approx(float(numpy.percentile(values, q)), rel=1e-9, abs=1e-9)


def _record(i, sent, ttft, e2e, tokens, ok=True, error=None, scheduled=None):
    return RequestRecord(
        i,
        scheduled_s=scheduled,
        sent_s=sent,
        first_token_s=sent + ttft if ttft is not None else None,
        done_s=sent + e2e,
        output_tokens=tokens,
        ok=ok,
        error=error,
    )


def test_record_ttft_tpot_e2e():
    r = _record(0, sent=1.0, ttft=0.1, e2e=1.1, tokens=11, scheduled=0.99)
    assert r.ttft_s == pytest.approx(0.1)
    assert r.e2e_s == pytest.approx(1.1)
    assert r.tpot_s == pytest.approx(0.1)  # (1.1 - 0.1) / (11 - 1)
    assert r.dispatch_lag_s == pytest.approx(0.01)
    assert _record(1, 0, 0.1, 0.1, tokens=1).tpot_s is None


def test_summary_counts_rates_slo_and_goodput():
    records = [
        _record(0, 0.0, 0.1, 1.0, 10),  # tpot 0.1
        _record(1, 1.0, 0.5, 1.4, 10),  # ttft misses 0.2
        _record(2, 2.0, 0.1, 2.1, 11),  # tpot 0.2 misses 0.15
        _record(3, 3.0, 0.05, 0.05, 1),  # one token: no tpot, meets
        _record(4, 4.0, None, 0.5, 0, ok=False, error="InternalServerError 500"),
    ]
    result = summarize(records, asked_rate=1.0, slo=SloPolicy(ttft_s=0.2, tpot_s=0.15))
    assert (result["sent"], result["ok"], result["failed"]) == (5, 4, 1)
    assert result["achieved_rate"] == pytest.approx(5 / 4.0)  # 5 sent, the last at 4.0 s
    assert result["wall_s"] == pytest.approx(4.5)
    assert result["output_tokens"] == 32
    assert result["output_tokens_per_s"] == pytest.approx(32 / 4.5)
    assert result["requests_per_s"] == pytest.approx(4 / 4.5)
    assert result["slo"]["attained"] == 2
    assert result["slo"]["attainment"] == pytest.approx(2 / 5)
    assert result["slo"]["goodput_rps"] == pytest.approx(2 / 4.5)
    assert result["errors"] == {"InternalServerError 500": 1}
    assert result["ttft_s"]["count"] == 4 and result["ttft_s"]["max"] == pytest.approx(0.5)
    assert result["tpot_s"]["count"] == 3
    assert result["e2e_s"]["p50"] == pytest.approx(1.2)
    no_slo = summarize(records)
    assert no_slo["slo"]["attained"] == 4  # without objectives every ok request meets them


def test_empty_summaries_are_none_not_errors():
    assert summarize_values([None, math.nan]).p99 is None
    result = summarize([])
    assert result["sent"] == 0 and result["achieved_rate"] is None and result["e2e_s"]["p50"] is None


def test_within_selects_by_send_time():
    records = [_record(i, float(i), 0.1, 0.2, 2) for i in range(10)]
    assert [r.index for r in within(records, 2.0, 5.0)] == [2, 3, 4]


# ---- faults -----------------------------------------------------------------------------


def test_durations():
    assert parse_duration_s("10") == 10.0
    assert parse_duration_s("10s") == 10.0
    assert parse_duration_s("500ms") == 0.5
    assert parse_duration_s("1.5m") == 90.0
    with pytest.raises(ValueError):
        parse_duration_s("ten")


def test_fault_kinds_and_their_effects():
    (kill,) = parse_fault("10s kill chat-1")
    assert (kill.at_s, kill.action, kill.server, kill.signal) == (10.0, ServerAction.kill, "chat-1", signal.SIGKILL)
    assert kill.sim_faults() is None
    (stop,) = parse_fault("20 stop chat-2")
    assert stop.signal == signal.SIGSTOP
    (resume,) = parse_fault("25s cont chat-2")
    assert resume.action is ServerAction.resume and resume.signal == signal.SIGCONT
    (errors,) = parse_fault("5s 503s chat-3 0.5")
    assert errors.sim_faults() == {"error_rate": 0.5, "error_status": 503} and errors.signal is None
    assert parse_fault("5s 500s chat-3")[0].sim_faults() == {"error_rate": 1.0, "error_status": 500}
    assert parse_fault("1s slow chat-1")[0].sim_faults() == {"slow_factor": 10.0}
    assert parse_fault("1s slow chat-1 4")[0].sim_faults() == {"slow_factor": 4.0}
    assert parse_fault("1s hang chat-1")[0].sim_faults() == {"hang": True}
    assert parse_fault("1s malformed chat-1 0.2")[0].sim_faults() == {"malformed_rate": 0.2}
    assert parse_fault("1s drop chat-1")[0].sim_faults() == {"drop_stream_rate": 1.0}
    assert parse_fault("1s heal chat-1")[0].sim_faults() == {}


def test_for_duration_adds_the_undo_event():
    stop, resume = parse_fault("20s stop chat-2 for 5s")
    assert (resume.at_s, resume.action) == (25.0, ServerAction.resume)
    hang, unhang = parse_fault("1s hang a for 500ms")
    assert unhang.at_s == 1.5 and unhang.sim_faults() == {"hang": False}
    slow, unslow = parse_fault("2s slow a 8 for 1s")
    assert unslow.sim_faults() == {"slow_factor": 1.0}
    errors, no_errors = parse_fault("2s 502s a 0.3 for 1s")
    assert no_errors.sim_faults() == {"error_rate": 0.0, "error_status": 502}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("kill chat-1", "at least a time"),
        ("x kill a", "not a duration"),
        ("1s explode a", "'explode' is not a fault action"),
        ("1s kill a for 3s", "'kill' cannot be given a duration"),
        ("1s 500s a 2", "not a share between 0 and 1"),
        ("1s slow a 0", "must be positive"),
        ("1s kill a 3", "'3' is not understood"),
    ],
)
def test_bad_fault_specs_explain_the_grammar(spec, message):
    with pytest.raises(BenchError) as info:
        parse_fault(spec)
    text = str(info.value)
    assert message in text and "<time> <action> <server>" in text and spec in text


def test_fault_schedule_is_sorted_and_checks_server_names():
    events = parse_faults(["20s stop b for 5s", "10s kill a"], servers=["a", "b"])
    assert [(e.at_s, e.action.value) for e in events] == [(10.0, "kill"), (20.0, "stop"), (25.0, "resume")]
    with pytest.raises(BenchError, match="names server 'c'.*The servers are: a, b"):
        parse_faults(["1s kill c"], servers=["a", "b"])


# ---- result shape -----------------------------------------------------------------------


def test_result_json_shape_and_table(tmp_path):
    records = [_record(i, i * 0.01, 0.002, 0.01, 8, scheduled=i * 0.01) for i in range(1, 101)]
    outcome = RunOutcome(records=records, faults=[], wall_s=1.01)
    result = build_result(outcome, asked_rate=100.0, slo=SloPolicy(ttft_s=0.1), run={"mode": "open"})
    path = write_json(result, tmp_path / "out" / "r.json")
    data = json.loads(path.read_text())
    for key in ("ok", "failed", "achieved_rate"):
        assert key in data
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        assert set(data[key]) >= {"p50", "p90", "p99", "max"}
    assert data["achieved_rate"] == pytest.approx(100.0)
    assert data["run"] == {"mode": "open"} and data["faults"] == []
    table = result_table(data)
    assert [c.header for c in table.columns][:2] == ["metric", "p50 ms"]
    lines = result_lines(data)
    assert lines[0] == "requests: ok 100, failed 0, sent 100"
    assert "achieved 100.0/s" in lines[1] and "SLO (TTFT <= 0.1 s" in lines[2]


def test_public_names_are_pinned():
    pinned = (
        "ArrivalKind ArrivalSchedule BenchError BenchRequest FaultEvent FaultInjector FaultTarget LengthRange LoadPlan "
        "ModelServerTarget OpenAITarget Progress RawTarget RequestRecord RequestSource RoundRobinTarget RunOutcome "
        "ServerAction SloPolicy StreamPiece Target build_result build_schedule load_dataset parse_faults parse_length "
        "read_trace result_table run_load summarize write_json"
    )
    assert sorted(bench.__all__) == sorted(pinned.split())
    for name in bench.__all__:
        assert hasattr(bench, name)


def test_light_modules_do_not_load_the_http_stack():
    """The CLI imports bench.options at every start: it (and chaos) must not pull in httpx or openai."""
    code = (
        "import sys, model_server.bench.options, model_server.bench.chaos; "
        "print(sorted(m for m in ('httpx', 'openai', 'model_server.bench.targets') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_cli_defaults_are_the_options_defaults():
    import typer.main

    from model_server.bench.options import BenchOptions
    from model_server.cli import app

    command = typer.main.get_command(app).commands["bench"]
    given = {param.name: param.default for param in command.params}
    o = BenchOptions()
    fields = ("transport", "prompt_len", "output_len", "arrival", "cv", "timeout", "seed", "warmup")
    assert tuple(given[f] for f in fields) == (
        o.transport, o.prompt_len, o.output_len, o.arrival, o.cv, o.timeout_s, o.seed, o.warmup_requests
    )  # fmt: skip


def test_raw_pool_brackets_an_ipv6_host_header():
    from model_server.bench.rawhttp import RawPool

    assert RawPool("http://[::1]:30000/v1").host_header == b"[::1]:30000"
    assert RawPool("http://127.0.0.1:30000/v1").host_header == b"127.0.0.1:30000"


def test_steady_rate_ratio_ignores_one_stall_but_sees_falling_behind():
    from model_server.bench.stats import steady_rate_ratio

    on_time = [RequestRecord(i, scheduled_s=i * 0.01, sent_s=i * 0.01 + 0.001) for i in range(1000)]
    assert steady_rate_ratio(on_time) == pytest.approx(1.0)
    stalled = [
        RequestRecord(r.index, scheduled_s=r.scheduled_s, sent_s=r.sent_s + (0.5 if r.index == 990 else 0))
        for r in on_time
    ]
    assert steady_rate_ratio(stalled) == pytest.approx(1.0)
    # the plain figure sees the stall
    assert summarize(stalled)["achieved_rate"] < 0.97 * summarize(on_time)["achieved_rate"]
    behind = [RequestRecord(i, scheduled_s=i * 0.01, sent_s=i * 0.0105) for i in range(1000)]  # 5% slower throughout
    assert steady_rate_ratio(behind) == pytest.approx(1 / 1.05, rel=1e-3)
    assert steady_rate_ratio(on_time[:50]) is None


# ---- chaos schedule ---------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5))
def test_chaos_schedule_always_leaves_one_replica_healthy(seed, replicas):
    from model_server.bench.chaos import CHAOS_KINDS, chaos_schedule, healthy_at

    faults = chaos_schedule(seed, replicas, duration_s=40.0, recovery_s=4.0)
    assert faults == chaos_schedule(seed, replicas, duration_s=40.0, recovery_s=4.0)  # seeded
    assert all(1.0 < f.at_s < f.heal_s <= 40.0 and 0 <= f.replica < replicas for f in faults)
    for t in [i * 0.05 for i in range(800)]:
        assert healthy_at(faults, replicas, t, recovery_s=4.0), t
    # a replica never gets a second fault before it is back
    for a in faults:
        for b in faults:
            if a is not b and a.replica == b.replica and a.at_s < b.at_s:
                assert b.at_s >= a.heal_s + (4.0 if a.kind == "kill" else 0.5)
    assert {f.kind for f in faults} == set(CHAOS_KINDS)  # 40 s is room for every kind


# ---- options -> run (no network) --------------------------------------------------------


def test_session_builds_plans_and_fault_targets_from_options(tmp_path):
    from model_server.bench.session import BenchOptions, BenchSession, control_url_of, url_server_name

    assert url_server_name("http://127.0.0.1:30000/v1") == "127.0.0.1:30000"
    assert control_url_of("http://127.0.0.1:30000/v1") == "http://127.0.0.1:30000"
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[launch]\nstatus_file = "%s"\n' % (tmp_path / "status.json")
        + "".join(
            f'[[servers]]\nname = "c{i}"\ngroup = "8"\nkind = "completion"\nhost = "127.0.0.1"\n'
            f'port = {9000 + i}\nmodel = "m"\n'
            for i in (1, 2)
        ),
        encoding="utf-8",
    )
    (tmp_path / "status.json").write_text(json.dumps({"servers": {"c1": {"pid": 4321, "state": "READY"}}}))
    open_loop = BenchSession(
        BenchOptions(config=fleet, group="8", rate=50.0, duration_s=2.0, faults=("1s kill c1", "1.5s slow c2 3"))
    )
    assert open_loop.plan.mode == "open" and len(open_loop.plan.schedule) == 100
    assert sorted(open_loop.fault_targets) == ["c1", "c2"]
    assert open_loop.fault_targets["c1"].pid() == 4321  # from the pipeline's status file
    assert open_loop.fault_targets["c2"].control_url == "http://127.0.0.1:9002"
    assert [e.describe() for e in open_loop.events] == ["1s kill c1", "1.5s slow c2 3"]
    closed = BenchSession(BenchOptions(url="http://127.0.0.1:9/v1", model="m", concurrency=3, requests=7))
    assert (closed.plan.mode, closed.plan.concurrency, closed.plan.expected_requests) == ("closed", 3, 7)
    assert closed.run_description()["transport"] == "sdk"
    trace = tmp_path / "trace.txt"
    trace.write_text("\n".join(str(t * 0.5) for t in range(11)))  # 0 .. 5 s
    traced = BenchSession(
        BenchOptions(url="http://127.0.0.1:9/v1", model="m", arrival="trace", trace=trace, duration_s=2.0)
    )
    assert len(traced.plan.schedule) == 5  # the arrivals in the first 2 s
    with pytest.raises(BenchError, match="there is no group '9'"):
        BenchSession(BenchOptions(config=fleet, group="9", rate=1.0, requests=1))
    with pytest.raises(BenchError, match="not both"):
        BenchSession(BenchOptions(url="http://h:1/v1", model="m", rate=1.0, requests=1, duration_s=1.0))
    with pytest.raises(BenchError, match="--transport raw speaks plain http only"):
        BenchSession(BenchOptions(url="https://h:1/v1", model="m", rate=1.0, requests=1, transport="raw"))
