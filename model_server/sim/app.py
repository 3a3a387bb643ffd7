"""The simulated engine's HTTP surface: SGLang's routes, in SGLang's shapes.

`create_app(settings)` returns a FastAPI app with its own engine (state, faults,
metrics registry). Handlers read raw JSON and answer pre-encoded bytes: the
simulator must sustain hundreds of requests per second on two cores. Auth is a
plain ASGI middleware with SGLang's rule: /health*, /ready* and /metrics* are
open; everything else needs ``Authorization: Bearer KEY`` when a key is set.
"""

from __future__ import annotations

import base64
import hmac
import logging
import time
from array import array
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from model_server.sim import text as simtext
from model_server.sim.engine import SimEngine
from model_server.sim.faults import FaultAction, FaultError
from model_server.sim.metrics import CONTENT_TYPE
from model_server.sim.protocol import (
    JSON_TYPE,
    BadRequest,
    Reply,
    generate_meta,
    json_response,
    max_tokens_of,
    next_id,
    openai_error,
    prompts_of,
    read_body,
    single_choice,
    stops_of,
    usage,
)
from model_server.sim.settings import SimSettings
from model_server.sim.streaming import DropStreamLogFilter, generate_stream, openai_stream, sse

__all__ = ["SIMULATOR_NOTICE", "ApiKeyMiddleware", "create_app"]

SIMULATOR_NOTICE = "model-server sim: a simulated SGLang engine; replies are deterministic filler text, not a model's"
SGLANG_VERSION = "0.5.0-sim"
OPEN_PREFIXES = ("/health", "/ready", "/metrics")
_UNAUTHORIZED = b'{"error":"Unauthorized"}'
_MALFORMED = b'{"id": "sim-malformed", "choices": [{"text": "trunc'


class ApiKeyMiddleware:
    """SGLang's API-key check (constant-time compare), as a plain ASGI middleware."""

    def __init__(self, app: Callable, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(_UNAUTHORIZED)).encode())]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})


def create_app(settings: SimSettings, *, engine: SimEngine | None = None) -> FastAPI:
    """The simulated SGLang server for `settings` (a fresh engine unless one is given)."""
    engine = engine or SimEngine(settings)
    name = settings.model_name
    accepted_names = {name, settings.model_path}
    created = int(time.time())
    app = FastAPI(title="model-server sim", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, DropStreamLogFilter) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(DropStreamLogFilter())
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)

    def route(path: str, method: str) -> Callable:
        """A plain Starlette route (no FastAPI dependency solving: this is the per-request hot path)."""

        def register(endpoint: Callable) -> Callable:
            app.router.add_route(path, endpoint, methods=[method], include_in_schema=False)
            return endpoint

        return register

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, err: BadRequest) -> Response:
        return openai_error(err.status, str(err), param=err.param)

    # --- the model routes first: they are matched in order, and they are the hot path ---

    def check_request(data: dict, route: str, wants_embedding: bool) -> None:
        if engine.loading():
            raise BadRequest("the server is still loading the model; retry after /health answers 200", status=503)
        if wants_embedding != settings.is_embedding:
            if settings.is_embedding:
                what = f"this server serves an embedding model (--is-embedding); it does not answer {route}"
            else:
                what = f"this server serves a generation model, not an embedding model; it does not answer {route}"
            raise BadRequest(f"{what}. Like SGLang, model-server sim serves one kind of model per server.")
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise BadRequest("model must be a string", param="model")
        if model is not None and model not in accepted_names:
            message = f"The model `{model}` does not exist; this server serves `{name}`."
            raise BadRequest(message, status=404, param="model")

    def check_context(prompt_tokens: int, max_tokens: int) -> None:
        limit = settings.effective_context_length
        if prompt_tokens + max_tokens > limit:
            raise BadRequest(
                f"Requested token count exceeds the model's maximum context length of {limit} tokens "
                f"({prompt_tokens} prompt + {max_tokens} max tokens); shorten the prompt or lower max_tokens."
            )

    async def admit(route: str, stream: bool) -> FaultAction:
        """Count the request and draw its fault; a hang waits here, a crash never returns."""
        action = engine.admit(route, stream=stream)
        if action is FaultAction.HANG:
            await engine.hang()
            return FaultAction.PROCEED
        return action

    def fault_response(action: FaultAction, stream: bool) -> Response | None:
        if action is FaultAction.ERROR:
            f = engine.faults
            return openai_error(f.error_status, f"simulated fault: injected error (error_rate={f.error_rate})")
        if action is FaultAction.MALFORMED and not stream:
            return Response(_MALFORMED, media_type=JSON_TYPE)
        return None

    def include_usage(data: dict) -> bool:
        options = data.get("stream_options")
        return isinstance(options, dict) and bool(options.get("include_usage"))

    @route("/v1/chat/completions", "POST")
    async def chat(request: Request) -> Response:
        data = await read_body(request)
        check_request(data, "/v1/chat/completions", wants_embedding=False)
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list", param="messages")
        try:
            prompt = simtext.prompt_of_messages(messages)
        except ValueError as err:
            raise BadRequest(str(err), param="messages") from None
        single_choice(data)
        max_tokens = max_tokens_of(data, "chat", "max_completion_tokens", "max_tokens")
        stops = stops_of(data.get("stop"))
        prompt_tokens = simtext.count_tokens(prompt)
        check_context(prompt_tokens, max_tokens)
        stream = bool(data.get("stream"))
        action = await admit("/v1/chat/completions", stream)
        failed = fault_response(action, stream)
        if failed is not None:
            return failed
        reply = Reply(prompt, max_tokens, stops, settings.seed)
        rid = next_id("chatcmpl-sim")
        if stream:
            flags = {"request_id": rid, "model": name, "chat": True, "include_usage": include_usage(data)}
            return sse(openai_stream(engine, reply, prompt_tokens, action, **flags))
        await engine.run(prompt_tokens, reply.tokens)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": reply.text, "tool_calls": None},
            "logprobs": None,
            "finish_reason": reply.finish_reason,
            "matched_stop": reply.matched,
        }
        return json_response(
            {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": name,
                "choices": [choice],
                "usage": usage(prompt_tokens, reply.tokens),
            }
        )

    @route("/v1/completions", "POST")
    async def completions(request: Request) -> Response:
        data = await read_body(request)
        check_request(data, "/v1/completions", wants_embedding=False)
        prompts = prompts_of(data.get("prompt"), "prompt")
        single_choice(data)
        max_tokens = max_tokens_of(data, "completions", "max_tokens")
        stops = stops_of(data.get("stop"))
        for _, n in prompts:
            check_context(n, max_tokens)
        stream = bool(data.get("stream"))
        if stream and len(prompts) > 1:
            raise BadRequest("model-server sim streams one prompt at a time; send a single prompt", param="prompt")
        action = await admit("/v1/completions", stream)
        failed = fault_response(action, stream)
        if failed is not None:
            return failed
        rid = next_id("cmpl-sim")
        replies = [Reply(text, max_tokens, stops, settings.seed) for text, _ in prompts]
        prompt_tokens = sum(n for _, n in prompts)
        if stream:
            flags = {"request_id": rid, "model": name, "chat": False, "include_usage": include_usage(data)}
            return sse(openai_stream(engine, replies[0], prompt_tokens, action, **flags))
        out_tokens = sum(r.tokens for r in replies)
        await engine.run(prompt_tokens, out_tokens)
        choices = [
            {"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason, "matched_stop": r.matched}
            for i, r in enumerate(replies)
        ]
        return json_response(
            {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": name,
                "choices": choices,
                "usage": usage(prompt_tokens, out_tokens),
            }
        )

    @route("/v1/embeddings", "POST")
    async def embeddings(request: Request) -> Response:
        data = await read_body(request)
        check_request(data, "/v1/embeddings", wants_embedding=True)
        inputs = prompts_of(data.get("input"), "input")
        encoding = data.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise BadRequest("encoding_format must be 'float' or 'base64'", param="encoding_format")
        check_context(max(n for _, n in inputs), 0)
        prompt_tokens = sum(n for _, n in inputs)
        action = await admit("/v1/embeddings", False)
        failed = fault_response(action, False)
        if failed is not None:
            return failed
        await engine.run(prompt_tokens, 0)
        items = []
        for i, (text_in, _) in enumerate(inputs):
            vec = simtext.embed(text_in, settings.embedding_dim, settings.seed)
            value: Any = base64.b64encode(array("f", vec).tobytes()).decode() if encoding == "base64" else vec
            items.append({"object": "embedding", "embedding": value, "index": i})
        token_usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        return json_response({"object": "list", "data": items, "model": name, "usage": token_usage})

    @route("/generate", "POST")
    async def generate(request: Request) -> Response:
        data = await read_body(request)
        check_request(data, "/generate", wants_embedding=False)
        source = data.get("text") if data.get("text") is not None else data.get("input_ids")
        prompts = prompts_of(source, "text")
        batch = isinstance(source, list) and isinstance(source[0], (str, list))
        params = data.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise BadRequest("sampling_params must be an object", param="sampling_params")
        max_tokens = max_tokens_of(params, "generate", "max_new_tokens")
        stops = stops_of(params.get("stop"))
        for _, n in prompts:
            check_context(n, max_tokens)
        stream = bool(data.get("stream"))
        if stream and batch:
            raise BadRequest("model-server sim streams one prompt at a time; send a single text", param="text")
        action = await admit("/generate", stream)
        failed = fault_response(action, stream)
        if failed is not None:
            return failed
        replies = [Reply(t, max_tokens, stops, settings.seed) for t, _ in prompts]
        if stream:
            return sse(generate_stream(engine, replies[0], prompts[0][1], action))
        timing = await engine.run(sum(n for _, n in prompts), sum(r.tokens for r in replies))
        e2e_s = engine.clock() - timing.arrived
        outs = [{"text": r.text, "meta_info": generate_meta(r, n, e2e_s)} for r, (_, n) in zip(replies, prompts)]
        return json_response(outs if batch else outs[0])

    # --- health, info, metrics ---

    @route("/health", "GET")
    async def health(request: Request) -> Response:
        return Response(status_code=503 if engine.loading() else 200)

    @route("/health_generate", "GET")
    async def health_generate(request: Request) -> Response:
        if engine.loading():
            return Response(status_code=503)
        await engine.hang()
        if engine.batch.running == 0:  # like SGLang, skip the probe when work is running
            await engine.run(1, 1, record=False)
        return Response(status_code=200)

    @route("/ready", "GET")
    async def ready(request: Request) -> Response:
        if engine.loading():
            return json_response({"status": "loading"}, 503)
        return json_response({"status": "ready"})

    @route("/metrics", "GET")
    async def metrics(request: Request) -> Response:
        return Response(engine.render_metrics(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        card = {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "sglang",
            "root": settings.model_path,
            "max_model_len": settings.effective_context_length,
        }
        return json_response({"object": "list", "data": [card]})

    async def model_info() -> Response:
        return json_response(
            {
                "model_path": settings.model_path,
                "tokenizer_path": settings.model_path,
                "served_model_name": name,
                "is_generation": not settings.is_embedding,
                "weight_version": "default",
                "simulator": True,
                "note": SIMULATOR_NOTICE,
            }
        )

    async def server_info() -> Response:
        info = settings.public_dict()
        info.update(
            {
                "version": SGLANG_VERSION,
                "simulator": True,
                "note": SIMULATOR_NOTICE,
                "faults": engine.faults.as_dict(),
                "internal_states": [{"num_running_reqs": engine.batch.running, "num_queue_reqs": engine.batch.queued}],
            }
        )
        return json_response(info)

    for path in ("/model_info", "/get_model_info"):
        app.add_api_route(path, model_info, methods=["GET"])
    for path in ("/server_info", "/get_server_info"):
        app.add_api_route(path, server_info, methods=["GET"])

    # --- run-time fault control ---

    @app.get("/sim/faults")
    async def get_faults() -> Response:
        return json_response(engine.faults.as_dict())

    @app.post("/sim/faults")
    async def post_faults(request: Request) -> Response:
        data = await read_body(request)
        try:
            return json_response(engine.set_faults(data).as_dict())
        except FaultError as err:
            raise BadRequest(str(err)) from None

    @app.post("/sim/reset")
    async def reset_faults() -> Response:
        return json_response(engine.reset_faults().as_dict())

    @app.get("/sim/stats")
    async def stats() -> Response:
        return json_response(engine.stats())

    return app
