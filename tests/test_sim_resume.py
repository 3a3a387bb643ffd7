"""Resume and token faults on real `model-server sim` processes (issue 8's needs from the simulator).

- a stream resumed from the text received (chat with continue_final_message, or
  completions with prompt + text) is byte for byte the uninterrupted stream;
- stall_after_tokens, crash_after_tokens, hang_before_first_token, set by flag or
  at run time;
- stream_options.continuous_usage_stats.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import pytest
from _waiting import wait_for

from model_server.sim.process import SimProcess

FAST = ["--ttft-ms", "1", "--tpot-ms", "0.2", "--ttft-per-prompt-token-ms", "0"]
JSON = {"Content-Type": "application/json"}
CHATS = [
    [{"role": "user", "content": "Tell me a story."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Why is the sky blue?"}],
    [
        {"role": "user", "content": "第一个问题"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "2?"},
    ],
]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(served_model_name="sim-chat", args=[*FAST, "--enable-metrics"]) as s:
        yield s


@pytest.fixture
def server(sim: SimProcess) -> Iterator[SimProcess]:
    yield sim
    sim.reset_faults()


def stream(sim: SimProcess, path: str, body: dict, timeout_s: float = 10) -> list[dict]:
    """Every JSON event of a stream (without [DONE], which it asserts)."""
    with httpx.stream("POST", sim.url + path, json={**body, "stream": True}, timeout=timeout_s) as r:
        assert r.status_code == 200, r.read()
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def chat_pieces(events: list[dict]) -> tuple[list[str], str, object]:
    """(the text pieces, finish_reason, matched_stop) of a chat stream."""
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    pieces = [d["content"] for d in deltas if d.get("content")]
    finish = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    return pieces, finish[-1]["finish_reason"], finish[-1]["matched_stop"]


def completion_pieces(events: list[dict]) -> tuple[list[str], str]:
    pieces = [e["choices"][0]["text"] for e in events if e["choices"] and e["choices"][0]["text"]]
    return pieces, [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]


# --- resume is byte-exact ---


@pytest.mark.parametrize("messages", CHATS)
def test_chat_resumed_with_continue_final_message_is_the_same_stream(server: SimProcess, messages: list) -> None:
    m = 40
    pieces, finish, _ = chat_pieces(stream(server, "/v1/chat/completions", {"messages": messages, "max_tokens": m}))
    assert len(pieces) == m and finish == "length"
    for k in (1, 7, m - 1):
        received = "".join(pieces[:k])
        body = {
            "messages": [*messages, {"role": "assistant", "content": received}],
            "continue_final_message": True,
            "max_tokens": m - k,
        }
        rest, rest_finish, _ = chat_pieces(stream(server, "/v1/chat/completions", body))
        assert received + "".join(rest) == "".join(pieces) and rest_finish == finish
        unstreamed = httpx.post(server.base_url + "/chat/completions", json=body, timeout=10).json()
        assert unstreamed["choices"][0]["message"]["content"] == "".join(rest)  # only the continuation


def test_chat_until_eos_resumes_to_the_same_eos(server: SimProcess) -> None:
    messages = CHATS[0]
    pieces, finish, matched = chat_pieces(stream(server, "/v1/chat/completions", {"messages": messages}))
    assert finish == "stop" and isinstance(matched, int) and len(pieces) >= 8
    k = len(pieces) // 2
    received = {"role": "assistant", "content": "".join(pieces[:k])}
    body = {"messages": [*messages, received], "continue_final_message": True}
    rest, rest_finish, rest_matched = chat_pieces(stream(server, "/v1/chat/completions", body))
    assert pieces[:k] + rest == pieces and (rest_finish, rest_matched) == (finish, matched)


@pytest.mark.parametrize("prompt", ["Once upon a time", "x", "ends with a space ", "2 + 2 ="])
def test_completion_resumed_with_prompt_plus_text_is_the_same_stream(server: SimProcess, prompt: str) -> None:
    m = 30
    pieces, finish = completion_pieces(stream(server, "/v1/completions", {"prompt": prompt, "max_tokens": m}))
    assert len(pieces) == m and finish == "length"
    for k in (1, 12, m - 1):
        received = "".join(pieces[:k])
        rest, rest_finish = completion_pieces(
            stream(server, "/v1/completions", {"prompt": prompt + received, "max_tokens": m - k})
        )
        assert received + "".join(rest) == "".join(pieces) and rest_finish == finish


def test_continue_final_message_counts_the_prefix_as_prompt(server: SimProcess) -> None:
    messages = CHATS[0]
    url = server.base_url + "/chat/completions"
    plain = httpx.post(url, json={"messages": messages, "max_tokens": 4}, timeout=10).json()
    prefix = "Once upon a time, there"  # 6 tokens
    body = {"messages": [*messages, {"role": "assistant", "content": prefix}], "max_tokens": 4}
    continued = httpx.post(url, json={**body, "continue_final_message": True}, timeout=10).json()
    assert continued["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + 6
    assert not continued["choices"][0]["message"]["content"].startswith(prefix)
    assert continued["choices"][0]["message"]["content"].startswith(" ")  # it goes on after "there"
    # without the flag the assistant message is a new user turn (SGLang's rule), and a new turn starts
    new_turn = httpx.post(url, json=body, timeout=10).json()
    assert new_turn["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + 6 + 5  # one more message
    assert not new_turn["choices"][0]["message"]["content"].startswith(" ")


# --- continuous usage ---


def test_continuous_usage_stats_on_every_text_chunk(server: SimProcess) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    events = stream(server, "/v1/chat/completions", {"messages": CHATS[0], "max_tokens": 5, "stream_options": options})
    text_events = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert [e["usage"]["completion_tokens"] for e in text_events] == [1, 2, 3, 4, 5]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    events = stream(server, "/v1/completions", {"prompt": "x", "max_tokens": 3, "stream_options": options})
    assert [e["usage"]["completion_tokens"] for e in events] == [1, 2, 3, 3]
    plain = stream(server, "/v1/completions", {"prompt": "x", "max_tokens": 3})
    assert [e["usage"] for e in plain] == [None, None, None]


# --- token faults ---


class Events:
    """The data events of an open stream, read a few at a time."""

    def __init__(self, r: httpx.Response) -> None:
        self.lines = r.iter_lines()

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            line = next(self.lines)
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
        return out

    def rest(self) -> list[dict]:
        return [json.loads(line[6:]) for line in self.lines if line.startswith("data: ") and line != "data: [DONE]"]

    def more(self) -> str:
        """The next non-blank line (it blocks while the server sends nothing)."""
        line = ""
        while not line:
            line = next(self.lines)
        return line


def text_of(events: list[dict]) -> list[str]:
    return [e["choices"][0]["delta"].get("content") for e in events]


def test_stall_after_tokens_keeps_the_stream_open_and_silent(server: SimProcess) -> None:
    faults = server.set_faults(stall_after_tokens=3)
    assert faults["stall_after_tokens"] == 3 and server.faults()["stall_after_tokens"] == 3
    body = {"messages": CHATS[0], "max_tokens": 20, "stream": True}
    timeout = httpx.Timeout(10, read=0.5)
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=timeout) as r:
        events = Events(r)
        first = events.take(4)  # the role, then 3 tokens
        assert text_of(first)[0] == "" and all(text_of(first)[1:])
        with pytest.raises(httpx.ReadTimeout):
            events.more()  # nothing more, but no end either
    # the client went away: the stalled request leaves the running batch
    wait_for(lambda: server.stats()["running"] == 0, 5, "the stalled request to leave the running batch")
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    assert re.search(r"^sglang:num_aborted_requests_total\{[^}]*\} [1-9]", metrics, re.M)  # counted as aborted
    url = server.base_url + "/chat/completions"
    with pytest.raises(httpx.ReadTimeout):  # an unstreamed reply longer than 3 tokens never comes
        httpx.post(url, json={"messages": CHATS[0], "max_tokens": 10}, timeout=timeout)
    assert httpx.post(url, json={"messages": CHATS[0], "max_tokens": 1}, timeout=5).status_code == 200  # a probe does
    assert httpx.get(server.url + "/health_generate", timeout=5).status_code == 200


def test_a_stall_lifted_at_run_time_lets_the_stream_finish(server: SimProcess) -> None:
    server.set_faults(stall_after_tokens=2)
    body = {"messages": CHATS[1], "max_tokens": 6, "stream": True}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=10) as r:
        events = Events(r)
        first = events.take(3)
        server.reset_faults()
        rest = events.rest()
    pieces, finish, _ = chat_pieces(first + rest)
    full, _, _ = chat_pieces(stream(server, "/v1/chat/completions", {"messages": CHATS[1], "max_tokens": 6}))
    assert pieces == full and finish == "length"


def test_hang_before_first_token_sends_headers_only(server: SimProcess) -> None:
    assert server.set_faults(hang_before_first_token=True)["hang_before_first_token"] is True
    body = {"prompt": "x", "max_tokens": 5, "stream": True}
    timeout = httpx.Timeout(10, read=0.5)
    with httpx.stream("POST", server.base_url + "/completions", json=body, timeout=timeout) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        with pytest.raises(httpx.ReadTimeout):
            next(r.iter_lines())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/completions", json={"prompt": "x", "max_tokens": 1}, timeout=timeout)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(server.url + "/health_generate", timeout=0.5)
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


@pytest.mark.parametrize(
    ("faults", "needle"),
    [
        ({"stall_after_tokens": -1}, "stall_after_tokens"),
        ({"crash_after_tokens": "3"}, "crash_after_tokens"),
        ({"hang_before_first_token": 1}, "hang_before_first_token"),
    ],
)
def test_token_fault_validation(server: SimProcess, faults: dict, needle: str) -> None:
    r = httpx.post(server.url + "/sim/faults", json=faults, timeout=5)
    assert r.status_code == 400 and needle in r.json()["message"]


@pytest.mark.timeout(60)
def test_crash_after_tokens_exits_mid_stream() -> None:
    with SimProcess(args=FAST) as s:
        s.set_faults(crash_after_tokens=4)
        assert httpx.post(s.base_url + "/completions", json={"prompt": "x", "max_tokens": 9}, timeout=5).is_success
        received = []
        with pytest.raises(httpx.TransportError):
            body = {"prompt": "x", "max_tokens": 9, "stream": True}
            with httpx.stream("POST", s.base_url + "/completions", json=body, timeout=5) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        received.append(json.loads(line[6:])["choices"][0]["text"])
        assert len(received) == 4 and all(received)
        assert s.wait_exit(20) == 1
        assert "simulated crash" in s.log_text() and "crash_after_tokens=4" in s.log_text()


@pytest.mark.timeout(60)
def test_token_faults_as_start_flags() -> None:
    args = [*FAST, "--stall-after-tokens", "2", "--hang-before-first-token", "--crash-after-tokens", "50"]
    with SimProcess(args=args) as s:
        faults = s.faults()
        assert (faults["stall_after_tokens"], faults["crash_after_tokens"], faults["hang_before_first_token"]) == (
            2,
            50,
            True,
        )
        timeout = httpx.Timeout(10, read=0.5)
        body = {"messages": CHATS[0], "max_tokens": 5, "stream": True}
        with httpx.stream("POST", s.base_url + "/chat/completions", json=body, timeout=timeout) as r:
            with pytest.raises(httpx.ReadTimeout):
                next(r.iter_lines())
        s.set_faults(hang_before_first_token=False)
        with httpx.stream("POST", s.base_url + "/chat/completions", json=body, timeout=timeout) as r:
            events = Events(r)
            assert all(text_of(events.take(3))[1:])
            with pytest.raises(httpx.ReadTimeout):
                events.more()
        assert s.is_alive()
