"""The client's new pure decisions: deadlines, resume bodies, stream assembly, request checks, stuck routing."""

from __future__ import annotations

import math
import random

import pytest
from _client_sims import chat_chunk

from model_server.client.answer import StreamAssembly, embedding_vectors
from model_server.client.deadlines import (
    StreamTiming,
    attempt_deadlines,
    estimate_tokens,
    first_token_timeout_s,
    stall_timeout_s,
)
from model_server.client.probe import RoundWatch
from model_server.client.replica_group import ProbeResult, ReplicaGroup
from model_server.client.resume import continuation_body, why_no_resume, why_not_resumable
from model_server.client.retry import MalformedResponse, OutcomeKind, StreamEventError
from model_server.client.routing import Candidate, choose
from model_server.client.wire import CHAT_PARAMS, check_params, encode_body, error_message, normalize_embedding_input
from model_server.config import ClientPolicy, RoutingPolicy, ServerKind, ServerSpec
from model_server.errors import InvalidRequestError, UnexpectedAnswerError

POLICY = ClientPolicy()


# ---- deadlines -------------------------------------------------------------------------------


def test_first_token_deadline_follows_the_group_within_floor_and_ceiling() -> None:
    assert first_token_timeout_s(POLICY, None, 0) == POLICY.first_token_timeout_floor_s
    assert first_token_timeout_s(POLICY, 0.04, 0) == 1.0  # 10 x 40 ms is under the 1 s floor
    assert first_token_timeout_s(POLICY, 0.5, 0) == pytest.approx(5.0)
    assert first_token_timeout_s(POLICY, 0.04, 20_000) == pytest.approx(0.4 + 10.0)  # prefill of a long prompt
    assert first_token_timeout_s(POLICY, 100.0, 0) == POLICY.first_token_timeout_ceiling_s


def test_stall_deadline_follows_the_gap_between_chunks() -> None:
    assert stall_timeout_s(POLICY, None) == POLICY.stall_timeout_floor_s
    assert stall_timeout_s(POLICY, 0.004) == POLICY.stall_timeout_floor_s
    assert stall_timeout_s(POLICY, 0.5) == pytest.approx(10.0)
    assert stall_timeout_s(POLICY, 60.0) == POLICY.stall_timeout_ceiling_s


def test_timing_is_seeded_by_probes_then_follows_real_answers() -> None:
    timing = StreamTiming(alpha=0.5)
    timing.seed_ttft([0.3, 0.01, 0.02])
    assert timing.ttft_s == 0.02  # the median probe
    timing.seed_ttft([9.0])
    assert timing.ttft_s == 0.02  # probes seed only once
    timing.observe_ttft(0.1)
    assert timing.ttft_s == pytest.approx(0.06)
    deadlines = attempt_deadlines(POLICY, timing, 0)
    assert deadlines.first_token_s == 1.0 and deadlines.stall_s == POLICY.stall_timeout_floor_s


def test_token_estimates_are_rough_but_grow_with_the_prompt() -> None:
    short = estimate_tokens([{"role": "user", "content": "hi"}])
    long = estimate_tokens([{"role": "user", "content": "word " * 4000}])
    assert short < 10 and 4000 < long < 6000 and estimate_tokens([1, 2, 3]) == 3


# ---- resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"n": 2}, "n = 2"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"regex": "[a-z]+"}, "constrained decoding"),
    ],
)
def test_requests_whose_continuation_is_another_answer_are_not_resumable(extra: dict, reason: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    assert reason in (why_not_resumable("chat", body, POLICY) or "")


def test_plain_requests_resume_unless_turned_off() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "n": 1, "logprobs": False}
    assert why_not_resumable("chat", body, POLICY) is None
    assert "resume_streams = false" in why_not_resumable("chat", body, ClientPolicy(resume_streams=False))
    assert "max_resumes is 0" in why_not_resumable("chat", body, ClientPolicy(max_resumes=0))
    assert why_not_resumable("completion", {"prompt": "Once"}, POLICY) is None
    assert "not a single string" in why_not_resumable("completion", {"prompt": [1, 2]}, POLICY)


def test_the_resume_limit_and_the_budget_stop_resuming() -> None:
    policy = ClientPolicy(max_resumes=2)
    assert why_no_resume(None, 1, policy, True) is None
    assert "max_resumes = 2" in why_no_resume(None, 2, policy, True)
    assert "budget" in why_no_resume(None, 0, policy, False)
    assert why_no_resume("it uses tools", 0, policy, True) == "it uses tools"


def test_a_chat_continuation_appends_the_text_as_an_assistant_message_and_shrinks_max_tokens() -> None:
    original = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "temperature": 0}
    body = continuation_body("chat", original, "Hello there", 2)
    assert body["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there"}]
    assert body["continue_final_message"] is True and body["max_tokens"] == 98 and body["temperature"] == 0
    assert original["messages"] == [{"role": "user", "content": "hi"}] and original["max_tokens"] == 100  # untouched
    again = continuation_body("chat", body, " and more", 3)  # the second resume extends the same message
    assert again["messages"][-1] == {"role": "assistant", "content": "Hello there and more"}
    assert again["max_tokens"] == 95
    assert "max_tokens" not in continuation_body("chat", {"messages": [{"role": "user", "content": "x"}]}, "a", 1)


def test_a_completion_continuation_extends_the_prompt() -> None:
    body = continuation_body("completion", {"prompt": "Once upon", "max_tokens": 10}, " a time", 2)
    assert body == {"prompt": "Once upon a time", "max_tokens": 8}


# ---- the stream assembly ---------------------------------------------------------------------


def test_a_resumed_stream_sums_completion_tokens_and_counts_the_prompt_once() -> None:
    a = StreamAssembly()
    a.begin_segment()
    assert a.take(chat_chunk(role=True, usage=(10, 0))) == "" and not a.progressed
    assert a.take(chat_chunk("Hello", usage=(10, 1))) == "Hello" and a.progressed
    assert a.take(chat_chunk(" world", usage=(10, 2))) == " world"
    assert a.tokens == 2
    a.begin_segment()  # a replica broke; another continues (its prompt includes the text so far)
    a.take(chat_chunk(role=True, usage=(13, 0)))
    a.take(chat_chunk(" again", usage=(13, 1)))
    a.take(chat_chunk(None, finish="stop", usage=(13, 1)))
    assert a.text == "Hello world again" and a.tokens == 3 and a.segment_tokens_so_far == 1
    completion = a.chat_completion()
    assert completion.choices[0].message.content == "Hello world again"
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        10,
        3,
        13,
    )


def test_without_usage_tokens_are_counted_by_text_chunks() -> None:
    a = StreamAssembly()
    a.begin_segment()
    for piece in ("a", " b", " c"):
        a.take(chat_chunk(piece))
    assert a.tokens == 3 and a.usage() is None and a.chat_completion().usage is None


def test_a_restart_forgets_what_never_reached_the_caller() -> None:
    a = StreamAssembly()
    a.begin_segment()
    a.take(
        {"id": "c", "choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}], "usage": {"completion_tokens": 5}}
    )
    assert a.progressed and a.text == ""
    a.restart()
    a.begin_segment()
    a.take(chat_chunk("x", usage=(4, 1)))
    assert a.tokens == 1 and a.chat_completion().choices[0].message.content == "x"


def test_error_events_and_garbage_are_the_replicas_fault() -> None:
    a = StreamAssembly()
    a.begin_segment()
    with pytest.raises(StreamEventError):
        a.take({"error": {"message": "scheduler died", "code": 500}})
    for bad in ([], {"choices": "x"}, {"choices": [{"index": 0, "delta": {"content": 5}}]}):
        with pytest.raises(MalformedResponse):
            a.take(bad)


def test_several_choices_are_assembled_by_the_sdk_accumulator() -> None:
    a = StreamAssembly(rich=True)
    a.begin_segment()
    for index, text in ((0, "a"), (1, "b"), (0, "c")):
        event = chat_chunk(text)
        event["choices"][0]["index"] = index
        assert a.take(event) == (text if index == 0 else "")
    completion = a.chat_completion()
    assert [c.message.content for c in completion.choices] == ["ac", "b"]


def test_an_embedding_answer_of_another_count_is_not_the_replicas_fault() -> None:
    good = {"data": [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1.0, 0.0]}]}
    assert embedding_vectors(good, 2) == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(UnexpectedAnswerError):
        embedding_vectors(good, 3)
    with pytest.raises(MalformedResponse):
        embedding_vectors({"data": [{"index": 0, "embedding": []}]}, 1)


# ---- the caller's arguments, checked at the edge ----------------------------------------------


@pytest.mark.parametrize(
    ("body", "argument"),
    [
        ({"messages": [{"role": "user", "content": object()}]}, "messages"),
        ({"temperature": math.nan}, "temperature"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
        ({"extra": {1, 2}}, "extra"),
    ],
)
def test_bodies_no_server_could_read_are_refused_with_the_argument_named(body: dict, argument: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        encode_body(body, "chat")
    assert info.value.argument == argument and argument in str(info.value)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_unknown_and_reserved_parameters_are_named() -> None:
    with pytest.raises(InvalidRequestError, match="'temprature'"):
        check_params({"temprature": 0}, CHAT_PARAMS, "chat")
    with pytest.raises(InvalidRequestError, match="stream"):
        check_params({"stream": True}, CHAT_PARAMS, "chat")
    with pytest.raises(InvalidRequestError, match="extra_body must be a dict"):
        check_params({"extra_body": [1]}, CHAT_PARAMS, "chat")
    check_params({"temperature": 0, "extra_body": {"top_k": 5}}, CHAT_PARAMS, "chat")


def test_embedding_inputs_are_normalised_as_the_openai_api_defines_them() -> None:
    assert normalize_embedding_input("a") == (["a"], True)
    assert normalize_embedding_input([1, 2, 3]) == ([[1, 2, 3]], True)  # token ids: ONE input
    assert normalize_embedding_input(["a", "b"]) == (["a", "b"], False)
    assert normalize_embedding_input([[1, 2], [3]]) == ([[1, 2], [3]], False)
    for bad in (None, [], ["a", 1], [True], 3.5, [[]]):
        with pytest.raises(InvalidRequestError):
            normalize_embedding_input(bad)


def test_error_bodies_of_every_shape_give_their_message() -> None:
    assert error_message({"object": "error", "message": "flat", "code": 400}, "x") == "flat"
    assert error_message({"error": {"message": "nested"}}, "x") == "nested"
    assert error_message({"error": "Unauthorized"}, "x") == "Unauthorized"
    assert error_message("not json", "raw text") == "raw text"


# ---- stuck replicas and the ones that come back ------------------------------------------------


def test_a_stuck_replica_comes_after_every_moving_one_tried_or_not() -> None:
    rng = random.Random(0)
    candidates = [Candidate("flaky", 0.01, 0), Candidate("hung", 0.01, 1, stuck=True)]
    assert choose(candidates, RoutingPolicy.p2c, rng, tried={"flaky"}) == 0
    assert choose([Candidate("hung", 0.01, 1, stuck=True)], RoutingPolicy.fastest, rng) == 0  # still usable alone


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _specs(n: int) -> list[ServerSpec]:
    return [
        ServerSpec(name=f"r{i}", group="8", kind=ServerKind.completion, host="127.0.0.1", port=9000 + i, model="m")
        for i in range(n)
    ]


def test_a_request_waiting_past_half_its_deadline_marks_its_replica_stuck() -> None:
    clock = _Clock()
    group = ReplicaGroup("8", _specs(2), ClientPolicy(routing=RoutingPolicy.fastest), clock=clock)
    group.apply_probes([ProbeResult(s, 0.01, output_tokens=1) for s in group.specs])
    rng = random.Random(0)
    hung = group.acquire(rng)
    assert hung is not None and hung.spec.name == "r0"
    clock.now = 0.6  # the first-token deadline is 1 s: past half of it
    assert group.acquire(rng).spec.name == "r1"
    group.first_token(hung, 0.6)  # it answers after all: no longer stuck, first in table order again
    assert group.acquire(rng).spec.name == "r0"


def test_replicas_that_never_answered_are_reprobed_and_come_back() -> None:
    clock = _Clock()
    specs = _specs(3)
    group = ReplicaGroup("8", specs, ClientPolicy(reprobe_interval_s=5), clock=clock)
    group.apply_probes(
        [
            ProbeResult(specs[0], 0.01, 1),
            ProbeResult(specs[1], 0.01, 1),
            ProbeResult(specs[2], None, error="timeout", timed_out=True),
        ]
    )
    lease = group.acquire(random.Random(0), tried={"r2"})
    assert group.release(lease, OutcomeKind.OK, output_tokens=4)  # r2 never answered: a re-probe is due
    assert group.wants_reprobe() and group.try_start_reprobe()
    group.apply_probes([ProbeResult(s, 0.02, 1) for s in specs])
    group.end_reprobe()
    assert group.snapshot()["r2"].latency_s == pytest.approx(0.02) and not group.wants_reprobe()
    lease = group.acquire(random.Random(0))
    clock.now = 1.0
    assert not group.release(lease, OutcomeKind.OK, output_tokens=4)  # nothing missing: no more re-probes


def test_a_probe_round_that_ended_early_says_nothing_of_the_replicas_still_probing() -> None:
    specs = _specs(2)
    group = ReplicaGroup("8", specs, ClientPolicy(), clock=_Clock())
    group.apply_probes([ProbeResult(specs[0], 0.01, 1), ProbeResult(specs[1], None, error="x", pending=True)])
    snap = group.snapshot()["r1"]
    assert snap.latency_s is None and snap.consecutive_failures == 0 and snap.last_error is None


def _specs(n: int):
    return [
        ServerSpec(name=f"r{i}", group="8", kind=ServerKind.completion, host="127.0.0.1", port=9000 + i, model="m")
        for i in range(n)
    ]


def test_a_probe_round_ends_soon_after_the_first_good_answer() -> None:
    specs = _specs(3)
    watch = RoundWatch(specs, timeout_s=10, connect_timeout_s=3, suspects=(), patient=False, now=0.0)
    assert watch.left_s(0.0) == 14.0  # the bound, the connect time and a second of slack
    assert not watch.stop_after([ProbeResult(specs[0], 0.2, output_tokens=1)], specs[1:], now=0.2)
    assert watch.left_s(0.2) == 0.2  # as long again as the fastest answer took
    assert watch.unfinished(specs[2]).pending  # cut short: nothing learned of it, not a timeout


def test_a_probe_round_stops_when_only_suspects_are_left_but_a_patient_one_waits() -> None:
    specs = _specs(2)
    refused = [ProbeResult(specs[0], None, error="connection error: refused")]
    hasty = RoundWatch(specs, timeout_s=10, connect_timeout_s=3, suspects={"r1"}, patient=False, now=0.0)
    assert hasty.stop_after(refused, specs[1:], now=0.1)
    patient = RoundWatch(specs, timeout_s=10, connect_timeout_s=3, suspects={"r1"}, patient=True, now=0.0)
    assert not patient.stop_after(refused, specs[1:], now=0.1)
    assert patient.unfinished(specs[1]).timed_out  # waited the whole bound: a real timeout
