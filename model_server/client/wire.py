"""What goes over the wire to a replica and what comes back, parsed (pure: no sockets).

The client talks to SGLang's OpenAI-compatible routes with httpx directly
(the openai SDK's types describe the answers): that is what lets it hold
every attempt to its own deadlines, byte by byte (see
:mod:`model_server.client.deadline_transport`). This module turns the caller's
arguments into a JSON body, once, at the edge (:func:`encode_body`, with a
clear :class:`~model_server.errors.InvalidRequestError` for anything
no server could accept), splits a server-sent-event stream into events
(:func:`sse_data`), and turns an error answer into :class:`ReplicaHTTPError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from model_server.client.retry import DeadlineExceeded, ReplicaHTTPError, StreamEventError
from model_server.errors import InvalidRequestError

__all__ = [
    "CHAT_PARAMS",
    "EMBED_PARAMS",
    "DeadlineExceeded",
    "ReplicaHTTPError",
    "StreamEventError",
    "check_params",
    "encode_body",
    "error_message",
    "normalize_embedding_input",
    "sse_data",
]

# What chat() accepts: the openai SDK's chat.completions.create parameters (SGLang reads the same body),
# plus the SDK's extra_* escape hatches for SGLang's own fields (e.g. extra_body={"top_k": 20}).
CHAT_PARAMS = frozenset(
    {
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "metadata",
        "modalities",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",
        "extra_body",
        "extra_headers",
        "extra_query",
    }
)
EMBED_PARAMS = frozenset({"dimensions", "user", "extra_body", "extra_headers", "extra_query"})
RESERVED_PARAMS = ("stream", "model", "timeout")  # the client chooses these


def check_params(params: Mapping[str, Any], known: frozenset[str], call: str) -> None:
    """InvalidRequestError for a parameter the client sets itself or no server knows."""
    reserved = [k for k in RESERVED_PARAMS if k in params]
    if reserved:
        raise InvalidRequestError(
            f"{call}() may not set {', '.join(reserved)}: the client chooses stream, model and timeout "
            "(use stream_chat() to stream; set client.request_deadline_s in the fleet table to bound a call).",
            argument=reserved[0],
        )
    unknown = sorted(k for k in params if k not in known)
    if unknown:
        raise InvalidRequestError(
            f"{call}() got an unknown parameter {unknown[0]!r}. It takes the openai SDK's parameters "
            f"({', '.join(sorted(known))}); pass an SGLang-only field inside extra_body={{...}}.",
            argument=unknown[0],
        )
    for name in ("extra_body", "extra_headers", "extra_query"):
        value = params.get(name)
        if value is not None and not isinstance(value, Mapping):
            raise InvalidRequestError(f"{call}(): {name} must be a dict, got {type(value).__name__}.", argument=name)


def _encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def encode_body(body: Mapping[str, Any], call: str) -> bytes:
    """The JSON bytes of a request body, or InvalidRequestError naming the argument no server could read.

    Catches what would otherwise escape from deep inside ``json``: values that are not JSON
    (objects, bytes, sets), NaN and infinities, and text that is not valid Unicode (lone surrogates).
    """
    try:
        return _encode(body)
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError):
        pass
    for key, value in body.items():  # find the culprit, for the message
        try:
            _encode(value)
        except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as err:
            raise InvalidRequestError(
                f"{call}(): argument {key!r} cannot be sent as JSON ({_why(err)}). Pass plain str, int, "
                f"finite float, bool, None, list and dict values, and text without lone surrogates.",
                argument=key,
            ) from err
    raise InvalidRequestError(f"{call}(): the request cannot be sent as JSON; check its arguments.")


def _why(err: BaseException) -> str:
    if isinstance(err, UnicodeEncodeError):
        return "text with a lone surrogate, which is not valid UTF-8"
    if isinstance(err, RecursionError):
        return "nested too deeply"
    text = str(err)
    if "Out of range float" in text:
        return "NaN or an infinite number"
    return text[:160]


def normalize_embedding_input(inputs: Any) -> tuple[list[Any], bool]:
    """(the batch to send, whether the caller gave a single input), as the OpenAI API defines ``input``.

    A string is one input; a list of ints is ONE input given as token ids; a list of strings, or a
    list of lists of ints, is a batch. Anything else is an InvalidRequestError, before any attempt.
    """
    if isinstance(inputs, str):
        return [inputs], True
    if isinstance(inputs, (list, tuple)):
        items = list(inputs)
        if not items:
            raise InvalidRequestError("embed(): inputs is empty; give a string or a non-empty list.", argument="inputs")
        if all(_is_token_id(t) for t in items):
            return [items], True
        if all(isinstance(t, str) for t in items):
            return items, False
        if all(isinstance(t, (list, tuple)) and t and all(_is_token_id(x) for x in t) for t in items):
            return [list(t) for t in items], False
    raise InvalidRequestError(
        f"embed(): inputs must be a string, a list of strings, a list of token ids (one input) or a list of "
        f"such lists, got {type(inputs).__name__}"
        f"{'' if not isinstance(inputs, (list, tuple)) else ' with mixed items'}.",
        argument="inputs",
    )


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def sse_data(line: str) -> str | None:
    """The payload of one server-sent-event line (``data: ...``), or None for any other line."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


def error_message(body: object, fallback: str) -> str:
    """The message of an error body in SGLang's flat shape, OpenAI's nested one, or as text."""
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
        if isinstance(inner, str):
            return inner[:300]
        if body.get("message"):
            return str(body["message"])[:300]
        if body.get("detail"):
            return str(body["detail"])[:300]
    return fallback[:300]
