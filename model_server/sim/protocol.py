"""Request parsing and reply shapes of SGLang 0.5.23's OpenAI-compatible and native routes.

Bodies are read as plain JSON and checked by hand (no per-request validation
models: the simulator must stay cheap at hundreds of requests per second). Bad
input raises `BadRequest`, which the app answers in SGLang's shapes: the flat
``ErrorResponse`` ``{"object": "error", "message", "type", "param": null,
"code"}`` on the OpenAI routes (``type: "Bad Request"`` for a body that fails
validation, as SGLang's RequestValidationError handler says), and
``{"error": {"message": ...}}`` on native /generate.
"""

from __future__ import annotations

import json
import re
import uuid
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from model_server.sim import text as simtext
from model_server.sim.reply import Reply, Sampling, request_seed

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "VALIDATION_ERROR",
    "BadRequest",
    "dumps",
    "error_body",
    "generate_meta",
    "json_response",
    "choices_of",
    "logprobs_of",
    "max_tokens_of",
    "new_id",
    "openai_error",
    "prompts_of",
    "read_body",
    "sampling_of",
    "stops_of",
    "usage",
]

# Defaults when the request gives none: SGLang's CompletionRequest says 16, SamplingParams 128;
# chat has none (it runs until EOS, bounded by the context).
DEFAULT_MAX_TOKENS: dict[str, int | None] = {"chat": None, "completions": 16, "generate": 128}
JSON_TYPE = "application/json"
VALIDATION_ERROR = HTTPStatus.BAD_REQUEST.phrase  # "Bad Request": SGLang's type for a body that fails validation


def new_id() -> str:
    """A request id as SGLang makes them (uuid4 hex)."""
    return uuid.uuid4().hex


class BadRequest(Exception):
    """The request is wrong (or cannot be served now); answered in SGLang's flat error shape.

    `err_type` is the ``type`` field: "Bad Request" for validation errors (the default),
    "BadRequestError" for errors found while serving, like SGLang's.
    """

    def __init__(
        self, message: str, *, status: int = 400, param: str | None = None, err_type: str = VALIDATION_ERROR
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.err_type = err_type


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type=JSON_TYPE)


def error_body(status: int, message: str, err_type: str, param: str | None = None) -> dict:
    """SGLang's ErrorResponse, field for field."""
    return {"object": "error", "message": message, "type": err_type, "param": param, "code": status}


def openai_error(status: int, message: str, *, err_type: str | None = None, param: str | None = None) -> Response:
    """SGLang's flat ErrorResponse; the type defaults to str(status), as SGLang's HTTPException path says."""
    return json_response(error_body(status, message, err_type or str(status), param), status)


async def read_body(request: Request) -> dict:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise BadRequest(f"JSON decode error: {err}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def _int_field(data: dict, name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name}: Input should be a valid integer, got {value!r}", param=name)
    return value


def max_tokens_of(data: dict, kind: str, *names: str) -> int | None:
    """The first of `names` given in `data`, else the default for `kind` (None: until EOS).

    Like SGLang: chat takes ``max_completion_tokens or max_tokens``; completions refuse
    ``max_tokens`` < 1 ("max_tokens must be positive"); negative values are refused everywhere.
    """
    for name in names:
        value = _int_field(data, name)
        if value is None or (kind == "chat" and value == 0 and name != names[-1]):
            continue
        if value < 0 or (kind == "completions" and value < 1):
            which = "positive" if kind == "completions" else "non-negative"
            raise BadRequest(f"{name} must be {which}, got {value}", param=name)
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


def choices_of(data: dict) -> int:
    """`n`, the number of choices (1..128; SGLang samples them in parallel)."""
    n = _int_field(data, "n")
    if n is None:
        return 1
    if not 1 <= n <= 128:
        raise BadRequest(f"n must be between 1 and 128, got {n}", param="n")
    return n


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """SGLang's UsageInfo, all fields (the sim has no cache report and no reasoning tokens)."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
        "reasoning_tokens": 0,
        "completion_tokens_details": None,
    }


def _int_list(value: Any, name: str) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return frozenset(value)
    raise BadRequest(f"{name}: Input should be a valid list of integers", param=name)


def _structured(data: dict) -> Any:
    """The structured output a request asks for: None, True (a JSON object) or a JSON schema."""
    fmt = data.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema", "structural_tag"):
            message = "response_format.type must be 'text', 'json_object' or 'json_schema'"
            raise BadRequest(message, param="response_format")
        if fmt["type"] == "json_object":
            return True
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise BadRequest("response_format.json_schema needs a name", param="response_format")
            schema = spec.get("schema", spec.get("schema_"))
            return schema if isinstance(schema, dict) else True
    schema = data.get("json_schema")  # SGLang's own (extra_body, and /generate's sampling_params)
    if isinstance(schema, str):
        try:
            parsed = json.loads(schema)
        except ValueError:
            raise BadRequest("json_schema must be a JSON schema", param="json_schema") from None
        return parsed if isinstance(parsed, dict) else True
    return None


def _tool_to_call(data: dict, messages: list | None) -> dict | None:
    """The function the simulated model calls, if any, from tools and tool_choice.

    "none" (or no tools): none. "required" or a named function: that one (the first for
    "required"). "auto" (the default with tools): the first tool whose name the last message,
    a user's, mentions as a word (so a test decides); else a text answer. After the tool's
    result (a "tool" message last) the answer is text, so an agent loop ends.
    """
    tools = data.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
        for t in tools
    ):
        raise BadRequest("tools must be a list of {type: function, function: {name, parameters}}", param="tools")
    functions = [t["function"] for t in tools]
    choice = data.get("tool_choice", "auto")
    if choice == "none":
        return None
    if isinstance(choice, dict):
        function_choice = choice.get("function")
        name = function_choice.get("name") if isinstance(function_choice, dict) else None
        for function in functions:
            if function["name"] == name:
                return function
        raise BadRequest(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    if choice == "required":
        return functions[0]
    if choice != "auto":
        raise BadRequest("tool_choice must be 'none', 'auto', 'required' or a named function", param="tool_choice")
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    try:
        said = simtext.chat_context([last])[0]
    except ValueError:
        return None
    for function in functions:
        if re.search(rf"(?<!\w){re.escape(function['name'])}(?!\w)", said):
            return function
    return None


def sampling_of(
    data: dict,
    *,
    max_new: int,
    settings_seed: int,
    eos_from: int | None = None,
    messages: list | None = None,
    params: dict | None = None,
) -> Sampling:
    """The sampling options of an OpenAI request (or of /generate's sampling_params)."""
    params = data if params is None else params
    min_new = _int_field(params, "min_new_tokens" if params is not data else "min_tokens") or 0
    seed = params.get("seed", params.get("sampling_seed"))
    return Sampling(
        max_new=max_new,
        eos_from=None if params.get("ignore_eos") else eos_from,
        min_new=max(0, min_new),
        stops=stops_of(params.get("stop")),
        stop_ids=_int_list(params.get("stop_token_ids"), "stop_token_ids"),
        seed=request_seed(settings_seed, seed, params.get("temperature")),
        structured=_structured(params),
        tool=_tool_to_call(data, messages) if messages is not None else None,
    )


def logprobs_of(data: dict, chat: bool) -> int | None:
    """None when no logprobs are asked; else how many top alternatives per token."""
    if chat:
        if not data.get("logprobs"):
            return None
        top = _int_field(data, "top_logprobs") or 0
    else:
        top = _int_field(data, "logprobs")
        if top is None:
            return None
    if not 0 <= top <= 20:
        raise BadRequest("top_logprobs must be between 0 and 20", param="top_logprobs" if chat else "logprobs")
    return top


def generate_meta(reply: Reply, prompt_tokens: int, completion_tokens: int, rid: str, finished: bool) -> dict:
    """The `meta_info` of a native /generate reply (after `completion_tokens` tokens)."""
    finish: dict | None = None
    if finished:
        if reply.finish_reason == "length":
            finish = {"type": "length", "length": reply.tokens}
        else:
            finish = {"type": "stop", "matched": reply.matched}
    meta = {
        "id": rid,
        "finish_reason": finish,
        "prompt_tokens": prompt_tokens,
        "weight_version": "default",
        "num_retractions": 0,
        "reasoning_tokens": 0,
        "completion_tokens": reply.tokens if finished else completion_tokens,
        "cached_tokens": 0,
    }
    return meta
