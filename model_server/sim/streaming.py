"""Server-sent event bodies: OpenAI chunks (chat, completions) and SGLang's native /generate stream.

Chunks are assembled from pre-encoded bytes around each piece of text, and the
pieces the latency model releases together go out in one write. A stream hit
by the drop fault raises `SimulatedStreamDrop` after its first chunk: uvicorn
then aborts the connection without the terminating chunk, so the client sees
a broken transfer, not a clean end.
"""

from __future__ import annotations

import logging
import time
from typing import AsyncIterator

from fastapi.responses import StreamingResponse

from model_server.sim.engine import SimEngine, Timing
from model_server.sim.faults import FaultAction
from model_server.sim.protocol import Reply, dumps, generate_meta, usage

__all__ = ["DropStreamLogFilter", "SimulatedStreamDrop", "generate_stream", "openai_stream", "sse"]

DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"Cache-Control": "no-cache"}


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


def sse(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=_SSE_HEADERS)


def _drop() -> SimulatedStreamDrop:
    return SimulatedStreamDrop("simulated fault: stream dropped after the first chunk")


async def openai_stream(
    engine: SimEngine,
    reply: Reply,
    prompt_tokens: int,
    action: FaultAction,
    *,
    request_id: str,
    model: str,
    chat: bool,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """OpenAI chunks: first token (with the role for chat), the rest, a finish chunk, [usage], [DONE]."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    head = b"data: " + dumps({"id": request_id, "object": obj, "created": int(time.time()), "model": model})[:-1]
    if chat:
        pre = head + b',"choices":[{"index":0,"delta":{"content":'
        first_pre = head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":'
        post = b'},"logprobs":null,"finish_reason":null}]}\n\n'
    else:
        pre = first_pre = head + b',"choices":[{"index":0,"text":'
        post = b',"logprobs":null,"finish_reason":null}]}\n\n'
    timing = Timing(engine.clock())
    pieces = reply.pieces
    sent = 0
    async for n in engine.stream(prompt_tokens, len(pieces), timing):
        if sent == 0:
            if action is FaultAction.MALFORMED:
                yield first_pre + b'"trunc\n\n'  # an event whose data is not valid JSON
            else:
                yield first_pre + dumps(pieces[0]) + post
            if action is FaultAction.DROP_STREAM:
                raise _drop()
        else:
            yield b"".join([pre + dumps(p) + post for p in pieces[sent : sent + n]])
        sent += n
    engine.finish(timing, prompt_tokens, reply.tokens)
    final: dict = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
    final.update(logprobs=None, finish_reason=reply.finish_reason, matched_stop=reply.matched)
    yield head + b',"choices":[' + dumps(final) + b"]}\n\n"
    if include_usage:
        yield head + b',"choices":[],"usage":' + dumps(usage(prompt_tokens, reply.tokens)) + b"}\n\n"
    yield DONE


async def generate_stream(
    engine: SimEngine, reply: Reply, prompt_tokens: int, action: FaultAction
) -> AsyncIterator[bytes]:
    """SGLang's native stream: each event carries the text so far and its meta_info; then [DONE]."""
    timing = Timing(engine.clock())
    pieces = reply.pieces
    sent = 0
    async for n in engine.stream(prompt_tokens, len(pieces), timing):
        if sent == 0 and action is FaultAction.MALFORMED:
            yield b'data: {"text": "trunc\n\n'
        else:
            events = []
            for k in range(sent + 1, sent + n + 1):
                meta = {"prompt_tokens": prompt_tokens, "completion_tokens": k, "finish_reason": None}
                events.append(b"data: " + dumps({"text": "".join(pieces[:k]), "meta_info": meta}) + b"\n\n")
            yield b"".join(events)
        if sent == 0 and action is FaultAction.DROP_STREAM:
            raise _drop()
        sent += n
    engine.finish(timing, prompt_tokens, reply.tokens)
    meta = generate_meta(reply, prompt_tokens, engine.clock() - timing.arrived)
    yield b"data: " + dumps({"text": reply.text, "meta_info": meta}) + b"\n\n"
    yield DONE
