"""The simulator behaves as SGLang 0.5.23 does (issue 11), one test per point, on the app in-process.

Each test names its point. The shapes themselves are held to SGLang's own
models by tests/test_sim_conformance.py; the real-process behaviours (startup,
health timing, the startup log line) are in tests/test_sim_http.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from model_server.common.urls import bearer_headers
from model_server.sim.app import create_app
from model_server.sim.settings import parse_sim_args

ZERO = ["--ttft-ms", "0", "--tpot-ms", "0", "--ttft-per-prompt-token-ms", "0"]
MESSAGES = [{"role": "user", "content": "Name three colours."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city"],
        },
    },
}


def scenario(*args: str) -> Callable[[Callable[[httpx.AsyncClient], Awaitable[Any]]], Any]:
    """Run `body(client)` against an in-process sim started with `args`; return what it returns."""

    def run(body: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
        app = create_app(parse_sim_args(["--model-path", "sim/llama-8b", *ZERO, *args]))

        async def go() -> Any:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://sim", timeout=10) as client:
                return await body(client)

        return asyncio.run(go())

    return run


def events(text: str) -> list[dict]:
    data = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


# --- 1. content type ---


def test_1_openai_routes_want_application_json() -> None:
    async def body(c: httpx.AsyncClient) -> list[int]:
        codes = []
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/tokenize"):
            payload = json.dumps({"messages": MESSAGES} if "chat" in path else {"prompt": "x"})
            r = await c.post(path, content=payload, headers={"Content-Type": "text/plain"})
            assert "Unsupported Media Type: Only 'application/json' is allowed" in r.json()["message"]
            codes.append(r.status_code)
            ok = await c.post(path, content=payload, headers={"Content-Type": "application/json; charset=utf-8"})
            codes.append(ok.status_code)
        return codes

    assert scenario()(body) == [400, 200] * 3


# --- 2. error bodies ---


def test_2_errors_are_sglangs_flat_error_response() -> None:
    async def body(c: httpx.AsyncClient) -> None:
        r = await c.post("/v1/chat/completions", json={"messages": []})
        assert r.status_code == 400 and r.json() == {
            "object": "error",
            "message": "Messages cannot be empty.",
            "type": "BadRequestError",
            "param": "messages",
            "code": 400,
        }
        r = await c.post("/v1/chat/completions", content=b"{oops", headers={"Content-Type": "application/json"})
        assert r.json()["type"] == "Bad Request" and r.json()["object"] == "error"  # a validation error
        r = await c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 10**6}})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message"}

    scenario()(body)


def test_2_injected_errors_answer_in_sglangs_shape() -> None:
    async def body(c: httpx.AsyncClient) -> None:
        r = await c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["object"] == "error" and r.json()["type"] == "503"
        r = await c.post("/generate", json={"text": "x"})
        assert r.status_code == 503 and set(r.json()) == {"error"} and "simulated fault" in r.json()["error"]["message"]

    scenario("--error-rate", "1", "--error-status", "503")(body)


# --- 3. length and finish ---


def test_3_chat_without_max_tokens_stops_at_eos() -> None:
    async def body(c: httpx.AsyncClient) -> list[tuple[str, Any, int]]:
        out = []
        for i in range(20):
            messages = [{"role": "user", "content": f"question {i}"}]
            r = (await c.post("/v1/chat/completions", json={"messages": messages})).json()
            choice = r["choices"][0]
            out.append((choice["finish_reason"], choice["matched_stop"], r["usage"]["completion_tokens"]))
        return out

    replies = scenario()(body)
    assert {(f, m) for f, m, _ in replies} == {("stop", 128009)}  # EOS, its id an int
    assert len({n for _, _, n in replies}) > 5 and 8 <= min(n for _, _, n in replies)  # lengths vary, like a model's


def test_3_ignore_eos_runs_to_the_context_and_completions_refuse_zero_tokens() -> None:
    async def body(c: httpx.AsyncClient) -> None:
        r = (await c.post("/v1/chat/completions", json={"messages": MESSAGES, "ignore_eos": True})).json()
        assert r["choices"][0]["finish_reason"] == "length"
        assert r["usage"]["total_tokens"] == 1024  # the whole --context-length
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
        assert r.status_code == 400 and r.json()["param"] == "max_tokens"
        r = await c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 0

    scenario("--context-length", "1024")(body)


# --- 4. model names ---


def test_4_any_model_name_is_accepted_and_echoed() -> None:
    async def body(c: httpx.AsyncClient) -> list[str]:
        names = []
        for model in ("gpt-4o", "sim/llama-8b", None):
            payload: dict = {"messages": MESSAGES, "max_tokens": 1}
            if model:
                payload["model"] = model
            names.append((await c.post("/v1/chat/completions", json=payload)).json()["model"])
            payload = {"prompt": "x", "max_tokens": 1, **({"model": model} if model else {})}
            names.append((await c.post("/v1/completions", json=payload)).json()["model"])
        return names

    assert scenario()(body) == ["gpt-4o", "gpt-4o", "sim/llama-8b", "sim/llama-8b", "default", "default"]

    async def embed(c: httpx.AsyncClient) -> str:
        return (await c.post("/v1/embeddings", json={"input": "x", "model": "whatever"})).json()["model"]

    assert scenario("--is-embedding", "--served-model-name", "e5")(embed) == "sim/llama-8b"  # the model path


# --- 8. routes real tools call ---


def test_8_routes_real_tools_call() -> None:
    async def body(c: httpx.AsyncClient) -> None:
        assert (await c.get("/ping")).status_code == 200
        assert (await c.get("/")).json() == "SGLang is running"
        flushed = await c.post("/flush_cache")
        assert flushed.status_code == 200 and flushed.text.startswith("Cache flushed.")
        assert (await c.get("/flush_cache")).status_code == 200
        loads = (await c.get("/v1/loads", params={"include": "core"})).json()
        assert loads["loads"][0]["max_total_num_tokens"] > 0 and loads["version"] == "0.5.23"
        bad = await c.get("/v1/loads", params={"include": "nonsense"})
        assert bad.status_code == 400
        prom = await c.get("/v1/loads", params={"format": "prometheus"})
        assert 'sglang_num_running_reqs{dp_rank="0"} 0' in prom.text
        assert (await c.get("/get_load")).json()[0]["num_reqs"] == 0
        assert (await c.get("/v1/models/sim/llama-8b")).json()["id"] == "sim/llama-8b"
        missing = await c.get("/v1/models/other")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        ids = (await c.post("/v1/tokenize", json={"prompt": "Hello, world!"})).json()
        assert ids["count"] == 4 == len(ids["tokens"]) and ids["max_model_len"] == 32768
        text = (await c.post("/detokenize", json={"tokens": ids["tokens"]})).json()["text"]
        assert text == "Hello, world!"
        put = await c.put("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}})
        assert put.status_code == 200 and put.json()["meta_info"]["completion_tokens"] == 2

    scenario()(body)

    async def encode(c: httpx.AsyncClient) -> None:
        one = (await c.post("/encode", json={"text": "hello"})).json()
        assert len(one["embedding"]) == 16 and one["meta_info"]["prompt_tokens"] == 1
        many = (await c.put("/encode", json={"text": ["a", "b"]})).json()
        assert [len(m["embedding"]) for m in many] == [16, 16]

    scenario("--is-embedding", "--embedding-dim", "16")(encode)


# --- 9. parameters that were ignored ---


def test_9_logprobs_have_sglangs_shape_for_every_token() -> None:
    async def body(c: httpx.AsyncClient) -> tuple[dict, dict]:
        chat = await c.post(
            "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, "logprobs": True, "top_logprobs": 3}
        )
        completion = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "logprobs": 2})
        return chat.json()["choices"][0], completion.json()["choices"][0]

    chat, completion = scenario()(body)
    content = chat["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == chat["message"]["content"]
    assert all(len(t["top_logprobs"]) == 3 and t["top_logprobs"][0]["token"] == t["token"] for t in content)
    assert all(t["logprob"] <= 0 for t in content)
    lp = completion["logprobs"]
    assert "".join(lp["tokens"]) == completion["text"] and len(lp["top_logprobs"]) == 4 == len(lp["text_offset"])


def test_9_response_format_gives_valid_json() -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 18}, "tags": {
            "type": "array", "items": {"type": "string"}, "minItems": 2}},
        "required": ["name", "age", "tags"],
    }  # fmt: skip

    async def body(c: httpx.AsyncClient) -> list[Any]:
        out = []
        formats = [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}]
        for fmt in formats:
            r = (await c.post("/v1/chat/completions", json={"messages": MESSAGES, "response_format": fmt})).json()
            assert r["choices"][0]["finish_reason"] == "stop"
            out.append(json.loads(r["choices"][0]["message"]["content"]))
        cut = await c.post(
            "/v1/chat/completions", json={"messages": MESSAGES, "response_format": formats[1], "max_tokens": 3}
        )
        assert cut.json()["choices"][0]["finish_reason"] == "length"  # cut off mid-object, like a model
        return out

    obj, person = scenario()(body)
    assert isinstance(obj, dict)
    assert isinstance(person["name"], str) and person["age"] >= 18 and len(person["tags"]) >= 2


def test_9_tools_get_tool_calls() -> None:
    async def body(c: httpx.AsyncClient) -> list[dict]:
        out = []
        asks = [{"role": "user", "content": "Use get_weather for Paris."}]
        for choice in ("auto", "required", {"type": "function", "function": {"name": "get_weather"}}, "none"):
            payload = {"messages": asks, "tools": [WEATHER], "tool_choice": choice}
            out.append((await c.post("/v1/chat/completions", json=payload)).json()["choices"][0])
        plain = {"messages": MESSAGES, "tools": [WEATHER]}  # "auto", and no tool named: a text answer
        out.append((await c.post("/v1/chat/completions", json=plain)).json()["choices"][0])
        after_tool = [
            *asks,
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]  # fmt: skip
        answer = await c.post("/v1/chat/completions", json={"messages": after_tool, "tools": [WEATHER]})
        out.append(answer.json()["choices"][0])
        return out

    auto, required, named, none, unasked, after = scenario()(body)
    for choice in (auto, required, named):
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == ""
        call = choice["message"]["tool_calls"][0]
        arguments = json.loads(call["function"]["arguments"])
        assert call["function"]["name"] == "get_weather" and re.fullmatch(r"call_[0-9a-f]{24}", call["id"])
        assert isinstance(arguments["city"], str) and 1 <= arguments["days"] <= 7
    assert "tool_calls" not in none["message"] and none["finish_reason"] == "stop"
    assert "tool_calls" not in unasked["message"] and unasked["message"]["content"]
    assert "tool_calls" not in after["message"]  # after the tool's result, an answer in text


def test_9_seed_temperature_min_tokens_stop_token_ids() -> None:
    async def text(c: httpx.AsyncClient, **extra: Any) -> dict:
        r = await c.post("/v1/completions", json={"prompt": "Once", "max_tokens": 12, **extra})
        return r.json()["choices"][0]

    async def body(c: httpx.AsyncClient) -> None:
        greedy = await text(c)
        assert (await text(c))["text"] == greedy["text"] == (await text(c, temperature=0))["text"]
        seeded = await text(c, seed=7, temperature=0.8)
        assert seeded["text"] == (await text(c, seed=7, temperature=0.8))["text"] != greedy["text"]
        sampled = {(await text(c, temperature=1.0))["text"] for _ in range(4)}
        assert len(sampled) > 1  # temperature without a seed: a different filler each time
        tokens = (await c.post("/v1/tokenize", json={"prompt": greedy["text"]})).json()["tokens"]
        stopped = await text(c, stop_token_ids=[tokens[3]])
        assert stopped["finish_reason"] == "stop" and stopped["matched_stop"] == tokens[3]
        assert greedy["text"].startswith(stopped["text"]) and len(stopped["text"]) < len(greedy["text"])
        late = await text(c, stop_token_ids=[tokens[3]], min_tokens=6)
        assert late["text"].startswith(greedy["text"][: len(stopped["text"]) + 5])  # no stop before 6 tokens

    scenario()(body)

    async def eos(c: httpx.AsyncClient) -> list[int]:
        lengths = []
        for min_tokens in (0, 200):
            r = await c.post("/v1/chat/completions", json={"messages": MESSAGES, "min_tokens": min_tokens})
            lengths.append(r.json()["usage"]["completion_tokens"])
        return lengths

    natural, at_least = scenario()(eos)
    assert natural < 200 <= at_least


# --- 11. stream and body details ---


def test_11_stream_shapes_are_sglangs() -> None:
    async def body(c: httpx.AsyncClient) -> tuple[list[dict], list[dict], dict]:
        chat = await c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, "stream": True})
        comp = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True})
        plain = await c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
        return events(chat.text), events(comp.text), plain.json()

    chat, comp, plain = scenario()(body)
    assert chat[0]["choices"][0]["delta"] == {"reasoning_content": None, "role": "assistant", "content": ""}
    assert [set(e["choices"][0]["delta"]) for e in chat[1:]] == [{"reasoning_content", "content"}] * 2 + [
        {"reasoning_content"}
    ]
    assert all("matched_stop" in e["choices"][0] for e in chat)
    assert [e["choices"][0]["finish_reason"] for e in comp] == [None, "length"]  # the finish rides on the last text
    assert "tool_calls" not in plain["choices"][0]["message"] and re.fullmatch(r"[0-9a-f]{32}", plain["id"])
    assert {"reasoning_tokens", "prompt_tokens_details", "completion_tokens_details"} <= set(plain["usage"])


# --- 12. where the sim was stricter than SGLang ---


def test_12_n_choices_and_batched_streams() -> None:
    async def body(c: httpx.AsyncClient) -> None:
        one = (await c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5})).json()
        three = (await c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5, "n": 3})).json()
        texts = [ch["message"]["content"] for ch in three["choices"]]
        assert [ch["index"] for ch in three["choices"]] == [0, 1, 2] and len(set(texts)) == 3
        assert texts[0] == one["choices"][0]["message"]["content"]  # choice 0 is the n = 1 answer
        assert three["usage"]["completion_tokens"] == 15
        assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]  # the prompt counts once
        batch = await c.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 3, "stream": True})
        chunks = events(batch.text)
        finished = sorted(e["choices"][0]["index"] for e in chunks if e["choices"] and e["choices"][0]["finish_reason"])
        assert finished == [0, 1, 2, 3]
        batch_body = {"text": ["a", "b"], "sampling_params": {"max_new_tokens": 2}, "stream": True}
        native = await c.post("/generate", json=batch_body)
        assert {e["index"] for e in events(native.text)} == {0, 1}

    scenario()(body)


def test_12_admin_key_guards_admin_routes_and_bearer_is_case_blind() -> None:
    async def body(c: httpx.AsyncClient) -> dict[str, int]:
        api = {"Authorization": "bearer user-key"}
        preflight = {"Origin": "http://a", "Access-Control-Request-Method": "GET"}
        admin = bearer_headers("admin-key")
        return {
            "flush with api key": (await c.post("/flush_cache", headers=api)).status_code,
            "flush with admin key": (await c.post("/flush_cache", headers=admin)).status_code,
            "faults with api key": (await c.get("/sim/faults", headers=api)).status_code,
            "faults with admin key": (await c.get("/sim/faults", headers=admin)).status_code,
            "models with api key": (await c.get("/v1/models", headers=api)).status_code,
            "models without": (await c.get("/v1/models")).status_code,
            "preflight": (await c.options("/v1/models", headers=preflight)).status_code,
            "health": (await c.get("/health")).status_code,
        }  # fmt: skip

    codes = scenario("--api-key", "user-key", "--admin-api-key", "admin-key")(body)
    assert codes == {
        "flush with api key": 401,
        "flush with admin key": 200,
        "faults with api key": 401,
        "faults with admin key": 200,
        "models with api key": 200,
        "models without": 401,
        "preflight": 200,
        "health": 200,
    }


# --- 7 and 10: metrics and the running batch ---


def test_7_metrics_only_with_enable_metrics() -> None:
    async def status(c: httpx.AsyncClient) -> int:
        return (await c.get("/metrics")).status_code

    assert scenario()(status) == 404
    assert scenario("--enable-metrics")(status) == 200


def test_7_metrics_have_sglangs_names_labels_and_per_token_latency() -> None:
    async def body(c: httpx.AsyncClient) -> str:
        await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 10})
        await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 5, "stream": True})
        return (await c.get("/metrics")).text

    text = scenario("--enable-metrics", "--tpot-ms", "0.5")(body)
    for name in (
        "cache_hit_rate", "num_used_tokens", "kv_used_tokens", "kv_available_tokens", "max_total_num_tokens",
        "context_len", "queue_time_seconds", "request_time_per_output_token_seconds", "num_aborted_requests_total",
        "prompt_tokens_histogram", "generation_tokens_histogram", "http_requests_total", "http_responses_total",
        "http_requests_active",
    ):  # fmt: skip
        assert f"# TYPE sglang:{name.removesuffix('_total')}" in text, name
    sched = 'engine_type="unified",model_name="sim/llama-8b",moe_ep_rank="0",pp_rank="0",tp_rank="0"'
    assert f"sglang:num_running_reqs{{{sched}}} 0.0" in text
    assert 'sglang:num_requests_total{engine_type="unified",is_streaming="true",model_name="sim/llama-8b"} 1.0' in text
    assert 'sglang:num_requests_total{engine_type="unified",is_streaming="false",model_name="sim/llama-8b"} 1.0' in text
    # one inter-token latency per token after the first: 9 + 4
    assert re.search(r"^sglang:inter_token_latency_seconds_count\{[^}]*\} 13\.0$", text, re.M)
    assert 'le="400.0"' in text and 'le="2400.0"' in text  # SGLang's TTFT and e2e buckets
    assert 'sglang:http_responses_total{endpoint="/v1/completions",method="POST",status_code="200"} 2.0' in text
    for streaming in ("true", "false"):
        labels = f'engine_type="unified",is_streaming="{streaming}",model_name="sim/llama-8b"'
        assert f"sglang:time_to_first_token_seconds_count{{{labels}}} 1.0" in text


def test_10_max_running_requests_comes_from_the_kv_pool() -> None:
    async def body(c: httpx.AsyncClient) -> dict:
        return (await c.get("/server_info")).json()

    info = scenario()(body)
    assert info["max_running_requests"] == 4096 and info["max_total_num_tokens"] == 445_644
    info = scenario("--max-total-tokens", "3000")(body)
    assert info["max_running_requests"] == 1500  # at most half the pool
