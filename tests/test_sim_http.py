"""Real `python -m model_server sim` processes on free loopback ports, driven by the openai SDK and httpx."""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import psutil
import pytest
from _waiting import wait_for

from model_server.common.urls import bearer_headers
from model_server.sim.process import SimProcess, free_port

KEY = "test-key-123"
AUTH = bearer_headers(KEY)
FAST = ["--ttft-ms", "2", "--tpot-ms", "0.2", "--ttft-per-prompt-token-ms", "0", "--health-generate-s", "0.05"]
CHAT = [{"role": "user", "content": "Say hello, please."}]


@pytest.fixture(scope="module")
def chat_server() -> Iterator[SimProcess]:
    with SimProcess(served_model_name="sim-chat", api_key=KEY, args=[*FAST, "--enable-metrics"]) as sim:
        yield sim
    assert not psutil.pid_exists(sim.pid) or psutil.Process(sim.pid).status() == psutil.STATUS_ZOMBIE


@pytest.fixture
def server(chat_server: SimProcess) -> Iterator[SimProcess]:
    """The shared chat server, with every fault switched off again afterwards."""
    yield chat_server
    chat_server.reset_faults()


@pytest.fixture(scope="module")
def embed_server() -> Iterator[SimProcess]:
    with SimProcess(model_path="sim/embed", embedding=True, args=[*FAST, "--embedding-dim", "32"]) as sim:
        yield sim


def sdk(sim: SimProcess, timeout_s: float = 10.0, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url, api_key=key, max_retries=0, timeout=timeout_s)


def metric(sim: SimProcess, name: str) -> float:
    """The value of a metric, summed over its series (0 when it has none yet)."""
    text = httpx.get(sim.url + "/metrics", timeout=5).text
    assert f"# TYPE {name.removesuffix('_total')}" in text, f"{name} not in /metrics"
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


# --- the openai SDK, unchanged ---


def test_sdk_chat_with_honest_usage(server: SimProcess) -> None:
    client = sdk(server)
    reply = client.chat.completions.create(model="sim-chat", messages=CHAT, max_tokens=7)
    text = reply.choices[0].message.content
    assert reply.model == "sim-chat" and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7 == len(text.split())
    # Llama 3's template: BOS, 5 per message ("Say hello, please." is 5), 4 for the assistant header
    assert reply.usage.prompt_tokens == 1 + 5 + 5 + 4
    again = client.chat.completions.create(model="anything-at-all", messages=CHAT, max_tokens=7)  # any name, echoed
    assert again.choices[0].message.content == text and again.model == "anything-at-all"  # deterministic


def test_sdk_streamed_chat(server: SimProcess) -> None:
    client = sdk(server)
    full = client.chat.completions.create(model="sim-chat", messages=CHAT, max_tokens=12).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model="sim-chat", messages=CHAT, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_sdk_completions_with_stop(server: SimProcess) -> None:
    client = sdk(server)
    full = client.completions.create(model="sim-chat", prompt="Once upon", max_tokens=10)
    assert full.usage.completion_tokens == 10
    second_word = full.choices[0].text.split()[1]
    cut = client.completions.create(model="sim-chat", prompt="Once upon", max_tokens=10, stop=[" " + second_word])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == " " + full.choices[0].text.split()[0]
    assert cut.usage.completion_tokens == 2  # the stop string's token was generated, then trimmed
    assert cut.choices[0].model_extra["matched_stop"] == " " + second_word
    streamed = client.completions.create(model="sim-chat", prompt="Once upon", max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full.choices[0].text


def test_sdk_embeddings(embed_server: SimProcess) -> None:
    client = sdk(embed_server, key="anything")  # no key set: any key is accepted
    one = client.embeddings.create(model="sim/embed", input="hello")  # the SDK asks for base64
    vec = one.data[0].embedding
    assert len(vec) == 32 and abs(sum(v * v for v in vec) - 1.0) < 1e-4
    many = client.embeddings.create(model="sim/embed", input=["hello", "world"], encoding_format="float")
    assert [d.index for d in many.data] == [0, 1]
    assert max(abs(a - b) for a, b in zip(many.data[0].embedding, vec)) < 1e-6
    assert many.usage.prompt_tokens == 2


def sse_events(sim: SimProcess, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", sim.url + path, json=body, headers=AUTH, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]


def test_native_generate(server: SimProcess) -> None:
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 5}}
    out = httpx.post(server.url + "/generate", json=body, headers=AUTH, timeout=10).json()
    assert out["meta_info"]["completion_tokens"] == 5 and len(out["text"].split()) == 5
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    events = sse_events(server, "/generate", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["text"] == out["text"]
    assert [json.loads(e)["meta_info"]["completion_tokens"] for e in events[:-1]] == [1, 2, 3, 4, 5]
    assert json.loads(events[-2])["output_ids"] == out["output_ids"] and len(out["output_ids"]) == 5


def test_raw_stream_ends_with_done(server: SimProcess) -> None:
    events = sse_events(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"reasoning_content": None, "role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].keys() for c in chunks[1:-1]] == [{"reasoning_content", "content"}] * 3
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_info_routes_say_simulator(server: SimProcess) -> None:
    info = httpx.get(server.url + "/server_info", headers=AUTH, timeout=5).json()
    assert info["simulator"] is True and "simulated" in info["note"]
    assert info["api_key"] == KEY and info["version"] == "0.5.23"  # as SGLang: the key, behind the key
    assert httpx.get(server.url + "/get_server_info", headers=AUTH, timeout=5).json()["model_path"] == "sim/test-model"
    model = httpx.get(server.url + "/get_model_info", headers=AUTH, timeout=5).json()
    assert model["is_generation"] is True and model["served_model_name"] == "sim-chat"
    assert httpx.get(server.url + "/model_info", headers=AUTH, timeout=5).json() == model
    models = httpx.get(server.base_url + "/models", headers=AUTH, timeout=5).json()
    assert [(m["id"], m["root"]) for m in models["data"]] == [("sim-chat", "sim-chat")]  # root: the served name
    log = server.log_text()
    assert "simulated SGLang engine" in log
    assert "server_args={'model_path': 'sim/test-model'" in log and f"'api_key': '{KEY}'" in log  # as SGLang logs


# --- auth, errors ---


def test_api_key_required_except_health(server: SimProcess) -> None:
    url = server.base_url + "/models"
    assert httpx.get(url, timeout=5).status_code == 401
    wrong = httpx.get(url, headers=bearer_headers("nope"), timeout=5)
    assert wrong.status_code == 401 and wrong.json() == {"error": "Unauthorized"}
    assert httpx.get(url, headers=AUTH, timeout=5).status_code == 200
    for path in ("/health", "/health_generate", "/ready", "/metrics"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200, path
    assert httpx.options(url, headers={"Origin": "http://x", "Access-Control-Request-Method": "GET"}).is_success
    lowercase = httpx.get(url, headers={"Authorization": f"bearer {KEY}"}, timeout=5)  # SGLang: any case
    assert lowercase.status_code == 200
    assert httpx.post(server.url + "/sim/faults", json={"hang": True}, timeout=5).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        sdk(server, key="wrong").chat.completions.create(model="sim-chat", messages=CHAT)


def test_key_travels_in_config_file_not_argv(server: SimProcess) -> None:
    cmdline = " ".join(psutil.Process(server.pid).cmdline())
    assert "--config" in cmdline and KEY not in cmdline


def test_errors_use_sglang_flat_shape(server: SimProcess, embed_server: SimProcess) -> None:
    client = sdk(server)
    with pytest.raises(openai.BadRequestError, match="embedding"):
        client.embeddings.create(model="sim-chat", input="x")
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        sdk(embed_server).chat.completions.create(model="sim/embed", messages=CHAT)
    headers = {**AUTH, "Content-Type": "application/json"}
    bad = httpx.post(server.base_url + "/chat/completions", content=b"{", headers=headers, timeout=5)
    assert bad.status_code == 400
    assert bad.json().keys() == {"object", "message", "type", "param", "code"} and bad.json()["object"] == "error"
    # /generate: SGLang's validation error (flat) for no JSON, its contract error, its ValueError shape
    native = httpx.post(server.url + "/generate", content=b"{", headers=headers, timeout=5)
    assert native.status_code == 400 and native.json().keys() == {"object", "message", "type", "param", "code"}
    contract = httpx.post(server.url + "/generate", json={"sampling_params": {}}, headers=AUTH, timeout=5)
    assert contract.status_code == 400 and isinstance(contract.json()["error"], str)
    too_long = {"text": "x", "sampling_params": {"max_new_tokens": 10**6}}
    value = httpx.post(server.url + "/generate", json=too_long, headers=AUTH, timeout=5)
    assert value.status_code == 400 and "context length" in value.json()["error"]["message"]


# --- metrics ---


def test_metrics_names_and_counts_move(server: SimProcess) -> None:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    for name in (
        "num_running_reqs",
        "num_queue_reqs",
        "token_usage",
        "gen_throughput",
        "prompt_tokens_total",
        "generation_tokens_total",
        "num_requests_total",
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "inter_token_latency_seconds",
    ):
        assert f"sglang:{name}" in text, name
    assert 'engine_type="unified"' in text and 'tp_rank="0"' in text
    before = metric(server, "sglang:num_requests_total")
    tokens_before = metric(server, "sglang:generation_tokens_total")
    sdk(server).chat.completions.create(model="sim-chat", messages=CHAT, max_tokens=4)
    assert metric(server, "sglang:num_requests_total") == before + 1
    assert metric(server, "sglang:generation_tokens_total") == tokens_before + 4
    assert metric(server, "sglang:gen_throughput") > 0
    assert server.stats()["by_route"]["/v1/chat/completions"] >= 1


# --- run-time faults ---


def test_runtime_error_rate_gives_that_status(server: SimProcess) -> None:
    assert server.set_faults(error_rate=1.0, error_status=503)["error_status"] == 503
    r = httpx.post(server.base_url + "/chat/completions", json={"messages": CHAT}, headers=AUTH, timeout=5)
    assert r.status_code == 503 and "simulated fault" in r.json()["message"] and r.json()["object"] == "error"
    server.reset_faults()
    again = httpx.post(server.base_url + "/chat/completions", json={"messages": CHAT}, headers=AUTH, timeout=5)
    assert again.is_success


def test_runtime_fault_validation(server: SimProcess) -> None:
    r = httpx.post(server.url + "/sim/faults", json={"error_rate": 3}, headers=AUTH, timeout=5)
    assert r.status_code == 400 and "error_rate" in r.json()["message"]


def test_runtime_hang_times_out_client_while_health_ok(server: SimProcess) -> None:
    server.set_faults(hang=True)
    with pytest.raises(openai.APITimeoutError):
        sdk(server, timeout_s=0.5).chat.completions.create(model="sim-chat", messages=CHAT, max_tokens=2)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(server.url + "/health_generate", timeout=0.5)
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    server.reset_faults()
    assert sdk(server).chat.completions.create(model="sim-chat", messages=CHAT, max_tokens=2).choices


def test_runtime_slow_factor_is_slower(server: SimProcess) -> None:
    server.set_faults(slow_factor=1.0)
    client = sdk(server, timeout_s=30)

    def median_latency_s() -> float:
        times = []
        for _ in range(3):
            t0 = time.monotonic()
            client.completions.create(model="sim-chat", prompt="x", max_tokens=100)
            times.append(time.monotonic() - t0)
        return statistics.median(times)

    server.set_faults(slow_factor=1.0)
    fast = median_latency_s()  # ~2 ms + 99 x 0.2 ms
    server.set_faults(slow_factor=15.0)
    slow = median_latency_s()  # ~15 x that
    assert slow > 2 * fast, (fast, slow)


def test_runtime_malformed_body(server: SimProcess) -> None:
    server.set_faults(malformed_rate=1.0)
    r = httpx.post(server.base_url + "/completions", json={"prompt": "x"}, headers=AUTH, timeout=5)
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()
    with pytest.raises(ValueError):  # the SDK fails too (JSONDecodeError is a ValueError)
        sdk(server).completions.create(model="sim-chat", prompt="x")


def test_runtime_drop_stream_mid_way(server: SimProcess) -> None:
    server.set_faults(drop_stream_rate=1.0)
    received = []
    with pytest.raises(openai.APIConnectionError):
        stream = sdk(server).chat.completions.create(model="sim-chat", messages=CHAT, max_tokens=50, stream=True)
        for chunk in stream:
            received.append(chunk)
    # the role chunk and the first chunk with text arrived, then the connection broke
    assert [c.choices[0].delta.content for c in received] == ["", received[1].choices[0].delta.content]
    assert received[1].choices[0].delta.content
    body = {"messages": CHAT, "max_tokens": 50, "stream": True}
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", server.base_url + "/chat/completions", json=body, headers=AUTH, timeout=5) as r:
            for _ in r.iter_lines():
                pass


@pytest.mark.timeout(60)
def test_runtime_crash_after_exits_process() -> None:
    with SimProcess(args=FAST) as sim:
        client = sdk(sim)
        sim.set_faults(crash_after=2)
        client.completions.create(model=sim.model_path, prompt="x", max_tokens=1)
        with pytest.raises(openai.APIConnectionError):
            client.completions.create(model=sim.model_path, prompt="x", max_tokens=1)
        assert sim.wait_exit(20) == 1
        assert "simulated crash" in sim.log_text()


# --- faults and options at start ---


@pytest.mark.timeout(60)
def test_start_flag_faults() -> None:
    args = [*FAST, "--error-rate", "1", "--error-status", "429"]
    with SimProcess(args=args) as sim:
        r = httpx.post(sim.base_url + "/completions", json={"prompt": "x"}, timeout=5)
        assert r.status_code == 429 and r.json()["type"] == "429" and r.json()["code"] == 429
        assert sim.faults()["error_rate"] == 1.0
    with SimProcess(args=[*FAST, "--hang", "--malformed-rate", "1", "--drop-stream-rate", "1"]) as sim:
        faults = sim.faults()
        assert (faults["hang"], faults["malformed_rate"], faults["drop_stream_rate"]) == (True, 1.0, 1.0)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(sim.base_url + "/completions", json={"prompt": "x"}, timeout=0.5)
        sim.set_faults(hang=False)
        with pytest.raises(ValueError):
            httpx.post(sim.base_url + "/completions", json={"prompt": "x"}, timeout=5).json()


@pytest.mark.timeout(60)
def test_start_flag_crash_after() -> None:
    with SimProcess(args=[*FAST, "--crash-after", "1"]) as sim:
        with pytest.raises(httpx.TransportError):
            httpx.post(sim.base_url + "/completions", json={"prompt": "x"}, timeout=5)
        assert sim.wait_exit(20) == 1


@pytest.mark.timeout(60)
def test_refuses_connections_while_loading_then_503_while_warming_up() -> None:
    """SGLang listens only once its weights are loaded, then answers 503 on /health* while it warms up."""
    args = ["--startup-delay-s", "1", "--ttft-ms", "800", "--tpot-ms", "0", "--health-generate-s", "0.05"]
    sim = SimProcess(args=args)
    try:
        started = time.monotonic()
        sim.start(wait=False)

        def status(path: str) -> int | None:
            try:
                return httpx.get(sim.url + path, timeout=1).status_code
            except httpx.ConnectError:
                return None

        assert status("/health") is None and status("/v1/models") is None  # nothing listens while loading
        # warming up: its warm-up request takes the 0.8 s TTFT
        assert wait_for(lambda: status("/health"), 20.0, "/health to answer") == 503
        assert time.monotonic() - started >= 0.9
        assert status("/health_generate") == 503 and status("/ready") == 503
        assert status("/v1/models") == 200  # the other routes answer, as SGLang's do
        sim.wait_ready(30)  # connection refused and 503 were both "not yet", not errors
        assert status("/ready") == 200 and "fired up and ready to roll" in sim.log_text()
    finally:
        sim.stop()


@pytest.mark.timeout(60)
def test_health_generate_takes_about_the_poll_interval() -> None:
    with SimProcess(args=[*FAST[:-2], "--health-generate-s", "0.4"]) as sim:
        t0 = time.monotonic()
        assert httpx.get(sim.url + "/health_generate", timeout=5).status_code == 200
        assert 0.35 < time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        assert httpx.get(sim.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 0.3  # /health itself runs nothing


@pytest.mark.timeout(60)
def test_unknown_flag_exits_2() -> None:
    cmd = [sys.executable, "-m", "model_server", "sim", "--model-path", "m", "--no-such-flag"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_port_in_use_exits_2(server: SimProcess) -> None:
    cmd = [sys.executable, "-m", "model_server", "sim", "--model-path", "m", "--port", str(server.port)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{server.port}" in result.stderr and "Traceback" not in result.stderr


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536


@pytest.mark.timeout(60)
def test_running_batch_is_bounded_and_metrics_move() -> None:
    from concurrent.futures import ThreadPoolExecutor

    args = ["--ttft-ms", "400", "--tpot-ms", "0", "--max-running-requests", "2", "--enable-metrics"]
    with SimProcess(args=args) as sim:

        def one(_: int) -> int:
            body = {"prompt": "x", "max_tokens": 1}
            return httpx.post(sim.base_url + "/completions", json=body, timeout=30).status_code

        def loaded() -> bool:
            return metric(sim, "sglang:num_running_reqs") == 2 and metric(sim, "sglang:num_queue_reqs") >= 1

        with ThreadPoolExecutor(5) as pool:
            results = pool.map(one, range(5))
            wait_for(loaded, 20.0, "the sim to load")
            stats = sim.stats()
            assert stats["running"] == 2 and stats["queued"] >= 1
            assert metric(sim, "sglang:token_usage") > 0
            assert list(results) == [200] * 5
        assert metric(sim, "sglang:num_running_reqs") == 0
        assert metric(sim, "sglang:num_requests_total") == 5


def test_in_process_app_through_asgi_transport() -> None:
    """create_app() also runs in-process (a transport seam for fast client tests)."""
    import asyncio

    from model_server.sim.app import create_app
    from model_server.sim.settings import parse_sim_args

    settings = parse_sim_args(["--model-path", "m", "--ttft-ms", "0", "--tpot-ms", "0", "--api-key", "k"])

    async def scenario() -> tuple[int, dict]:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
            denied = await client.get("/v1/models")
            body = {"model": "m", "messages": CHAT, "max_tokens": 3}
            reply = await client.post("/v1/chat/completions", json=body, headers=bearer_headers("k"))
            return denied.status_code, reply.json()

    status, reply = asyncio.run(scenario())
    assert status == 401 and reply["usage"]["completion_tokens"] == 3


@pytest.mark.timeout(60)
def test_sim_exits_when_its_test_process_dies() -> None:
    code = (
        "import time\n"
        "from model_server.sim.process import SimProcess\n"
        "sim = SimProcess().start()\n"
        "print(sim.pid, flush=True)\n"
        "time.sleep(120)\n"  # stands for a test that gets killed before its cleanup
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = None
    try:
        pid = int(parent.stdout.readline())
        parent.kill()
        parent.wait(timeout=10)

        def gone() -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(gone, 20.0, "the orphaned sim to exit")
        pid = None
    finally:
        parent.kill()
        parent.wait(timeout=10)
        parent.stdout.close()
        if pid is not None:  # the orphan outlived the deadline: clean it up anyway
            with contextlib.suppress(psutil.NoSuchProcess):
                orphan = psutil.Process(pid)
                if "model_server" in " ".join(orphan.cmdline()):
                    orphan.kill()


@pytest.mark.timeout(60)
def test_a_sim_whose_chosen_port_is_taken_before_it_binds_starts_on_another() -> None:
    import socket

    sim = SimProcess(args=("--ttft-ms", "0"))
    taken = sim.port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", taken))
        holder.listen(1)  # another process won the race for the port
        with sim:
            assert sim.port != taken
            assert httpx.get(f"{sim.url}/health", timeout=5).status_code == 200
    given = SimProcess(port=taken)  # a port the caller chose is never changed behind its back
    assert given.port == taken
