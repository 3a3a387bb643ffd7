"""SGLang's OpenAI-compatible routes: chat, completions, embeddings, tokenize, detokenize, models.

Shapes follow SGLang 0.5.23's pydantic serializers field for field (checked by
tests/test_sim_conformance.py against SGLang's own protocol models).
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from model_server.sim import text as simtext
from model_server.sim.engine import Timing
from model_server.sim.protocol import (
    BadRequest,
    choices_of,
    json_response,
    logprobs_of,
    max_tokens_of,
    new_id,
    prompts_of,
    read_body,
    sampling_of,
    usage,
)
from model_server.sim.reply import Reply, Sampling, piece_logprobs
from model_server.sim.server import SimServer
from model_server.sim.streaming import openai_stream

__all__ = ["chat_choice", "chat_context_of", "chat_logprobs", "completion_choice", "completion_logprobs", "register"]


def chat_logprobs(reply: Reply, top: int | None) -> dict | None:
    if top is None:
        return None
    content = []
    for k, piece in enumerate(reply.pieces):
        logprob, alternatives = piece_logprobs(piece, k, top)
        content.append(
            {
                "token": piece,
                "bytes": list(piece.encode()),
                "logprob": logprob,
                "top_logprobs": [{"token": t, "bytes": list(t.encode()), "logprob": lp} for t, lp in alternatives],
            }
        )
    return {"content": content}


def completion_logprobs(reply: Reply, top: int | None) -> dict | None:
    if top is None:
        return None
    out: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for k, piece in enumerate(reply.pieces):
        logprob, alternatives = piece_logprobs(piece, k, top)
        out["text_offset"].append(-1)  # SGLang: "Not supported yet"
        out["token_logprobs"].append(logprob)
        out["tokens"].append(piece)
        out["top_logprobs"].append(dict(alternatives))
    return out


def chat_context_of(data: dict, messages: list) -> tuple[str, str]:
    """The chat prompt and the assistant prefix it ends with (see text.chat_context), or a 400 on messages."""
    try:
        return simtext.chat_context(messages, continue_final_message=bool(data.get("continue_final_message")))
    except ValueError as err:
        raise BadRequest(str(err), param="messages") from None


def chat_choice(index: int, reply: Reply, top: int | None) -> dict:
    """One choice of an unstreamed chat answer, as SGLang's serializer writes it."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.text, "reasoning_content": None}
    if reply.tool_calls:
        message["tool_calls"] = [call.as_json(k) for k, call in enumerate(reply.tool_calls)]
    return {
        "index": index,
        "message": message,
        "logprobs": chat_logprobs(reply, top),
        "finish_reason": reply.finish_reason,
        "matched_stop": reply.matched,
    }


def completion_choice(index: int, reply: Reply, top: int | None) -> dict:
    """One choice of an unstreamed completions answer, as SGLang's serializer writes it."""
    return {
        "index": index,
        "text": reply.text,
        "logprobs": completion_logprobs(reply, top),
        "finish_reason": reply.finish_reason,
        "matched_stop": reply.matched,
    }


def register(server: SimServer) -> None:
    settings = server.settings
    engine = server.engine
    route = server.route
    created = int(time.time())

    async def openai_request(
        request: Request, route: str | None = None, *, embedding: bool = False
    ) -> tuple[dict, str]:
        """(the body, its model) after SGLang's checks, in SGLang's order: JSON content, the body,
        the kind of server a model `route` needs, the model name."""
        server.require_json(request)
        data = await read_body(request)
        if route is not None:
            server.check_kind(embedding, route)
        return data, server.model_of(data)

    async def generation(
        route: str,
        data: dict,
        model: str,
        choices: list[tuple[int, str, int]],
        prompt_tokens: int,
        sampling: Sampling,
        *,
        chat: bool,
    ) -> Response:
        """What chat and completions share once the request is read: its fault, then a stream or one answer.

        `choices` are what to answer: (index in the answer, prompt text, choice number for the sampling).
        """
        top = logprobs_of(data, chat=chat)
        stream = bool(data.get("stream"))
        include, continuous = server.usage_options(data) if stream else (False, False)
        fault = await server.admit(route, stream)
        failed = server.fault_response(fault, stream)
        if failed is not None:
            return failed
        replies = [(index, Reply(text, sampling.for_choice(k))) for index, text, k in choices]
        rid = new_id()
        if stream:
            body = openai_stream(
                engine, replies, prompt_tokens, fault, request_id=rid, model=model, chat=chat,
                include_usage=include, continuous_usage=continuous, logprobs=top,
            )  # fmt: skip
            return await server.start_stream(body)
        completion_tokens = sum(r.tokens for _, r in replies)
        await engine.hold_unstreamed(max(r.tokens for _, r in replies))
        timing = Timing(engine.clock(), structured=sampling.structured is not None)
        await engine.run(prompt_tokens, completion_tokens, timing=timing)
        choice = chat_choice if chat else completion_choice
        return json_response(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice(i, reply, top) for i, reply in replies],
                "usage": usage(prompt_tokens, completion_tokens),
                "metadata": None,
            }
        )

    @route("/v1/chat/completions", "POST")
    async def chat(request: Request) -> Response:
        data, model = await openai_request(request, "/v1/chat/completions")
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("Messages cannot be empty.", param="messages", err_type="BadRequestError")
        context, prefix = chat_context_of(data, messages)
        n = choices_of(data)
        max_tokens = max_tokens_of(data, "chat", "max_completion_tokens", "max_tokens")
        prompt_tokens = simtext.count_tokens(context)
        budget = server.check_context(prompt_tokens, max_tokens)
        eos_from = simtext.count_tokens(prefix) if max_tokens is None else None
        sampling = sampling_of(data, max_new=budget, settings_seed=settings.seed, eos_from=eos_from, messages=messages)
        choices = [(i, context, i) for i in range(n)]
        return await generation("/v1/chat/completions", data, model, choices, prompt_tokens, sampling, chat=True)

    @route("/v1/completions", "POST")
    async def completions(request: Request) -> Response:
        data, model = await openai_request(request, "/v1/completions")
        prompts = prompts_of(data.get("prompt"), "prompt")
        n = choices_of(data)
        max_tokens = max_tokens_of(data, "completions", "max_tokens")
        assert max_tokens is not None  # completions always have one (default 16)
        for _, tokens in prompts:
            server.check_context(tokens, max_tokens)
        sampling = sampling_of(data, max_new=max_tokens, settings_seed=settings.seed)
        # SGLang numbers the choices prompt by prompt: index = prompt x n + choice
        choices = [(p * n + i, text, i) for p, (text, _) in enumerate(prompts) for i in range(n)]
        prompt_tokens = sum(tokens for _, tokens in prompts)
        return await generation("/v1/completions", data, model, choices, prompt_tokens, sampling, chat=False)

    @route("/v1/embeddings", "POST")
    async def embeddings(request: Request) -> Response:
        data, _ = await openai_request(request, "/v1/embeddings", embedding=True)
        inputs = prompts_of(data.get("input"), "input")
        encoding = data.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise BadRequest(
                f"encoding_format must be either 'float' or 'base64', got {encoding!r}",
                param="encoding_format",
                err_type="BadRequestError",
            )
        dim = settings.embedding_dim
        dimensions = data.get("dimensions")
        if dimensions is not None:
            if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= dim:
                raise BadRequest(f"dimensions must be an integer from 1 to {dim}", param="dimensions")
            dim = dimensions
        for _, tokens in inputs:
            server.check_context(tokens, None)
        prompt_tokens = sum(tokens for _, tokens in inputs)
        fault = await server.admit("/v1/embeddings", False)
        failed = server.fault_response(fault, False)
        if failed is not None:
            return failed
        await engine.run(prompt_tokens, 0)
        items = []
        for i, (text_in, _) in enumerate(inputs):
            vec = simtext.embed(text_in, settings.embedding_dim, settings.seed)
            if dim != len(vec):  # Matryoshka: the first `dimensions`, renormalised
                head = vec[:dim]
                norm = sum(v * v for v in head) ** 0.5 or 1.0
                vec = tuple(v / norm for v in head)
            value: Any = vec
            if encoding == "base64":  # contiguous little-endian float32, as SGLang packs them
                value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
            items.append({"embedding": value, "index": i, "object": "embedding"})
        return json_response(
            {"data": items, "model": settings.model_path, "object": "list", "usage": usage(prompt_tokens, 0)}
        )

    async def tokenize(request: Request) -> Response:
        data, _ = await openai_request(request)
        prompt, messages = data.get("prompt"), data.get("messages")
        if (prompt is None) == (messages is None):
            raise BadRequest("Exactly one of 'prompt' or 'messages' must be provided.")
        limit = settings.effective_context_length
        if messages is not None:
            if not isinstance(messages, list):
                raise BadRequest("messages must be a list", param="messages")
            context, _ = chat_context_of(data, messages)
            ids = simtext.encode(context)
            return json_response({"tokens": ids, "count": len(ids), "max_model_len": limit})
        if isinstance(prompt, str):
            ids = simtext.encode(prompt)
            return json_response({"tokens": ids, "count": len(ids), "max_model_len": limit})
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            batch = [simtext.encode(p) for p in prompt]
            return json_response({"tokens": batch, "count": [len(b) for b in batch], "max_model_len": limit})
        raise BadRequest("prompt must be a string or a list of strings", param="prompt")

    async def detokenize(request: Request) -> Response:
        data, _ = await openai_request(request)
        tokens = data.get("tokens")
        skip = data.get("skip_special_tokens", True) is not False
        if isinstance(tokens, list) and tokens and all(isinstance(t, list) for t in tokens):
            for sub in tokens:
                if not all(isinstance(t, int) and not isinstance(t, bool) for t in sub):
                    raise BadRequest(
                        f"Invalid input: Sublist in 'tokens' must contain only integers. Found: {sub}",
                        err_type="BadRequestError",
                    )
            return json_response({"text": [simtext.decode(sub, skip_special_tokens=skip) for sub in tokens]})
        if isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            return json_response({"text": simtext.decode(tokens, skip_special_tokens=skip)})
        raise BadRequest("tokens: Input should be a list of integers or a list of lists of integers", param="tokens")

    for path in ("/v1/tokenize", "/tokenize"):
        route(path, "POST")(tokenize)
    for path in ("/v1/detokenize", "/detokenize"):
        route(path, "POST")(detokenize)

    def model_card() -> dict:
        name = settings.model_name
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "sglang",
            "root": name,
            "parent": None,
            "max_model_len": settings.effective_context_length,
        }

    @route("/v1/models", "GET")
    async def models(request: Request) -> Response:
        return json_response({"object": "list", "data": [model_card()]})

    @route("/v1/models/{model:path}", "GET")
    async def retrieve_model(request: Request) -> Response:
        model = request.path_params["model"]
        if model != settings.model_name:
            body = {
                "message": f"The model '{model}' does not exist",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
            return json_response({"error": body}, 404)
        return json_response(model_card())
