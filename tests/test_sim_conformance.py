"""The simulator's real HTTP answers, checked by SGLang 0.5.23's own protocol models.

Every answer below (success and error, every streamed chunk) comes from a real
`model-server sim` process. Each is validated by the SGLang model SGLang itself
serializes that answer with, and SGLang's serialization of the validated model
must equal what the sim sent, key for key and value for value: a missing, extra
or mistyped field fails. The requests are validated too (what the sim accepts,
SGLang accepts). Plain-dict answers are compared with the keys SGLang's source
builds.

SGLang's models run in a separate environment (``sglang==0.5.23`` installed
without its dependencies, plus pydantic, msgspec and openai): the interpreter
named by ``MODEL_SERVER_SGLANG_PYTHON``, else ``.venv-sglang/bin/python``.
``.ci/run`` creates it and sets ``MODEL_SERVER_REQUIRE_SGLANG=1``, which turns a
missing environment into a failure; elsewhere the suite is skipped with the
command that creates it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from model_server.sim.process import SimProcess

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).resolve().parent / "sglang_reference.py"
PYTHON_ENV = "MODEL_SERVER_SGLANG_PYTHON"
REQUIRE_ENV = "MODEL_SERVER_REQUIRE_SGLANG"
SETUP = (
    "python3 -m venv .venv-sglang && .venv-sglang/bin/pip install --no-deps sglang==0.5.23 "
    "&& .venv-sglang/bin/pip install pydantic msgspec openai"
)
KEY = "conformance-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = ["--ttft-ms", "1", "--tpot-ms", "0.1", "--ttft-per-prompt-token-ms", "0", "--health-generate-s", "0.05"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "schema": {
            "type": "object",
            "properties": {"colours": {"type": "array", "items": {"type": "string"}}, "count": {"type": "integer"}},
            "required": ["colours", "count"],
        },
    },
}
SIM_ADDITIONS = {"model_info.keys": {"simulator", "note"}}  # documented in model_server/sim/__init__.py


def reference_python() -> str:
    given = os.environ.get(PYTHON_ENV)
    python = Path(given) if given else ROOT / ".venv-sglang" / "bin" / "python"
    problem = None
    if not python.exists():
        problem = f"no SGLang environment at {python}"
    else:
        run = subprocess.run([str(python), str(REFERENCE), "--version"], capture_output=True, text=True, timeout=60)
        if run.returncode != 0 or run.stdout.strip() != "0.5.23":
            problem = f"{python} has no sglang 0.5.23 ({(run.stdout + run.stderr).strip()[-300:]})"
    if problem is None:
        return str(python)
    message = f"{problem}; create it with: {SETUP} (or set {PYTHON_ENV})"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {message}", pytrace=False)
    pytest.skip(message)


class Answers:
    """(name, kind, document) of every answer collected, checked by SGLang in one run."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, Any]] = []
        self.results: dict[str, dict] = {}

    def add(self, name: str, kind: str, doc: Any) -> None:
        self.items.append((name, kind, doc))

    def check(self, python: str) -> None:
        checks = {"checks": [{"kind": kind, "doc": doc} for _, kind, doc in self.items]}
        run = subprocess.run(
            [python, str(REFERENCE)], input=json.dumps(checks), capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr[-2000:]
        for (name, _, _), result in zip(self.items, json.loads(run.stdout)):
            self.results[name] = result

    def failures(self, prefix: str) -> list[str]:
        """Every mismatch among the answers named `prefix`...; asserts there were some."""
        chosen = [(n, k, d) for n, k, d in self.items if n.startswith(prefix)]
        assert chosen, f"no answers named {prefix}*"
        out = []
        for name, kind, doc in chosen:
            result = self.results[name]
            if not result["ok"]:
                out.append(f"{name}: SGLang refuses it: {result['error']}")
            elif kind.endswith(".keys"):
                keys = sorted(set(doc) - SIM_ADDITIONS.get(kind, set()))
                if keys != result["dump"]:
                    extra, missing = set(keys) - set(result["dump"]), set(result["dump"]) - set(keys)
                    out.append(f"{name}: keys differ: extra {sorted(extra)}, missing {sorted(missing)}")
            elif not kind.endswith(".request") and result["dump"] != doc:
                out.append(f"{name}: SGLang serializes it otherwise:\n  sim:    {doc}\n  sglang: {result['dump']}")
        return out


def stream_events(client: httpx.Client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def chat_chunk_kind(chunk: dict) -> str:
    """SGLang builds role, text and finish chunks with msgspec (sse_utils); tool-call and usage chunks with pydantic."""
    if not chunk["choices"] or "tool_calls" in chunk["choices"][0]["delta"]:
        return "chat.chunk.pydantic"
    return "chat.chunk"


def collect(chat: SimProcess, embed: SimProcess) -> Answers:
    a = Answers()
    c = httpx.Client(base_url=chat.url, headers=AUTH, timeout=30)
    e = httpx.Client(base_url=embed.url, timeout=30)

    def chat_call(name: str, body: dict) -> None:
        a.add(f"request.{name}", "chat.request", body)
        if body.get("stream"):
            for i, chunk in enumerate(stream_events(c, "/v1/chat/completions", body)):
                a.add(f"chat.stream.{name}.{i}", chat_chunk_kind(chunk), chunk)
        else:
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            a.add(f"chat.{name}", "chat.response", r.json())

    def completion_call(name: str, body: dict) -> None:
        a.add(f"request.{name}", "completion.request", body)
        if body.get("stream"):
            for i, chunk in enumerate(stream_events(c, "/v1/completions", body)):
                kind = "completion.usage_chunk" if not chunk["choices"] else "completion.chunk"
                a.add(f"completion.stream.{name}.{i}", kind, chunk)
        else:
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            a.add(f"completion.{name}", "completion.response", r.json())

    chat_call("plain", {"model": "sim-chat", "messages": MESSAGES, "max_tokens": 5})
    chat_call("until_eos", {"messages": MESSAGES})
    chat_call("n_logprobs", {"messages": MESSAGES, "max_tokens": 3, "n": 2, "logprobs": True, "top_logprobs": 2})
    chat_call("json_schema", {"messages": MESSAGES, "response_format": SCHEMA})
    chat_call("json_object", {"messages": MESSAGES, "response_format": {"type": "json_object"}})
    chat_call("tools", {"messages": [{"role": "user", "content": "Call get_weather."}], "tools": [WEATHER]})
    chat_call("stop", {"messages": MESSAGES, "max_tokens": 20, "stop": [" a", " e"], "seed": 3})
    continued = [*MESSAGES, {"role": "assistant", "content": "Red,"}]
    chat_call("continue", {"messages": continued, "continue_final_message": True, "max_tokens": 4})
    options = {"include_usage": True, "continuous_usage_stats": True}
    chat_call("stream_usage", {"messages": MESSAGES, "max_tokens": 4, "stream": True, "stream_options": options})
    chat_call("stream_n", {"messages": MESSAGES, "max_tokens": 2, "n": 2, "stream": True, "logprobs": True})
    chat_call("stream_tools", {"messages": MESSAGES, "tools": [WEATHER], "tool_choice": "required", "stream": True})
    chat_call("stream_empty", {"messages": MESSAGES, "max_tokens": 0, "stream": True})

    completion_call("plain", {"model": "m", "prompt": "Once upon a time", "max_tokens": 4})
    completion_call("batch_n_logprobs", {"prompt": ["a", "b"], "n": 2, "max_tokens": 2, "logprobs": 2})
    completion_call(
        "stream_usage", {"prompt": "x", "max_tokens": 3, "stream": True, "stream_options": options, "echo": False}
    )
    completion_call("stream_batch", {"prompt": ["x", "y"], "max_tokens": 2, "stream": True})

    for name, body in {"float": {"input": "hello"}, "base64": {"input": ["a", "b"], "encoding_format": "base64"},
                       "dims": {"input": "x", "dimensions": 8, "model": "any"}}.items():  # fmt: skip
        a.add(f"request.embedding.{name}", "embedding.request", body)
        r = e.post("/v1/embeddings", json=body)
        assert r.status_code == 200, r.text
        a.add(f"embedding.{name}", "embedding.response", r.json())

    errors = {
        "content_type": c.post("/v1/chat/completions", content=b"{}", headers={"Content-Type": "text/plain"}),
        "bad_json": c.post("/v1/completions", content=b"{", headers={"Content-Type": "application/json"}),
        "too_long": c.post("/v1/completions", json={"prompt": "x", "max_tokens": 10**7}),
        "zero_tokens": c.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}),
        "empty_messages": c.post("/v1/chat/completions", json={"messages": []}),
        "wrong_kind": e.post("/v1/chat/completions", json={"messages": MESSAGES}),
        "embedding_format": e.post("/v1/embeddings", json={"input": "x", "encoding_format": "hex"}),
    }
    chat.set_faults(error_rate=1.0, error_status=503)
    errors["injected"] = c.post("/v1/chat/completions", json={"messages": MESSAGES})
    chat.reset_faults()
    for name, r in errors.items():
        assert r.status_code in (400, 503), (name, r.status_code, r.text)
        a.add(f"error.{name}", "error", r.json())

    a.add("models.list", "models", c.get("/v1/models").json())
    a.add("models.one", "model", c.get("/v1/models/sim-chat").json())
    a.add("tokenize.prompt", "tokenize", c.post("/v1/tokenize", json={"prompt": "Hello, world"}).json())
    a.add("tokenize.batch", "tokenize", c.post("/v1/tokenize", json={"prompt": ["a", "b c"]}).json())
    a.add("tokenize.messages", "tokenize", c.post("/v1/tokenize", json={"messages": MESSAGES}).json())
    a.add("detokenize.one", "detokenize", c.post("/v1/detokenize", json={"tokens": [128000, 1003]}).json())
    a.add("detokenize.batch", "detokenize", c.post("/v1/detokenize", json={"tokens": [[1003], [1005]]}).json())
    a.add("info.model_info", "model_info.keys", c.get("/model_info").json())
    loads = c.get("/v1/loads", params={"include": "core"}).json()
    a.add("info.loads", "load.keys", loads["loads"][0])
    return a


@pytest.fixture(scope="module")
def answers() -> Iterator[Answers]:
    python = reference_python()
    args = [*FAST, "--enable-metrics"]
    chat = SimProcess(served_model_name="sim-chat", api_key=KEY, args=args)
    embed = SimProcess(model_path="sim/embed", embedding=True, args=[*FAST, "--embedding-dim", "16"])
    try:
        for sim in (chat, embed):  # both start at once
            sim.start(wait=False)
        for sim in (chat, embed):
            sim.wait_ready(30)
        collected = collect(chat, embed)
    finally:
        chat.stop()
        embed.stop()
    add_known_differences(collected)
    collected.check(python)
    yield collected


def add_known_differences(a: Answers) -> None:
    """Documents that differ from SGLang's on purpose, so a test can prove the comparison catches them."""
    plain = next(doc for name, _, doc in a.items if name == "chat.plain")
    a.add("x.extra", "chat.response", {**plain, "extra": 1})
    a.add("x.missing", "chat.response", {k: v for k, v in plain.items() if k != "metadata"})
    a.add("x.type", "error", {"object": "error", "message": "m", "type": "t", "param": None, "code": "400x"})
    a.add("x.nested", "error", {"error": {"message": "m"}})


@pytest.mark.parametrize(
    "prefix",
    ["request.", "chat.", "chat.stream.", "completion.", "completion.stream.", "embedding.", "error.", "models.",
     "tokenize.", "detokenize.", "info."],
)  # fmt: skip
def test_answers_are_what_sglang_serializes(answers: Answers, prefix: str) -> None:
    failures = answers.failures(prefix)
    assert not failures, "\n".join(failures)


def test_the_suite_would_catch_a_difference(answers: Answers) -> None:
    """The comparison is not vacuous: an extra key, a missing one, a wrong type, another shape are reported."""
    assert len(answers.failures("x.")) == 4


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
