"""SGLang's native routes: /generate, /encode, health, readiness, info, loads, cache, metrics.

Health as in SGLang 0.5.23's http_server.py: while the server warms up
(ServerStatus.Starting) /health and /health_generate answer 503; after it,
/health answers 200 at once, and /health_generate sends a one-token request
and polls for it every ``--health-generate-s`` (SGLang: 1 s, so a healthy
probe takes about that long), giving up with 503 after
``SGLANG_HEALTH_CHECK_TIMEOUT`` seconds (20).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from model_server.sim import text as simtext
from model_server.sim.engine import Timing
from model_server.sim.metrics import CONTENT_TYPE
from model_server.sim.protocol import (
    BadRequest,
    dumps,
    generate_meta,
    json_response,
    max_tokens_of,
    new_id,
    openai_error,
    prompts_of,
    read_body,
    sampling_of,
)
from model_server.sim.reply import Reply, piece_logprobs
from model_server.sim.server import SIMULATOR_NOTICE, SimServer
from model_server.sim.streaming import generate_stream, sse

__all__ = ["SGLANG_VERSION", "register"]

SGLANG_VERSION = "0.5.23"  # the version whose HTTP surface the sim answers
_FLUSHED = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)


def _health_check_timeout_s() -> float:
    try:
        return float(os.environ.get("SGLANG_HEALTH_CHECK_TIMEOUT", "20"))
    except ValueError:
        return 20.0


def register(server: SimServer) -> None:
    settings = server.settings
    engine = server.engine
    route = server.route

    def native_error(message: str, status: int = 400) -> Response:
        """SGLang's /generate answer to a request it cannot serve (a ValueError)."""
        return json_response({"error": {"message": message}}, status)

    async def generate(request: Request) -> Response:
        data = await read_body(request)  # not JSON: SGLang's validation error, the flat shape
        try:
            server.check_kind(False, "/generate")
        except BadRequest as err:
            return native_error(str(err))
        try:  # SGLang's generate_contract_error: {"error": "<why>"}
            source = data.get("text") if data.get("text") is not None else data.get("input_ids")
            prompts = prompts_of(source, "text")
            batch = isinstance(source, list) and bool(source) and isinstance(source[0], (str, list))
            params = data.get("sampling_params") or {}
            if not isinstance(params, dict):
                raise BadRequest("sampling_params must be an object", param="sampling_params")
            max_tokens = max_tokens_of(params, "generate", "max_new_tokens")
            assert max_tokens is not None
            sampling = sampling_of(data, max_new=max_tokens, settings_seed=settings.seed, params=params)
            top = data.get("top_logprobs_num", 0) if data.get("return_logprob") else None
            if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 0):
                raise BadRequest("top_logprobs_num must be an integer >= 0", param="top_logprobs_num")
        except BadRequest as err:
            return json_response({"error": str(err)}, 400)
        limit = settings.effective_context_length
        for _, tokens in prompts:
            if tokens >= limit or tokens + max_tokens > limit:
                return native_error(
                    f"Requested token count exceeds the model's maximum context length of {limit} tokens. "
                    f"You requested a total of {tokens + max_tokens} tokens: {tokens} tokens from the input "
                    f"messages and {max_tokens} tokens for the completion. Please reduce the number of tokens "
                    "in the input messages or the completion to fit within the limit."
                )
        stream = bool(data.get("stream"))
        fault = await server.admit("/generate", stream)
        failed = server.fault_response(fault, stream, native=True)
        if failed is not None:
            return failed
        replies = [(i, Reply(text, sampling)) for i, (text, _) in enumerate(prompts)]
        prompt_tokens = sum(tokens for _, tokens in prompts)
        rids = [new_id() for _ in replies]

        def meta(index: int, reply: Reply, k: int, finished: bool) -> dict:
            info = generate_meta(reply, prompts[index][1], k, rids[index], finished)
            if top is not None:
                lps = [piece_logprobs(p, j, top) for j, p in enumerate(reply.pieces[:k])]
                ids = reply.token_ids[:k]
                info["output_token_logprobs"] = [[lp, tid, None] for (lp, _), tid in zip(lps, ids)]
                info["output_top_logprobs"] = [
                    [[alp, simtext.token_id(t), None] for t, alp in alternatives] for _, alternatives in lps
                ]
            if finished:
                info["e2e_latency"] = round(engine.clock() - arrived, 6)
            return info

        arrived = engine.clock()
        if stream:
            return sse(generate_stream(engine, replies, prompt_tokens, fault, meta))
        await engine.hold_unstreamed(max(r.tokens for _, r in replies))
        await engine.run(prompt_tokens, sum(r.tokens for _, r in replies), timing=Timing(arrived))
        outs = [
            {"text": r.text, "output_ids": r.token_ids, "meta_info": meta(i, r, r.tokens, True)} for i, r in replies
        ]
        return json_response(outs if batch else outs[0])

    route("/generate", "POST", "PUT")(generate)

    async def encode(request: Request) -> Response:
        data = await read_body(request)
        try:
            server.check_kind(True, "/encode")
        except BadRequest as err:
            return native_error(str(err))
        source = data.get("text") if data.get("text") is not None else data.get("input_ids")
        try:
            inputs = prompts_of(source, "text")
        except BadRequest as err:
            return json_response({"error": str(err)}, 400)
        batch = isinstance(source, list) and bool(source) and isinstance(source[0], (str, list))
        for _, tokens in inputs:
            if tokens >= settings.effective_context_length:
                return native_error(
                    f"The input ({tokens} tokens) is longer than the model's context length "
                    f"({settings.effective_context_length} tokens)."
                )
        fault = await server.admit("/encode", False)
        failed = server.fault_response(fault, False, native=True)
        if failed is not None:
            return failed
        await engine.run(sum(tokens for _, tokens in inputs), 0)
        outs = []
        for text_in, tokens in inputs:
            meta = {
                "id": new_id(),
                "finish_reason": {"type": "length", "length": 0},
                "prompt_tokens": tokens,
                "weight_version": "default",
                "num_retractions": 0,
            }
            vector = list(simtext.embed(text_in, settings.embedding_dim, settings.seed))
            outs.append({"embedding": vector, "meta_info": meta})
        return json_response(outs if batch else outs[0])

    route("/encode", "POST", "PUT")(encode)

    # --- health and readiness ---

    @route("/health", "GET")
    async def health(request: Request) -> Response:
        return Response(status_code=503 if engine.starting else 200)

    @route("/health_generate", "GET")
    async def health_generate(request: Request) -> Response:
        if engine.starting:
            return Response(status_code=503)

        async def probe() -> None:
            await engine.hang()
            await engine.hold_unstreamed(1)
            if engine.batch.running == 0:  # like SGLang, no extra work when requests are running
                await engine.run(1, 1, record=False)

        task = asyncio.create_task(probe())
        deadline = time.monotonic() + _health_check_timeout_s()
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(settings.health_generate_s)
                if task.done():
                    return Response(status_code=200)
            return Response(status_code=503)
        finally:
            task.cancel()

    @route("/ready", "GET")
    async def ready(request: Request) -> Response:
        return Response(status_code=503 if engine.starting else 200)

    @route("/ping", "GET")
    async def ping(request: Request) -> Response:
        return Response(status_code=200)

    @route("/", "GET", "HEAD")
    async def root(request: Request) -> Response:
        return Response(dumps("SGLang is running"), media_type="application/json")

    # --- info ---

    async def model_info(request: Request) -> Response:
        return json_response(
            {
                "model_path": settings.model_path,
                "served_model_name": settings.model_name,
                "tokenizer_path": settings.model_path,
                "is_generation": not settings.is_embedding,
                "preferred_sampling_params": None,
                "weight_version": "default",
                "load_format": "auto",
                "reasoning_parser": None,
                "tool_call_parser": None,
                "disaggregation_mode": "null",
                "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "simulator": True,
                "note": SIMULATOR_NOTICE,
            }
        )

    def internal_state() -> dict:
        return {
            "num_running_reqs": engine.batch.running,
            "num_queue_reqs": engine.batch.queued,
            "max_total_num_tokens": engine.max_total_num_tokens,
            "max_running_requests": engine.max_running_requests,
        }

    async def server_info(request: Request) -> Response:
        info: dict[str, Any] = settings.server_args()
        info.update(
            {
                "max_running_requests": engine.max_running_requests,
                "launch_command": " ".join(sys.argv[1:]),
                "max_total_num_tokens": engine.max_total_num_tokens,
                "max_req_input_len": settings.effective_context_length - 1,
                "kv_events": None,
                "startup_time": engine.startup_time,
                "internal_states": [internal_state()],
                "version": SGLANG_VERSION,
                "frontend": "python",
                "simulator": True,
                "note": SIMULATOR_NOTICE,
                "faults": engine.faults.as_dict(),
            }
        )
        return json_response(info)

    for path in ("/model_info", "/get_model_info"):
        route(path, "GET")(model_info)
    for path in ("/server_info", "/get_server_info"):
        route(path, "GET")(server_info)

    # --- load, cache, metrics ---

    def load_snapshot() -> dict:
        used = engine.batch.running_tokens
        total = engine.max_total_num_tokens
        return {
            "timestamp": time.time(),
            "dp_rank": 0,
            "num_running_reqs": engine.batch.running,
            "num_waiting_reqs": engine.batch.queued,
            "num_waiting_uncached_tokens": 0,
            "num_used_tokens": used,
            "num_total_tokens": used,
            "num_active_tokens": used,
            "num_prealloc_ready_tokens": 0,
            "max_total_num_tokens": total,
            "max_running_requests": engine.max_running_requests,
            "token_usage": engine.token_usage(),
            "gen_throughput": engine.metrics.throughput.rate() if engine.metrics else 0.0,
            "cache_hit_rate": 0.0,
            "utilization": 1.0 if engine.batch.running else 0.0,
            "total_prefill_uncached_tokens": 0,
            "total_prefill_busy_us": 0,
            "decode_moments": None,
        }

    @route("/v1/loads", "GET")
    async def loads(request: Request) -> Response:
        include = request.query_params.get("include")
        sections = {s.strip() for s in include.split(",")} if include else set()
        valid = {"core", "memory", "spec", "lora", "disagg", "queues", "all"}
        if not sections <= valid:
            message = f"Invalid include sections: {sections - valid}. Valid options: {sorted(valid)}"
            return openai_error(400, message)  # SGLang: an HTTPException(400), type "400"
        dp_rank = request.query_params.get("dp_rank")
        snapshot = load_snapshot()  # LoadSnapshot.to_dict: every core key, None included
        selected = [] if dp_rank not in (None, "0") else [snapshot]
        if request.query_params.get("format") == "prometheus":
            lines = []
            for key, value in snapshot.items() if selected else []:
                if key != "dp_rank" and isinstance(value, (int, float)):
                    lines += [f"# TYPE sglang_{key} gauge", f'sglang_{key}{{dp_rank="0"}} {value}']
            return Response("\n".join(lines) + "\n", media_type=CONTENT_TYPE)
        return json_response(
            {
                "timestamp": datetime.now(timezone.utc).isoformat(),
                "version": SGLANG_VERSION,
                "accelerator": None,
                "num_accelerators": settings.tp_size,
                "loads": selected,
            }
        )

    @route("/get_load", "GET")
    async def get_load(request: Request) -> Response:
        """The older load route (SGLang < 0.5, still read by older gateways): a documented sim addition."""
        return json_response(
            [
                {
                    "dp_rank": 0,
                    "num_reqs": engine.batch.running + engine.batch.queued,
                    "num_waiting_reqs": engine.batch.queued,
                    "num_tokens": engine.batch.running_tokens,
                }
            ]
        )

    @route("/flush_cache", "GET", "POST")
    async def flush_cache(request: Request) -> Response:
        return Response(_FLUSHED)

    if settings.enable_metrics:

        @route("/metrics", "GET")
        async def metrics(request: Request) -> Response:
            return Response(engine.render_metrics(), media_type=CONTENT_TYPE)
