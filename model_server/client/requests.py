"""A caller's arguments, checked once at the edge and encoded once: the requests a flow sends.

Every problem of the caller's arguments (an unknown keyword, NaN, a value that
is not JSON, messages that are not a list of dicts) shows here, as an
InvalidRequestError, before any attempt is spent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from model_server.client.answer import needs_rich_assembly
from model_server.client.deadlines import estimate_tokens
from model_server.client.resume import why_not_resumable
from model_server.client.retry import MalformedResponse
from model_server.client.wire import (
    CHAT_PARAMS,
    EMBED_PARAMS,
    check_params,
    encode_body,
    normalize_embedding_input,
)
from model_server.config import ClientPolicy, ServerSpec
from model_server.errors import InvalidRequestError

__all__ = ["ChatRequest", "EmbedRequest", "chat_request", "embed_request", "parse_event", "with_model"]

STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}


@dataclass
class ChatRequest:
    """A checked chat (or completions) request: the body every segment starts from, and what it allows."""

    call: str  # the public method, for messages: "chat", "stream_chat"
    kind: str  # "chat" or "completion"
    path: str  # under the replica's /v1
    body: dict[str, Any]  # without "model" (each replica has its own name)
    headers: dict[str, str]
    query: dict[str, Any]
    prompt_tokens: int  # an estimate, for the first-token deadline
    not_resumable: str | None  # why a broken stream of it is not resumed (None: it is)
    rich: bool  # several choices, tools or logprobs: assembled by the SDK's accumulator
    wire: bytes = b""  # ``body`` as JSON, encoded once at the edge

    def encoded(self, spec: ServerSpec, body: Mapping[str, Any] | None = None) -> bytes:
        """The bytes one replica is sent: the body (a continuation's, or the request's own) with its model name."""
        raw = self.wire if body is None or body is self.body else encode_body(body, self.call)
        return with_model(raw, spec.model_name)


@dataclass
class EmbedRequest:
    body: dict[str, Any]
    headers: dict[str, str]
    query: dict[str, Any]
    count: int
    single: bool
    prompt_tokens: int
    wire: bytes = b""  # ``body`` as JSON, encoded once at the edge

    def encoded(self, spec: ServerSpec) -> bytes:
        return with_model(self.wire, spec.model_name)


def with_model(body: bytes, model: str) -> bytes:
    """A JSON object's bytes with ``"model"`` first: each replica's name, without encoding the body again."""
    return b'{"model":' + json.dumps(model).encode() + (b"," + body[1:] if body != b"{}" else b"}")


def split_extras(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """(body fields, extra headers, extra query) as the openai SDK spreads extra_body/headers/query."""
    body = {k: v for k, v in params.items() if k not in ("extra_body", "extra_headers", "extra_query")}
    body.update(params.get("extra_body") or {})
    body.pop("model", None)  # the client names each replica's model
    headers = {str(k): str(v) for k, v in (params.get("extra_headers") or {}).items()}
    return body, headers, dict(params.get("extra_query") or {})


def parse_event(data: str) -> Any:
    """One server-sent event's JSON; MalformedResponse if it is not JSON."""
    try:
        return json.loads(data)
    except ValueError as err:
        raise MalformedResponse(f"a stream event is not JSON: {data[:80]!r}") from err


def chat_request(call: str, messages: Any, params: dict[str, Any], policy: ClientPolicy) -> ChatRequest:
    """The checked request for chat()/stream_chat(): InvalidRequestError before any attempt."""
    check_params(params, CHAT_PARAMS, call)
    if not isinstance(messages, (list, tuple)) or not messages or not all(isinstance(m, Mapping) for m in messages):
        raise InvalidRequestError(
            f"{call}(): messages must be a non-empty list of dicts like {{'role': 'user', 'content': '...'}}, "
            f"got {type(messages).__name__}.",
            argument="messages",
        )
    body, headers, query = split_extras(params)
    body["messages"] = [dict(m) for m in messages]
    body["stream"] = True
    body["stream_options"] = dict(STREAM_OPTIONS)
    return ChatRequest(
        call=call,
        kind="chat",
        path="/chat/completions",
        body=body,
        headers=headers,
        query=query,
        prompt_tokens=estimate_tokens(body["messages"]),
        not_resumable=why_not_resumable("chat", body, policy),
        rich=needs_rich_assembly(body),
        wire=encode_body(body, call),  # every problem of the caller's arguments shows here, before any attempt
    )


def embed_request(inputs: Any, params: dict[str, Any]) -> EmbedRequest:
    check_params(params, EMBED_PARAMS, "embed")
    batch, single = normalize_embedding_input(inputs)
    body, headers, query = split_extras(params)
    body.update(input=batch[0] if single and not isinstance(inputs, str) else batch, encoding_format="float")
    return EmbedRequest(body, headers, query, len(batch), single, estimate_tokens(batch), encode_body(body, "embed"))
