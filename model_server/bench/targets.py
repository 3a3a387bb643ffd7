"""What a benchmark sends requests to: one small interface, several implementations.

A :class:`Target` streams one chat completion and yields :class:`StreamPiece`
objects as they arrive; the runner timestamps them. Implementations:

- :class:`OpenAITarget`: one server directly, through the openai SDK
  (``max_retries=0``: a failure is a failure, nothing hides it);
- :class:`RawTarget`: one server directly on :mod:`model_server.bench.rawhttp`
  (keep-alive asyncio streams, a few tenths of a millisecond per request):
  the generator's fast path for high rates on small machines;
- :class:`RoundRobinTarget`: several servers, cycled in turn, no health logic
  (the baseline a load balancer without feedback gives);
- :class:`ModelServerTarget`: a group through this project's
  ``AsyncModelServer.stream_chat`` (retries, failover, routing).

Every stream must end with a ``finish_reason``: a stream that stops without
one (a dropped connection the transport did not notice, a body that is not
server-sent events) is an error, not a short answer.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import httpx

from model_server.bench.lengths import BenchRequest
from model_server.common.urls import bearer_headers

__all__ = [
    "IncompleteStream",
    "ModelServerTarget",
    "OpenAITarget",
    "RawTarget",
    "RoundRobinTarget",
    "StreamErrorEvent",
    "StreamPiece",
    "Target",
    "shared_http_client",
]


@dataclass(frozen=True, slots=True)
class StreamPiece:
    """Part of a streamed answer: text, and the token count once the server reports it."""

    text: str = ""
    completion_tokens: int | None = None
    finished: bool = False  # a finish_reason was seen
    server: str | None = None


class IncompleteStream(Exception):
    """The stream ended without a finish_reason."""


@runtime_checkable
class Target(Protocol):
    """``streams = False`` on a target whose answers come in one piece: the runner then
    records no first-token time, so TTFT and TPOT are None for its requests (not 0)."""

    name: str

    def stream(self, request: BenchRequest) -> AsyncIterator[StreamPiece]:
        """Send ``request`` streaming; yield its pieces; raise on any failure."""
        ...

    async def aclose(self) -> None: ...


def shared_http_client(
    *, timeout_s: float, connect_timeout_s: float = 3.0, max_connections: int = 2048
) -> httpx.AsyncClient:
    """One connection pool for a whole run: enough connections that the pool never queues a request."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=30.0
        ),
    )


def _openai_client(base_url: str, api_key: str | None, http: httpx.AsyncClient, timeout_s: float) -> Any:
    from openai import AsyncOpenAI  # the SDK is heavy to import; only runs need it

    key = api_key or "EMPTY"
    return AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout_s, http_client=http)


def _chat_request(model: str, request: BenchRequest) -> dict[str, Any]:
    """The body every target sends: one user message, greedy, streamed with the usage chunk."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": request.prompt}],
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def _stream_openai(
    client: Any, model: str, request: BenchRequest, server: str | None, typed: bool
) -> AsyncIterator[StreamPiece]:
    body = _chat_request(model, request)
    if typed:  # what application code writes: typed parameters in, typed chunks out
        stream = await client.chat.completions.create(**body)
    else:  # the SDK's own transport, errors and SSE decoding, without the per-chunk models
        from openai import AsyncStream

        stream = await client.post(
            "/chat/completions", body=body, cast_to=object, stream=True, stream_cls=AsyncStream[object]
        )
    finished = False
    try:
        async for chunk in stream:
            text, usage, done = _chunk_fields(chunk) if not typed else _typed_chunk_fields(chunk)
            finished = finished or done
            if text or usage is not None or done:
                yield StreamPiece(text, usage, done, server)
    finally:
        await stream.close()
    if not finished:
        raise IncompleteStream("the stream ended without a finish_reason")


def _typed_chunk_fields(chunk: Any) -> tuple[str, int | None, bool]:
    """(text, completion tokens if reported, finished) of a chunk as the SDK's typed model."""
    text = ""
    done = False
    for choice in chunk.choices:
        if choice.delta is not None and choice.delta.content:
            text += choice.delta.content
        done = done or choice.finish_reason is not None
    return text, (chunk.usage.completion_tokens if chunk.usage is not None else None), done


def _chunk_fields(chunk: Any) -> tuple[str, int | None, bool]:
    """(text, completion tokens if reported, finished) of a decoded JSON chunk: the SDK's untyped path and
    the raw SSE path both read chunks here."""
    if not isinstance(chunk, dict):
        raise ValueError(f"a stream chunk is not a JSON object: {str(chunk)[:80]!r}")
    text = ""
    done = False
    for choice in chunk.get("choices") or ():
        text += (choice.get("delta") or {}).get("content") or ""
        done = done or choice.get("finish_reason") is not None
    usage = chunk.get("usage")
    return text, (usage.get("completion_tokens") if isinstance(usage, dict) else None), done


class _ServerTarget:
    """One server by its OpenAI base URL (also its ``name`` unless given): the constructor both ``bench --url``
    transports take, so that the session picks either by ``--transport``. ``timeout_s`` is a request's timeout
    where the transport has one (the runner bounds every request anyway); a subclass connects in ``_open``."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 3.0,
        name: str | None = None,
    ) -> None:
        self.name = name or base_url
        self.model = model
        self._open(base_url, api_key, timeout_s, connect_timeout_s)

    def _open(self, base_url: str, api_key: str | None, timeout_s: float, connect_timeout_s: float) -> None:
        raise NotImplementedError


class OpenAITarget(_ServerTarget):
    """One OpenAI-compatible server, through the openai SDK with retries off.

    ``typed=True`` calls ``chat.completions.create`` exactly as application
    code does (typed parameters, a pydantic model per chunk); ``typed=False``
    (the default) posts through the same client, transport, error mapping and
    SSE decoder but keeps chunks as dicts: ~35% less CPU per request, which
    keeps the generator off the critical path at hundreds of requests/s.
    ``http``: a connection pool to share (default: its own); ``options``: the
    keywords every one-server target takes (``api_key``, ``timeout_s``, ...).
    """

    def __init__(
        self, base_url: str, model: str, *, http: httpx.AsyncClient | None = None, typed: bool = False, **options: Any
    ) -> None:
        self.typed = typed
        self._own_http = http is None
        self._http = http
        super().__init__(base_url, model, **options)

    def _open(self, base_url: str, api_key: str | None, timeout_s: float, connect_timeout_s: float) -> None:
        if self._http is None:
            self._http = shared_http_client(timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
        self._client = _openai_client(base_url, api_key, self._http, timeout_s)

    def stream(self, request: BenchRequest) -> AsyncIterator[StreamPiece]:
        return _stream_openai(self._client, self.model, request, self.name, self.typed)

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()


class StreamErrorEvent(Exception):
    """The server sent an error object inside the stream."""

    def __init__(self, error: object) -> None:
        super().__init__(f"error event in the stream: {str(error)[:100]}")
        self.status_code = 500


class RawTarget(_ServerTarget):
    """One server through :mod:`model_server.bench.rawhttp`: the cheapest per request (plain http only).

    It sets no timeout of its own on a request: the runner's bounds it.
    """

    def _open(self, base_url: str, api_key: str | None, timeout_s: float, connect_timeout_s: float) -> None:
        from model_server.bench.rawhttp import RawPool

        self._pool = RawPool(base_url, connect_timeout_s=connect_timeout_s)
        self._headers = _json_headers(api_key)

    async def _stream(self, request: BenchRequest) -> AsyncIterator[StreamPiece]:
        lines = self._pool.stream_lines("/chat/completions", _chat_body(self.model, request), self._headers)
        # aclosing: the body generator ends here, not later in GC (which would close the connection)
        async with contextlib.aclosing(lines):
            async for piece in _sse_pieces(lines, self.name):
                yield piece

    def stream(self, request: BenchRequest) -> AsyncIterator[StreamPiece]:
        return self._stream(request)

    @property
    def connections_opened(self) -> int:
        """Connections made so far: keep-alive reuse shows as far fewer than requests."""
        return self._pool.opened

    async def aclose(self) -> None:
        await self._pool.aclose()


def _json_headers(api_key: str | None) -> dict[str, str]:
    return {"Content-Type": "application/json", "Accept": "text/event-stream", **bearer_headers(api_key)}


def _chat_body(model: str, request: BenchRequest) -> bytes:
    return json.dumps(_chat_request(model, request)).encode()


async def _sse_pieces(lines: AsyncIterator[Any], server: str) -> AsyncIterator[StreamPiece]:
    """Server-sent event lines (str or bytes) -> pieces; a chunk that is not JSON raises (that answer failed)."""
    finished = False
    async for line in lines:
        if not line.startswith(b"data:" if isinstance(line, bytes) else "data:"):
            continue
        data = line[5:].strip()
        if data in (b"[DONE]", "[DONE]"):
            continue  # read the body to its end, so the connection goes back to the pool
        chunk = json.loads(data)
        if isinstance(chunk, dict) and "error" in chunk:
            raise StreamErrorEvent(chunk["error"])
        text, usage, done = _chunk_fields(chunk)
        finished = finished or done
        if text or usage is not None or done:
            yield StreamPiece(text, usage, done, server)
    if not finished:
        raise IncompleteStream("the stream ended without a finish_reason")


class RoundRobinTarget:
    """Several servers of one model, each request to the next one in turn (no health feedback)."""

    def __init__(
        self,
        servers: list[tuple[str, str]] | tuple[tuple[str, str], ...],
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        name: str = "round-robin",
        typed: bool = False,
    ) -> None:
        if not servers:
            raise ValueError("RoundRobinTarget needs at least one (name, base_url)")
        self.name = name
        self.model = model
        self._http = shared_http_client(timeout_s=timeout_s)
        self._clients = [(server, _openai_client(url, api_key, self._http, timeout_s)) for server, url in servers]
        self._next = itertools.cycle(self._clients)
        self.typed = typed

    def stream(self, request: BenchRequest) -> AsyncIterator[StreamPiece]:
        server, client = next(self._next)
        return _stream_openai(client, self.model, request, server, self.typed)

    async def aclose(self) -> None:
        await self._http.aclose()


class ModelServerTarget:
    """A group through ``AsyncModelServer``: routing, retries and failover included.

    ``client`` is an ``AsyncModelServer``. With ``stream=True`` (default) it
    uses ``stream_chat``, whose text pieces are timed as they come (the
    client guarantees a complete answer or an exception, so the end is the
    finish); with ``stream=False`` it uses ``chat`` (the original
    application's call shape) and the whole answer is one piece: it then
    says ``streams = False``, and its requests have E2E but no TTFT or TPOT.
    """

    def __init__(
        self, client: Any, group: str, *, name: str | None = None, close_client: bool = True, stream: bool = True
    ) -> None:
        self.name = name or f"group {group}"
        self.group = group
        self._client = client
        self._close_client = close_client
        self._streaming = stream
        self.streams = stream  # the runner times tokens only of streamed answers

    async def _stream(self, request: BenchRequest) -> AsyncIterator[StreamPiece]:
        messages = [{"role": "user", "content": request.prompt}]
        if not self._streaming:
            reply = await self._client.chat(self.group, messages, max_tokens=request.max_tokens, temperature=0.0)
            text = reply.choices[0].message.content or ""
            tokens = reply.usage.completion_tokens if reply.usage is not None else None
            yield StreamPiece(text, tokens, True, None)
            return
        count = 0
        stream = self._client.stream_chat(self.group, messages, max_tokens=request.max_tokens, temperature=0.0)
        async for piece in stream:
            text = piece if isinstance(piece, str) else getattr(piece, "text", "") or ""
            server = None if isinstance(piece, str) else getattr(piece, "server", None)
            if text:
                count += 1
                yield StreamPiece(text, None, False, server)
        usage = getattr(stream, "usage", None)  # the server's count of the whole (possibly resumed) answer
        yield StreamPiece("", usage.completion_tokens if usage is not None else count, True, None)

    def stream(self, request: BenchRequest) -> AsyncIterator[StreamPiece]:
        return self._stream(request)

    async def aclose(self) -> None:
        if self._close_client:
            close = getattr(self._client, "aclose", None) or getattr(self._client, "close", None)
            if close is not None:
                result = close()
                if hasattr(result, "__await__"):
                    await result
