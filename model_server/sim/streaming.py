"""Server-sent event bodies in SGLang 0.5.23's exact shapes: chat, completions, native /generate.

Chunks are assembled from pre-encoded bytes around each piece of text, and the
pieces the latency model releases together go out in one write. SGLang's
shapes (``serving_chat.py``, ``serving_completions.py``, ``sse_utils.py``):

- chat: a first chunk with only the role (``"content": ""``), sent together
  with the first token's chunk; one chunk per token with
  ``"reasoning_content": null``; a finish chunk (``finish_reason``,
  ``matched_stop``); the usage chunk (``choices: []``) if asked; ``[DONE]``;
- completions: one chunk per token, the last one carrying ``finish_reason``
  and ``matched_stop``; every chunk has ``"usage"`` (null unless
  ``continuous_usage_stats``); the usage chunk without null fields; ``[DONE]``.

Token faults are read live, between writes: ``hang_before_first_token`` holds
the stream before its first event, ``stall_after_tokens`` after that many
tokens (both until the fault is lifted or the client goes away),
``crash_after_tokens`` ends the process once that many tokens are out. A
stream hit by ``drop_stream`` raises `SimulatedStreamDrop` after its first
chunk with text: uvicorn then aborts the connection without the terminating
chunk, so the client sees a broken transfer, not a clean end.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from model_server.sim.engine import SimEngine, Timing
from model_server.sim.faults import ReplyFault
from model_server.sim.protocol import dumps, usage
from model_server.sim.reply import Reply, piece_logprobs

__all__ = [
    "DropStreamLogFilter",
    "SimulatedStreamDrop",
    "SseResponse",
    "generate_stream",
    "openai_stream",
    "sse",
    "sse_after_first_chunk",
]

DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"Cache-Control": "no-cache"}
_CRASH_FLUSH_S = 0.02  # let the last chunk leave before the process exits


class SimulatedStreamDrop(Exception):
    """Raised inside a streaming body to make uvicorn abort the connection (the drop_stream fault)."""


class DropStreamLogFilter(logging.Filter):
    """Keep uvicorn's log free of the tracebacks of streams cut on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None:
            if isinstance(exc, SimulatedStreamDrop):
                return False
            exc = exc.__cause__ or exc.__context__
        return True


class SseResponse(StreamingResponse):
    """A streaming response that always stops its body when the client goes away.

    Starlette only watches for the disconnect under ASGI spec < 2.4; a stalled
    stream writes nothing, so it must be cancelled by the disconnect itself.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def body() -> None:
                await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(body)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


def sse(body: AsyncIterator[bytes]) -> SseResponse:
    """A stream whose headers go out at once (SGLang's native /generate; the hang_before_first_token fault)."""
    return SseResponse(body, media_type="text/event-stream", headers=_SSE_HEADERS)


async def sse_after_first_chunk(body: AsyncIterator[bytes]) -> SseResponse:
    """A stream whose headers go out with its first chunk, as SGLang's OpenAI routes do
    ("kick-start the generator ... before HTTP 200 is sent"): a stream that never makes a
    token never gets its headers either."""
    try:
        first = await body.__anext__()
    except StopAsyncIteration:
        first = b""

    async def chained() -> AsyncIterator[bytes]:
        yield first
        async for chunk in body:
            yield chunk

    return sse(chained())


def _drop() -> SimulatedStreamDrop:
    return SimulatedStreamDrop("simulated fault: stream dropped after the first chunk with text")


@functools.lru_cache(maxsize=4096)
def _json(piece: str) -> bytes:
    """A piece as a JSON string (the filler's pieces come from a small vocabulary: cached)."""
    return dumps(piece)


class _Chunks:
    """Pre-encoded pieces of one stream's events (one request; choices by index)."""

    def __init__(self, request_id: str, model: str, chat: bool, created: int, logprobs: int | None) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        self.head = b"data: " + dumps({"id": request_id, "object": obj, "created": created, "model": model})[:-1]
        self.chat = chat
        self.logprobs = logprobs  # None: off; k: with k top alternatives
        self._choice0 = self.head + b',"choices":[{"index":0'

    def _choice(self, index: int) -> bytes:
        if index == 0:
            return self._choice0
        return self.head + b',"choices":[{"index":' + str(index).encode()

    def role(self, index: int) -> bytes:
        return self._choice(index) + (
            b',"delta":{"reasoning_content":null,"role":"assistant","content":""},"logprobs":null,'
            b'"finish_reason":null,"matched_stop":null}]}\n\n'
        )

    def _logprobs(self, piece: str, position: int) -> bytes:
        if self.logprobs is None:
            return b"null"
        logprob, top = piece_logprobs(piece, position, self.logprobs)
        if self.chat:
            alternatives = [{"token": t, "bytes": list(t.encode()), "logprob": lp} for t, lp in top]
            entry = {"token": piece, "bytes": list(piece.encode()), "logprob": logprob, "top_logprobs": alternatives}
            return dumps({"content": [entry]})
        body = {"text_offset": [-1], "token_logprobs": [logprob], "tokens": [piece], "top_logprobs": [dict(top)]}
        return dumps(body)

    def text(self, index: int, piece: str, position: int, usage_json: bytes | None, finish: Reply | None) -> bytes:
        """One token's chunk. Completions: the last one carries the finish, and every chunk has "usage"."""
        logprobs = b"null" if self.logprobs is None else self._logprobs(piece, position)
        if self.chat:
            out = b"".join(
                (self._choice(index), b',"delta":{"reasoning_content":null,"content":', _json(piece), b'},"logprobs":',
                 logprobs, b',"finish_reason":null,"matched_stop":null}]')
            )  # fmt: skip
            return out + (b',"usage":' + usage_json + b"}\n\n" if usage_json is not None else b"}\n\n")
        out = self._choice(index) + b',"text":' + _json(piece) + b',"logprobs":' + logprobs
        if finish is None:
            out += b',"finish_reason":null,"matched_stop":null}]'
        else:
            out += b',"finish_reason":' + dumps(finish.finish_reason)
            out += b',"matched_stop":' + dumps(finish.matched) + b"}]"
        return out + b',"usage":' + (usage_json or b"null") + b"}\n\n"

    def tool_calls(self, index: int, reply: Reply, usage_json: bytes | None) -> bytes:
        """Chat: the tool calls, in one chunk (SGLang's pydantic dump: every field present)."""
        calls = [call.as_json(i) for i, call in enumerate(reply.tool_calls)]
        delta = {"role": None, "content": None, "reasoning_content": None, "tool_calls": calls}
        out = self._choice(index) + b',"delta":' + dumps(delta)
        out += b',"logprobs":null,"finish_reason":null,"matched_stop":null}],"usage":'
        return out + (usage_json or b"null") + b"}\n\n"

    def finish(self, index: int, reply: Reply) -> bytes:
        """Chat: the finish chunk after the last token."""
        return (
            self._choice(index)
            + b',"delta":{"reasoning_content":null},"logprobs":null,"finish_reason":'
            + dumps(reply.finish_reason)
            + b',"matched_stop":'
            + dumps(reply.matched)
            + b"}]}\n\n"
        )

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        body = usage(prompt_tokens, completion_tokens)
        if not self.chat:  # SGLang dumps the completions usage chunk with exclude_none
            body = {k: v for k, v in body.items() if v is not None}
        return self.head + b',"choices":[],"usage":' + dumps(body) + b"}\n\n"


async def _token_faults(engine: SimEngine, sent: int) -> None:
    """Carry out the live token faults at a stream position: stall, hang, crash."""
    f = engine.faults
    if sent == 0 and f.hang_before_first_token:
        await engine.wait_while(lambda f: f.hang_before_first_token)
    if f.crash_after_tokens is not None and sent >= f.crash_after_tokens:
        await asyncio.sleep(_CRASH_FLUSH_S)
        engine.crash(f"a stream sent {sent} tokens (crash_after_tokens={f.crash_after_tokens})")
    if f.stall_after_tokens is not None and sent >= f.stall_after_tokens:
        await engine.wait_while(lambda f: f.stall_after_tokens is not None and sent >= f.stall_after_tokens)


def _limit(engine: SimEngine, sent: int, end: int) -> int:
    """How far a stream at `sent` may go towards `end` before a token fault must act."""
    f = engine.faults
    for k in (f.stall_after_tokens, f.crash_after_tokens):
        if k is not None and sent <= k < end:
            end = k
    return end


async def _positions(
    engine: SimEngine, prompt_tokens: int, steps: int, fault: ReplyFault, timing: Timing, streaming: bool = True
) -> AsyncIterator[tuple[int, int]]:
    """The (start, stop) token steps a stream may send now, under the latency model and the token faults.

    The last pair is (steps, steps), after every fault check: the stream may finish then.
    """
    sent = 0
    async for n in engine.stream(prompt_tokens, steps, timing):
        end = sent + n
        while sent < end:
            await _token_faults(engine, sent)
            stop = _limit(engine, sent, end)
            if stop > sent:
                yield sent, stop
                sent = stop
    await _token_faults(engine, sent)
    yield sent, sent


async def openai_stream(
    engine: SimEngine,
    choices: list[tuple[int, Reply]],
    prompt_tokens: int,
    fault: ReplyFault,
    *,
    request_id: str,
    model: str,
    chat: bool,
    include_usage: bool,
    continuous_usage: bool = False,
    logprobs: int | None = None,
) -> AsyncIterator[bytes]:
    """OpenAI chunks in SGLang's shapes (see the module docstring), for one or more choices.

    A step is one token of every choice that still has one; a tool-call choice sends its
    calls at the first step.
    """
    c = _Chunks(request_id, model, chat, int(time.time()), logprobs)
    timing = Timing(engine.clock(), streaming=True)
    steps = max(max(len(r.pieces) for _, r in choices), 1 if any(r.tool_calls for _, r in choices) else 0)
    completion_total = sum(r.tokens for _, r in choices)

    def usage_json(k: int) -> bytes | None:
        return dumps(usage(prompt_tokens, k)) if continuous_usage else None

    def events(start: int, stop: int) -> bytes:
        out = []
        for index, reply in choices:
            pieces = reply.pieces
            last = len(pieces) - 1
            if start == 0 and chat and (pieces or reply.tool_calls):
                out.append(c.role(index))
            if start == 0 and reply.tool_calls:
                out.append(c.tool_calls(index, reply, usage_json(reply.tokens)))
            for k in range(start, min(stop, len(pieces))):
                done = reply if (k == last and not chat) else None
                out.append(c.text(index, pieces[k], k, usage_json(k + 1), done))
        return b"".join(out)

    async for start, stop in _positions(engine, prompt_tokens, steps, fault, timing):
        if stop == start:
            break
        if start == 0 and fault is ReplyFault.MALFORMED:
            yield (c.role(choices[0][0]) if chat else b"") + c.head + b',"choices":[{"index":0,"text":"trunc\n\n'
            start = 1
            if stop <= start:
                continue
        yield events(start, stop)
        if fault is ReplyFault.DROP_STREAM and start == 0:
            raise _drop()
    engine.finish(timing, prompt_tokens, completion_total, streaming=True)
    tail = []
    for index, reply in choices:
        if chat:
            if not (reply.pieces or reply.tool_calls):  # nothing was sent for it yet
                tail.append(c.role(index))
            tail.append(c.finish(index, reply))
        elif not reply.pieces:  # an empty completion still gets its one chunk, with the finish
            tail.append(c.text(index, "", 0, usage_json(0), reply))
    if include_usage:
        tail.append(c.usage(prompt_tokens, completion_total))
    tail.append(DONE)
    yield b"".join(tail)


async def generate_stream(
    engine: SimEngine, choices: list[tuple[int, Reply]], prompt_tokens: int, fault: ReplyFault, meta: Callable
) -> AsyncIterator[bytes]:
    """SGLang's native stream: each event carries the text so far, its output_ids and meta_info; then [DONE].

    `meta(index, reply, completion_tokens, finished)` builds an event's meta_info. A batch sets "index".
    """
    timing = Timing(engine.clock(), streaming=True)
    steps = max(len(r.pieces) for _, r in choices)
    batch = len(choices) > 1

    def event(index: int, reply: Reply, k: int, finished: bool) -> bytes:
        ids = reply.token_ids[:k]
        body: dict = {"text": "".join(reply.pieces[:k]), "output_ids": ids}
        body["meta_info"] = meta(index, reply, k, finished)
        if batch:
            body["index"] = index
        return b"data: " + dumps(body) + b"\n\n"

    async for start, stop in _positions(engine, prompt_tokens, steps, fault, timing):
        if stop == start:
            break
        if start == 0 and fault is ReplyFault.MALFORMED:
            yield b'data: {"text": "trunc\n\n'
            start = 1
        out = []
        for k in range(start + 1, stop + 1):
            for index, reply in choices:
                if k < len(reply.pieces):  # the last token comes with the finish
                    out.append(event(index, reply, k, False))
        if out:
            yield b"".join(out)
            if fault is ReplyFault.DROP_STREAM:
                raise _drop()
    engine.finish(timing, prompt_tokens, sum(r.tokens for _, r in choices), streaming=True)
    yield b"".join([event(i, r, len(r.pieces), True) for i, r in choices] + [DONE])
