"""Edges of streamed answers, offline: replicas as httpx mock transports that send exactly the bytes a test needs.

Each test pins a finding of the review of the streams work and failed before its fix.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from _client_sims import MESSAGES, chat_chunk, fleet_of, sims_running

from model_server.client import ModelServer, RequestRejectedError, StreamInterruptedError
from model_server.client.replica_group import ProbeResult, ReplicaGroup
from model_server.client.retry import OutcomeKind
from model_server.config import ClientPolicy, ServerKind, ServerSpec

DONE = b"data: [DONE]\n\n"


def _event(content: str | None = None, **fields) -> bytes:
    return b"data: " + json.dumps(chat_chunk(content, **fields)).encode() + b"\n\n"


def _error_event(code: int, message: str) -> bytes:
    return b"data: " + json.dumps({"error": {"message": message, "code": code}}).encode() + b"\n\n"


class Replicas:
    """port -> a function of the request body giving the events to send (or an httpx.Response)."""

    def __init__(self, **by_port: Callable[[dict], object]) -> None:
        self.by_port = {int(k.removeprefix("p")): v for k, v in by_port.items()}
        self.bodies: list[tuple[int, dict]] = []

    def transport(self) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            body = json.loads(request.content)
            self.bodies.append((request.url.port, body))
            answer = self.by_port[request.url.port](body)
            if isinstance(answer, httpx.Response):
                return answer
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=iter(answer))

        return httpx.MockTransport(handler)


def _broken_after(events: list[bytes]) -> Iterator[bytes]:
    yield from events
    raise httpx.ReadError("connection reset by peer")


def _fastest_first(specs, timeout_s, **kwargs):
    """Probes that find the group up, its first replica the fastest."""
    return [ProbeResult(s, 0.01 * (i + 1), output_tokens=1) for i, s in enumerate(specs)]


def _client(replicas: Replicas, **policy) -> ModelServer:
    fleet = fleet_of(
        {"8": ("completion", [1, 2])}, routing="fastest", retry_backoff_initial_ms=0, retry_backoff_max_ms=0, **policy
    )
    ms = ModelServer(fleet, transport=replicas.transport(), prober=_fastest_first)
    ms.warmup()
    return ms


WHOLE = [
    _event(role=True, usage=(7, 0)),
    _event("Hello", usage=(7, 1)),
    _event(" world", usage=(7, 2)),
    _event(finish="stop"),
    _event(usage=(7, 2)).replace(b'"choices": [{', b'"x": [{'),
    DONE,
]


def test_an_attempt_that_failed_before_its_first_token_leaves_no_trace_in_the_answer() -> None:
    replicas = Replicas(p1=lambda b: _broken_after([_event(role=True, usage=(99, 0))]), p2=lambda b: WHOLE)
    with _client(replicas) as ms:
        reply = ms.chat("8", MESSAGES)
    assert reply.choices[0].message.content == "Hello world" and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == 7 and reply.usage.completion_tokens == 2  # 8-1's, not 0 or 8-0's


def test_a_4xx_error_event_is_the_requests_fault_not_the_replicas() -> None:
    refuse = lambda b: [_error_event(400, "Input length (40000 tokens) exceeds the maximum allowed length")]  # noqa: E731
    replicas = Replicas(p1=refuse, p2=refuse)
    with _client(replicas) as ms:
        with pytest.raises(RequestRejectedError, match="exceeds the maximum"):
            ms.chat("8", MESSAGES)
        stats = ms.stats()["8"]
    assert len(replicas.bodies) == 1 and all(s.failures == 0 for s in stats.values())


def test_a_stream_cut_after_its_finish_reason_is_a_whole_answer() -> None:
    replicas = Replicas(p1=lambda b: _broken_after(WHOLE[:4]), p2=lambda b: WHOLE)
    with _client(replicas) as ms:
        stream = ms.stream_chat("8", MESSAGES)
        assert "".join(stream) == "Hello world" and stream.resumes == 0
        assert ms.stats()["8"]["8-0"].failures == 0 and len(replicas.bodies) == 1


def test_an_aborted_answer_is_resumed_not_taken_as_finished() -> None:
    aborted = [_event(role=True, usage=(7, 0)), _event("Hello", usage=(7, 1)), _event(finish="abort"), DONE]
    rest = [_event(role=True, usage=(9, 0)), _event(" world", usage=(9, 1)), _event(finish="stop"), DONE]
    replicas = Replicas(p1=lambda b: aborted, p2=lambda b: rest)
    with _client(replicas) as ms:
        stream = ms.stream_chat("8", MESSAGES)
        assert "".join(stream) == "Hello world" and stream.resumes == 1
    assert replicas.bodies[1][1]["continue_final_message"] is True


def test_a_stream_with_every_token_it_asked_for_is_not_resumed() -> None:
    def cut(body):
        return _broken_after(
            [_event(role=True, usage=(7, 0)), _event("Hello", usage=(7, 1)), _event(" world", usage=(7, 2))]
        )

    replicas = Replicas(p1=cut, p2=lambda b: WHOLE)
    with _client(replicas) as ms:
        reply = ms.chat("8", MESSAGES, max_tokens=2)
    assert reply.choices[0].message.content == "Hello world" and reply.choices[0].finish_reason == "length"
    assert len(replicas.bodies) == 1  # not a continuation asking for max(1, 2 - 2) more tokens


def test_a_refused_continuation_keeps_the_text_for_streams_and_starts_over_for_chat() -> None:
    cut = [_event(role=True, usage=(7, 0)), _event("Hello", usage=(7, 1))]

    def second(body: dict) -> object:
        if body.get("continue_final_message"):
            return httpx.Response(
                400, json={"object": "error", "message": "too long", "type": "Bad Request", "code": 400}
            )
        return WHOLE

    replicas = Replicas(p1=lambda b: _broken_after(cut), p2=second)
    with _client(replicas) as ms:
        with pytest.raises(StreamInterruptedError) as info:
            "".join(ms.stream_chat("8", MESSAGES))
        assert info.value.text == "Hello" and "no replica could continue it" in info.value.why_not_resumed
        assert ms.chat("8", MESSAGES).choices[0].message.content == "Hello world"  # the whole answer, from the start


def test_a_tool_call_counts_as_the_first_token() -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    tool = [
        b"data: "
        + json.dumps(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "chat",
                "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [call]}, "finish_reason": None}],
            }
        ).encode()
        + b"\n\n",
        _event(finish="tool_calls"),
        DONE,
    ]
    clock = [0.0]

    def slow_tool(body: dict) -> Iterator[bytes]:
        clock[0] += 0.5
        yield tool[0]
        clock[0] += 5.0  # the arguments take long: past the first-token deadline, but a token already came
        yield from tool[1:]

    replicas = Replicas(p1=slow_tool, p2=slow_tool)
    fleet = fleet_of({"8": ("completion", [1, 2])}, routing="fastest")
    with ModelServer(fleet, transport=replicas.transport(), clock=lambda: clock[0], prober=_fastest_first) as ms:
        ms.warmup()
        reply = ms.chat("8", MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}])
        assert reply.choices[0].message.tool_calls[0].function.name == "f"
        assert all(s.failures == 0 for s in ms.stats()["8"].values())


def test_a_half_open_trial_that_answers_frees_its_replica_at_once() -> None:
    clock = [0.0]
    spec = ServerSpec(name="r0", group="8", kind=ServerKind.completion, host="127.0.0.1", port=9000, model="m")
    group = ReplicaGroup("8", [spec], ClientPolicy(breaker_failures=1, breaker_cooldown_s=5), clock=lambda: clock[0])
    group.apply_probes([ProbeResult(spec, 0.01, output_tokens=1)])
    group.release(group.acquire(random.Random(0)), OutcomeKind.TIMEOUT, error="timeout")
    clock[0] = 6.0
    trial = group.acquire(random.Random(0))
    assert trial is not None and trial.trial and group.acquire(random.Random(0)) is None  # the trial holds it
    group.first_token(trial, 0.05)
    assert group.acquire(random.Random(0)) is not None  # a long stream no longer shuts the replica


@pytest.mark.timeout(60)
def test_a_slow_reader_is_not_a_stalled_replica() -> None:
    with sims_running(1, args=("--ttft-ms", "5", "--tpot-ms", "2")) as sims:
        fleet = fleet_of({"8": ("completion", [sims[0].port])}, stall_timeout_floor_s=0.3, stall_timeout_ceiling_s=0.3)
        with ModelServer(fleet) as ms:
            stream = ms.stream_chat("8", MESSAGES, max_tokens=6)
            pieces = []
            for piece in stream:
                pieces.append(piece)
                time.sleep(0.5)  # the caller holds each piece longer than the stall deadline
            stats = ms.stats()["8"]["8-0"]
    assert len(pieces) == 6 and stream.resumes == 0 and stats.failures == 0


@pytest.mark.timeout(60)
def test_a_slow_reader_does_not_lengthen_the_groups_stall_deadline() -> None:
    with sims_running(1, args=("--ttft-ms", "5", "--tpot-ms", "2")) as sims:
        fleet = fleet_of({"8": ("completion", [sims[0].port])})
        with ModelServer(fleet) as ms:
            for _piece in ms.stream_chat("8", MESSAGES, max_tokens=5):
                time.sleep(0.3)  # the caller's time, not the replica's
            gap_s = ms.timing("8").gap_s
    assert gap_s is not None and gap_s < 0.1  # the replica's pace (ms per token), not the caller's 0.3 s
