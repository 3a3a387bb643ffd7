"""Request parsing and reply shapes of SGLang's OpenAI-compatible and native routes.

Bodies are read as plain JSON and checked by hand (no per-request validation
models: the simulator must stay cheap at hundreds of requests per second). Bad
input raises `BadRequest`, which the app turns into the OpenAI error envelope
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from model_server.sim import text as simtext

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "BadRequest",
    "Reply",
    "dumps",
    "generate_meta",
    "json_response",
    "max_tokens_of",
    "next_id",
    "openai_error",
    "prompts_of",
    "read_body",
    "single_choice",
    "stops_of",
    "usage",
]

# Defaults when the request gives none: OpenAI's 16 for completions, SGLang's 128 otherwise.
DEFAULT_MAX_TOKENS = {"chat": 128, "completions": 16, "generate": 128}
JSON_TYPE = "application/json"
_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
}
_ids = itertools.count(1)


def next_id(prefix: str) -> str:
    """A request id unique within this process (cheaper than a uuid)."""
    return f"{prefix}{next(_ids):x}"


class BadRequest(Exception):
    """The request is wrong (or cannot be served now); answered in the OpenAI envelope."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type=JSON_TYPE)


def openai_error(status: int, message: str, *, param: str | None = None) -> Response:
    """The OpenAI error envelope with an OpenAI-style type name for `status`."""
    err_type = _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return json_response({"error": {"message": message, "type": err_type, "param": param, "code": status}}, status)


async def read_body(request: Request) -> dict:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise BadRequest(f"request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def max_tokens_of(data: dict, kind: str, *names: str) -> int:
    """The first of `names` given in `data` (an integer >= 0), else the default for `kind`."""
    for name in names:
        value = data.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadRequest(f"{name} must be an integer >= 0, got {value!r}", param=name)
            return value
    return DEFAULT_MAX_TOKENS[kind]


def stops_of(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise BadRequest("stop must be a string or a list of strings", param="stop")


def _prompt(prompt: Any, param: str) -> tuple[str, int]:
    """(text, prompt tokens) of one prompt given as a string or a list of token ids."""
    if isinstance(prompt, str):
        return prompt, simtext.count_tokens(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return " ".join(map(str, prompt)), len(prompt)
    raise BadRequest(f"{param} must be a string, a list of strings or a list of token ids", param=param)


def prompts_of(value: Any, param: str) -> list[tuple[str, int]]:
    """One prompt or a batch: a string, token ids, or a list of either -> [(text, tokens)]."""
    if value is None:
        raise BadRequest(f"{param} is required", param=param)
    if isinstance(value, list) and not value:
        raise BadRequest(f"{param} must not be empty", param=param)
    if isinstance(value, list) and all(isinstance(v, (str, list)) for v in value):
        return [_prompt(v, param) for v in value]
    return [_prompt(value, param)]


def single_choice(data: dict) -> None:
    if data.get("n") not in (None, 1):
        raise BadRequest("model-server sim answers one choice per request; send n=1", param="n")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Reply:
    """The deterministic reply to one prompt: text, stream pieces, token count, finish reason."""

    __slots__ = ("text", "pieces", "tokens", "finish_reason", "matched")

    def __init__(self, prompt: str, max_tokens: int, stops: tuple[str, ...], seed: int) -> None:
        words = simtext.filler_words(simtext.prompt_hash(prompt, seed), max_tokens)
        full = " ".join(words)
        self.text, stopped = simtext.apply_stop(full, stops) if stops else (full, False)
        self.matched: str | None = None
        if stopped:
            self.pieces = simtext.split_pieces(self.text)
            self.tokens = simtext.count_tokens(self.text)
            self.finish_reason = "stop"
            rest = full[len(self.text) :]
            self.matched = next((s for s in stops if s and rest.startswith(s)), None)
        else:
            self.pieces = [words[0], *(" " + w for w in words[1:])] if words else []
            self.tokens = len(words)
            self.finish_reason = "length"


def generate_meta(reply: Reply, prompt_tokens: int, e2e_s: float) -> dict:
    """The `meta_info` of a finished native /generate reply."""
    finish: dict = {"type": "length", "length": reply.tokens}
    if reply.finish_reason == "stop":
        finish = {"type": "stop", "matched": reply.matched}
    return {
        "id": next_id("sim"),
        "finish_reason": finish,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": reply.tokens,
        "cached_tokens": 0,
        "e2e_latency": e2e_s,
    }
