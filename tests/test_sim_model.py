"""The simulator's pure parts: latency model, faults, tokenizer and filler, embeddings, flags, metrics."""

from __future__ import annotations

import asyncio
import json
import math
import random

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from model_server.sim import text as simtext
from model_server.sim.engine import CRASH_EXIT_STATUS, SimEngine
from model_server.sim.faults import FaultError, Faults, ReplyFault, decide
from model_server.sim.latency import MIN_SLICE_S, LatencyModel, RunningBatch, tokens_per_slice
from model_server.sim.metrics import ThroughputMeter
from model_server.sim.settings import SimSettings, parse_sim_args

# --- latency model ---


def test_ttft_grows_with_prompt_and_slow_factor() -> None:
    m = LatencyModel(ttft_ms=20, ttft_per_prompt_token_ms=0.5, tpot_ms=2, tpot_growth=0.1)
    assert m.ttft_s(0) == pytest.approx(0.020)
    assert m.ttft_s(100) == pytest.approx(0.070)
    assert m.ttft_s(100, slow_factor=3) == pytest.approx(0.210)


def test_tpot_grows_with_running_batch() -> None:
    m = LatencyModel(ttft_ms=0, ttft_per_prompt_token_ms=0, tpot_ms=2, tpot_growth=0.1)
    assert m.tpot_s(1) == pytest.approx(0.002)
    assert m.tpot_s(11) == pytest.approx(0.004)  # 2 ms x (1 + 0.1 x 10)
    assert m.tpot_s(0) == m.tpot_s(1)  # never below one running request
    assert m.tpot_s(11, slow_factor=2) == pytest.approx(0.008)
    assert m.total_s(prompt_tokens=0, output_tokens=11) == pytest.approx(10 * 0.002)


def test_tokens_per_slice_covers_min_slice() -> None:
    assert tokens_per_slice(0.0) > 10**6  # zero latency: one step, no sleeping
    assert tokens_per_slice(1.0) == 1
    k = tokens_per_slice(0.001)
    assert k * 0.001 >= MIN_SLICE_S and (k - 1) * 0.001 < MIN_SLICE_S


def test_running_batch_bounds_concurrency_and_counts_queue() -> None:
    async def scenario() -> tuple[int, int, int]:
        batch = RunningBatch(capacity=2)
        release = asyncio.Event()
        peak = 0

        async def request() -> None:
            nonlocal peak
            async with batch.slot(tokens=10):
                peak = max(peak, batch.running)
                await release.wait()

        tasks = [asyncio.create_task(request()) for _ in range(5)]
        for _ in range(100):  # let every task reach the batch
            await asyncio.sleep(0)
        seen = (batch.running, batch.queued, batch.running_tokens)
        release.set()
        await asyncio.gather(*tasks)
        assert (batch.running, batch.queued, batch.running_tokens) == (0, 0, 0)
        assert peak == 2
        return seen

    assert asyncio.run(scenario()) == (2, 3, 20)


# --- faults ---


def test_no_faults_proceed_without_drawing() -> None:
    rng = random.Random(1)
    before = rng.getstate()
    assert decide(Faults(), request_number=1, stream=True, rng=rng) is ReplyFault.PROCEED
    assert rng.getstate() == before


@pytest.mark.parametrize(
    ("faults", "stream", "expected"),
    [
        (Faults(error_rate=1.0), False, ReplyFault.ERROR),
        (Faults(malformed_rate=1.0), False, ReplyFault.MALFORMED),
        (Faults(drop_stream_rate=1.0), True, ReplyFault.DROP_STREAM),
        (Faults(drop_stream_rate=1.0), False, ReplyFault.PROCEED),  # only streams can be cut
        (Faults(hang=True, error_rate=1.0), False, ReplyFault.HANG),  # hang wins over error
        (Faults(crash_after=1, hang=True), False, ReplyFault.CRASH),  # crash wins over all
    ],
)
def test_fault_decisions(faults: Faults, stream: bool, expected: ReplyFault) -> None:
    assert decide(faults, request_number=1, stream=stream, rng=random.Random(0)) is expected


def test_crash_after_counts_requests() -> None:
    f = Faults(crash_after=3)
    actions = [decide(f, request_number=n, stream=False, rng=random.Random(0)) for n in (1, 2, 3)]
    assert actions == [ReplyFault.PROCEED, ReplyFault.PROCEED, ReplyFault.CRASH]


def test_error_rate_is_a_share_and_reproducible() -> None:
    def run(seed: int) -> list[ReplyFault]:
        rng = random.Random(seed)
        return [decide(Faults(error_rate=0.3), request_number=i, stream=False, rng=rng) for i in range(1, 4001)]

    first = run(7)
    share = first.count(ReplyFault.ERROR) / len(first)
    assert 0.25 < share < 0.35
    assert run(7) == first
    assert run(8) != first


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"error_status": 200}, "error_status"),
        ({"hang": "yes"}, "hang"),
        ({"slow_factor": 0}, "slow_factor"),
        ({"crash_after": 0}, "crash_after"),
        ({"bogus": 1}, "unknown fault 'bogus'"),
    ],
)
def test_bad_fault_settings_are_named(changes: dict, needle: str) -> None:
    with pytest.raises(FaultError, match=needle):
        Faults().updated(changes)


def test_every_fault_has_a_rule_its_default_meets() -> None:
    assert Faults().updated(Faults().as_dict()) == Faults()  # an unknown name or a bad value would raise


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"drop_stream_rate": True}, "drop_stream_rate must be a number between 0 and 1, got True"),
        ({"error_status": 600}, "error_status must be an HTTP error status 400-599, got 600"),
        ({"slow_factor": float("inf")}, "slow_factor must be a number > 0, got inf"),
        ({"crash_after_tokens": -1}, "crash_after_tokens must be an integer >= 0 or null, got -1"),
        ({"hang_before_first_token": 1}, "hang_before_first_token must be true or false, got 1"),
    ],
)
def test_fault_messages_say_what_the_value_must_be(changes: dict, message: str) -> None:
    with pytest.raises(FaultError) as err:
        Faults().updated(changes)
    assert str(err.value) == message


def test_faults_update_is_a_copy() -> None:
    base = Faults()
    changed = base.updated({"error_rate": 0.5, "error_status": 503})
    assert base.error_rate == 0.0 and changed.error_rate == 0.5 and changed.error_status == 503
    assert Faults.from_settings(SimSettings(model_path="m", hang=True)).hang is True


def test_engine_crash_after_calls_exit() -> None:
    exits: list[int] = []
    engine = SimEngine(SimSettings(model_path="m", crash_after=2), exit_process=exits.append)
    engine.admit("/v1/completions", stream=False)
    assert exits == []
    engine.admit("/v1/completions", stream=False)
    assert exits == [CRASH_EXIT_STATUS]
    engine.set_faults({"crash_after": 2})  # re-armed: counts again from zero
    engine.admit("/v1/completions", stream=False)
    assert exits == [CRASH_EXIT_STATUS]
    assert engine.stats()["requests_total"] == 3


# --- tokenizer, template, filler, stop, embeddings ---


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("", 0),
        ("Hello, world!", 4),
        ("a  b\tc\n", 4),  # a newline run is a token, other whitespace is free
        ("don't", 3),
        ("x1_y2 z", 6),
        ("2026", 2),  # digits in runs of at most 3, like Llama 3
        ("internationalization", 2),  # letters in runs of at most 12
        ("你好世界", 4),  # one token per CJK character
        ("<|eot_id|>", 1),  # a template marker is one token
    ],
)
def test_tokenizer_counts(text: str, n: int) -> None:
    assert simtext.count_tokens(text) == n
    assert len(simtext.tokenize(text)) == n


def test_chat_template_costs_what_llama3_costs() -> None:
    context, prefix = simtext.chat_context([{"role": "user", "content": "Hi"}])
    assert context == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert prefix == "" and simtext.count_tokens(context) == 11  # 1 BOS + 5 per message + 1 content + 4


def test_chat_template_continue_final_message() -> None:
    base = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    plain, _ = simtext.chat_context(base)
    assert "system<|end_header_id|>\n\nBe brief.<|eot_id|>" in plain and "user<|end_header_id|>\n\nHi" in plain
    cont, prefix = simtext.chat_context([*base, {"role": "assistant", "content": "Sure"}], continue_final_message=True)
    assert cont == plain + "Sure" and prefix == "Sure"  # the assistant turn is left open
    # without the flag, a final assistant message is sent as a user's (SGLang's rule)
    turned, prefix = simtext.chat_context([*base, {"role": "assistant", "content": "Sure"}])
    assert prefix == ""
    assert turned.endswith("user<|end_header_id|>\n\nSure<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError):
        simtext.chat_context(["not a message"])


@given(st.text(max_size=30), st.integers(min_value=0, max_value=300), st.integers(0, 3))
def test_filler_has_exactly_n_tokens(context: str, n: int, seed: int) -> None:
    made = simtext.generate(context, n, seed)
    assert len(made.pieces) == n and not made.eos
    assert simtext.count_tokens("".join(made.pieces)) == n
    assert all(simtext.count_tokens(p) == 1 for p in made.pieces)


def test_filler_is_deterministic_per_context_and_seed() -> None:
    a = simtext.generate("hello", 20).pieces
    assert a == simtext.generate("hello", 20).pieces
    assert a != simtext.generate("goodbye", 20).pieces
    assert a != simtext.generate("hello", 20, seed=1).pieces
    assert a[0].startswith(" ") and not simtext.generate("hello ", 5).pieces[0].startswith(" ")


@hyp_settings(max_examples=200)
@given(
    context=st.text(max_size=40),
    m=st.integers(min_value=1, max_value=120),
    k=st.integers(min_value=0, max_value=120),
    seed=st.integers(0, 5),
    until_eos=st.booleans(),
)
def test_resumed_filler_is_the_uninterrupted_filler(context: str, m: int, k: int, seed: int, until_eos: bool) -> None:
    """The first k pieces appended to the context continue with piece k+1, EOS included."""
    eos_from = 0 if until_eos else None
    whole = simtext.generate(context, m, seed, eos_from=eos_from)
    k = min(k, len(whole.pieces))
    received = "".join(whole.pieces[:k])
    rest = simtext.generate(context + received, m - k, seed, eos_from=None if eos_from is None else k)
    assert whole.pieces[:k] + rest.pieces == whole.pieces
    assert rest.eos == whole.eos


def test_eos_ends_replies_at_a_bounded_length() -> None:
    lengths = []
    for i in range(300):
        made = simtext.generate(f"prompt {i}", 10_000, eos_from=0)
        assert made.eos
        lengths.append(len(made.pieces))
    assert min(lengths) >= simtext.EOS_MIN_TOKENS and max(lengths) <= simtext.EOS_MAX_TOKENS
    assert 30 < sum(lengths) / len(lengths) < 70  # ~48 on average
    assert not simtext.generate("p", 10_000, eos_from=None).eos  # a length of its own: no EOS


def test_stop_cuts_before_earliest_match() -> None:
    assert simtext.apply_stop("alpha beta gamma beta", ["gamma", "beta"]) == ("alpha ", "beta")
    assert simtext.apply_stop("alpha beta", ["zeta", ""]) == ("alpha beta", None)


@given(st.text(alphabet=st.sampled_from("ab \n"), max_size=40))
def test_stream_pieces_join_back(text: str) -> None:
    assert "".join(simtext.split_pieces(text)) == text


def test_embeddings_are_deterministic_unit_vectors() -> None:
    a = simtext.embed("hello", 64, 0)
    assert len(a) == 64
    assert math.sqrt(sum(v * v for v in a)) == pytest.approx(1.0)
    simtext.embed.cache_clear()
    assert simtext.embed("hello", 64, 0) == a
    b = simtext.embed("hello!", 64, 0)
    assert abs(sum(x * y for x, y in zip(a, b))) < 0.9  # a different input points elsewhere
    assert simtext.embed("hello", 64, 1) != a


# --- flags ---


def test_defaults_and_sglang_flags() -> None:
    s = parse_sim_args(["--model-path", "m", "--tensor-parallel-size", "2", "--mem-fraction-static", "0.8"])
    assert (s.model_path, s.model_name, s.port, s.host, s.tp_size, s.mem_fraction_static) == (
        "m",
        "m",
        30000,
        "127.0.0.1",
        2,
        0.8,
    )
    assert (s.ttft_ms, s.tpot_ms, s.tpot_growth, s.embedding_dim, s.max_running_requests) == (20, 2, 0.05, 256, None)
    assert s.log_level == "info" and s.health_generate_s == 1.0  # SGLang's default level and health poll


def test_flag_defaults_are_the_settings_defaults() -> None:
    """One home for the defaults: no flag given means SimSettings' own value, faults off as Faults() has them."""
    assert parse_sim_args(["--model-path", "m"]) == SimSettings(model_path="m")
    assert Faults.from_settings(SimSettings(model_path="m")) == Faults()


def test_server_args_are_sglangs_key_included(tmp_path) -> None:
    """SGLang logs (and /server_info returns) the resolved args with the key in clear; so does the sim."""
    cfg = tmp_path / "k.yaml"
    cfg.write_text("api-key: s3cret\n")
    s = parse_sim_args(["--model-path", "m", "--config", str(cfg)])
    args = s.server_args()
    assert args["api_key"] == "s3cret" and args["served_model_name"] == "m" and args["context_length"] == 32768
    assert "s3cret" not in repr(s)  # the sim's own repr still hides it


@pytest.mark.parametrize(
    ("argv", "pool", "running"),
    [
        (["--model-path", "sim/llama-8b"], 445_644, 4096),  # (80 x 0.88 - 16) GiB / 128 KiB, clamped to 4096
        (["--model-path", "sim/llama-70b", "--tp-size", "4", "--mem-fraction-static", "0.8"], 950_272, 4096),
        (["--model-path", "m", "--max-total-tokens", "10000"], 10_000, 2048),  # at least 2048 ...
        (["--model-path", "m", "--max-total-tokens", "3000"], 3000, 1500),  # ... but at most half the pool
        (["--model-path", "m", "--max-running-requests", "7"], 445_644, 7),
    ],
)
def test_max_running_requests_comes_from_the_simulated_kv_pool(argv: list[str], pool: int, running: int) -> None:
    from model_server.sim.engine import kv_pool

    assert kv_pool(parse_sim_args(argv)) == (pool, running)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--model-path", "m", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "required: --model-path"),
        (["--model-path", "m", "--error-rate", "2"], "--error-rate"),
        (["--model-path", "m", "--error-status", "200"], "--error-status"),
        (["--model-path", "m", "--port", "70000"], "--port"),
        (["--model-path", "m", "--log-level", "chatty"], "--log-level"),
        (["--model-path", "m", "--config", "settings.txt"], "Config file must be YAML format, got: .txt"),
        (["--model-path", "m", "--tpot-ms", "nan"], "argument --tpot-ms: nan must be a number >= 0"),
        (["--model-path", "m", "--slow-factor", "0"], "argument --slow-factor: 0 must be a number > 0"),
        (["--model-path", "m", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (["--model-path", "m", "--crash-after", "x"], "argument --crash-after: invalid integer >= 1 value: 'x'"),
    ],
)
def test_bad_flags_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_sim_args(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_config_yaml_supplies_options_and_command_line_wins(tmp_path) -> None:
    cfg = tmp_path / "sim.yaml"
    cfg.write_text("api-key: s3cret\nmodel_path: from-file\nport: 1234\nis-embedding: true\ntpot-ms: 7\n")
    s = parse_sim_args(["--config", str(cfg), "--port", "4321"])
    assert (s.api_key, s.model_path, s.port, s.is_embedding, s.tpot_ms) == ("s3cret", "from-file", 4321, True, 7.0)
    assert "s3cret" not in repr(s)


@pytest.mark.parametrize(
    ("content", "needle"),
    [("bogus-key: 1\n", "unrecognized option 'bogus-key'"), ("- a\n", "mapping"), ("port: [\n", "not valid YAML")],
)
def test_bad_config_yaml_exits_2(tmp_path, content: str, needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "sim.yaml"
    cfg.write_text(content)
    with pytest.raises(SystemExit) as exc:
        parse_sim_args(["--model-path", "m", "--config", str(cfg)])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


# --- metrics ---


def test_throughput_meter_window() -> None:
    now = [100.0]
    meter = ThroughputMeter(window_s=10, clock=lambda: now[0])
    now[0] = 110.0
    meter.add(50)
    meter.add(50)
    assert meter.rate() == pytest.approx(10.0)  # 100 tokens over the 10 s window
    now[0] = 125.0
    assert meter.rate() == 0.0


# --- the HTTP layer in-process: bad input is always a 400 in SGLang's error shape, never a 500 ---

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_fields = st.sampled_from(
    [
        "model",
        "messages",
        "prompt",
        "input",
        "text",
        "max_tokens",
        "stop",
        "stream",
        "n",
        "sampling_params",
        "encoding_format",
        "stream_options",
        "max_completion_tokens",
        "input_ids",
        "tools",
        "tool_choice",
        "response_format",
        "logprobs",
        "top_logprobs",
        "stop_token_ids",
        "min_tokens",
        "continue_final_message",
        "ignore_eos",
        "seed",
        "temperature",
        "dimensions",
        "json_schema",
        "return_logprob",
        "top_logprobs_num",
    ]
)


@hyp_settings(deadline=None, max_examples=150)
@given(
    route=st.sampled_from(
        [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/generate",
            "/encode",
            "/sim/faults",
            "/v1/tokenize",
            "/v1/detokenize",
        ]
    ),
    body=st.dictionaries(_fields, _json_values, max_size=5) | _json_values,
)
def test_random_bodies_never_cause_a_server_error(route: str, body: object) -> None:
    import httpx

    from model_server.sim.app import create_app

    settings = SimSettings(model_path="m", ttft_ms=0, tpot_ms=0, ttft_per_prompt_token_ms=0)

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
            # Python's json.dumps, not httpx's strict encoder: inf becomes Infinity, which a careless
            # client can send and the server must refuse like any other bad value.
            content = json.dumps(body)
            return await client.post(route, content=content, headers={"Content-Type": "application/json"})

    response = asyncio.run(send())
    assert response.status_code in (200, 400), response.text
    flat = {"object", "message", "type", "param", "code"}  # SGLang's ErrorResponse
    if response.status_code != 200 and route in ("/generate", "/encode"):
        answer = response.json()
        # SGLang's three: a body that is no JSON object (flat), a contract violation ({"error": why}),
        # a request it cannot serve ({"error": {"message": why}})
        assert set(answer) == flat or (
            set(answer) == {"error"} and (isinstance(answer["error"], str) or set(answer["error"]) == {"message"})
        )
    elif response.status_code != 200:
        assert set(response.json()) == flat
    elif route != "/sim/faults" and not (isinstance(body, dict) and body.get("stream")):
        response.json()  # a 200 is valid JSON (no faults are on)


def test_listening_socket_is_tcp_so_asyncio_disables_nagle() -> None:
    # asyncio sets TCP_NODELAY only on accepted sockets whose proto is IPPROTO_TCP; with
    # proto 0 every two-part response waits ~40 ms for the client's delayed ACK.
    import socket

    from model_server.sim.process import free_port
    from model_server.sim.serve import bind_socket

    sock = bind_socket("127.0.0.1", free_port())
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
