"""Answers assembled from what replicas sent (pure): one text out of a resumed stream's segments.

:class:`StreamAssembly` takes a streamed answer's events, segment after
segment (a *segment* is the part one replica sent before it finished or
broke), and keeps what the caller gets: the text, the tokens (from SGLang's
``continuous_usage_stats`` when it sends them, else one per text chunk), the
finish reason and the usage of the whole answer (the caller's prompt once,
the completion tokens of every segment summed). ``chat()`` asks for a stream
under the hood and returns :meth:`StreamAssembly.chat_completion`: the same
``ChatCompletion`` an unstreamed call returns. Requests with several
choices, tools or log-probabilities are assembled by the openai SDK's own
``ChatCompletionStreamState``.
"""

from __future__ import annotations

import time
from typing import Any

from openai.types.chat import ChatCompletion, ChatCompletionChunk

from model_server.client.retry import MalformedResponse
from model_server.client.wire import StreamEventError, error_message
from model_server.errors import UnexpectedAnswerError

__all__ = ["StreamAssembly", "embedding_vectors", "needs_rich_assembly"]


def needs_rich_assembly(body: dict[str, Any]) -> bool:
    """Whether a chat answer needs the SDK's full accumulator (several choices, tool calls, logprobs)."""
    return body.get("n") not in (None, 1) or any(
        body.get(k) not in (None, False, [], {}) for k in ("tools", "functions", "logprobs", "top_logprobs")
    )


class StreamAssembly:
    """What a (possibly resumed) stream delivered so far, and the answer it makes."""

    def __init__(self, kind: str = "chat", rich: bool = False) -> None:
        self.kind = kind  # "chat" or "completion"
        self.pieces: list[str] = []
        self.reasoning: list[str] = []
        self.tokens_before = 0  # tokens of the finished segments
        self.segment_tokens = 0
        self.segment_usage_tokens: int | None = None
        self.segments = 0
        self.prompt_tokens: int | None = None
        self.finish_reason: str | None = None
        self.matched_stop: Any = None
        self.head: dict[str, Any] = {}
        self.usage_seen = False
        self.progressed = False  # the segment has sent a token (text, or reasoning before the text)
        self._state: Any = None
        if rich:
            from openai.lib.streaming.chat import ChatCompletionStreamState

            self._state = ChatCompletionStreamState()

    # ---- segments ----------------------------------------------------------------------

    def begin_segment(self) -> None:
        """A new replica takes over (the first, or one resuming): its own token count starts at 0."""
        self.tokens_before = self.tokens
        self.segment_tokens = 0
        self.segment_usage_tokens = None
        self.finish_reason = None
        self.progressed = False
        self.segments += 1

    def restart(self) -> None:
        """Forget a segment that broke before any text reached the caller: the answer starts over."""
        self.pieces.clear()
        self.reasoning.clear()
        self.tokens_before = self.segment_tokens = 0
        self.segment_usage_tokens = None
        self.prompt_tokens = None
        self.usage_seen = False
        self.segments = 0
        if self._state is not None:
            from openai.lib.streaming.chat import ChatCompletionStreamState

            self._state = ChatCompletionStreamState()

    @property
    def tokens(self) -> int:
        """Completion tokens received so far, over every segment."""
        seg = self.segment_usage_tokens if self.segment_usage_tokens is not None else self.segment_tokens
        return self.tokens_before + seg

    @property
    def segment_tokens_so_far(self) -> int:
        return self.tokens - self.tokens_before

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    # ---- events ------------------------------------------------------------------------

    def take(self, event: Any) -> str:
        """Fold one event of the stream in; the caller's new text (may be empty).

        MalformedResponse for an event that is not a chunk; StreamEventError for an error event.
        """
        if not isinstance(event, dict):
            raise MalformedResponse(f"not a stream chunk: {str(event)[:120]!r}")
        choices = event.get("choices")
        if choices is None and "error" in event:
            error = event.get("error")
            code = error.get("code") if isinstance(error, dict) else None
            raise StreamEventError(code, error_message(event, str(error)))
        if not isinstance(choices, list):
            raise MalformedResponse(f"not a stream chunk: {str(event)[:120]!r}")
        if not self.head and "id" in event:
            self.head = {k: event.get(k) for k in ("id", "created", "model", "system_fingerprint")}
        usage = event.get("usage")
        if isinstance(usage, dict):
            self._take_usage(usage)
        if self._state is not None:
            return self._take_rich(event)
        text = ""
        for choice in choices:
            if not isinstance(choice, dict):
                raise MalformedResponse(f"a stream chunk's choice is not an object: {str(choice)[:120]!r}")
            if choice.get("index", 0) != 0:
                continue
            piece, reasoning = self._choice_text(choice)
            if reasoning:
                self.reasoning.append(reasoning)
                self.progressed = True
            if piece:
                text += piece
            if choice.get("finish_reason") is not None:
                self.finish_reason = str(choice["finish_reason"])
                self.matched_stop = choice.get("matched_stop")
                _no_abort(self.finish_reason)
        if text:
            self.pieces.append(text)
            self.segment_tokens += 1
            self.progressed = True
        return text

    def _choice_text(self, choice: dict[str, Any]) -> tuple[str, str]:
        if self.kind == "completion":
            text = choice.get("text")
            if text is not None and not isinstance(text, str):
                raise MalformedResponse("a completion chunk's text is not a string")
            return text or "", ""
        delta = choice.get("delta")
        if delta is None:
            return "", ""
        if not isinstance(delta, dict):
            raise MalformedResponse("a chat chunk's delta is not an object")
        content, reasoning = delta.get("content"), delta.get("reasoning_content")
        if (content is not None and not isinstance(content, str)) or (
            reasoning is not None and not isinstance(reasoning, str)
        ):
            raise MalformedResponse("a chat chunk's content is not a string")
        return content or "", reasoning or ""

    def _take_usage(self, usage: dict[str, Any]) -> None:
        tokens, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
            self.segment_usage_tokens = tokens
            self.usage_seen = True
        if (
            self.prompt_tokens is None
            and self.segments <= 1
            and isinstance(prompt, int)
            and not isinstance(prompt, bool)
        ):
            self.prompt_tokens = prompt

    def _take_rich(self, event: dict[str, Any]) -> str:
        try:
            chunk = ChatCompletionChunk.model_validate(event)
        except ValueError as err:
            raise MalformedResponse(f"not a chat completion chunk: {err}"[:200]) from err
        self._state.handle_chunk(chunk)
        text = ""
        for choice in chunk.choices:
            delta = choice.delta
            if delta is not None and (
                delta.content or delta.tool_calls or delta.function_call or getattr(delta, "reasoning_content", None)
            ):
                self.progressed = True  # any choice's token: text, a tool call, reasoning
            if choice.finish_reason is not None:
                _no_abort(choice.finish_reason)
                if choice.index == 0:
                    self.finish_reason = choice.finish_reason
            if choice.index == 0 and delta is not None and delta.content:
                text += delta.content
        if text:
            self.pieces.append(text)
        if self.progressed:
            self.segment_tokens += 1
        return text

    # ---- the answer ----------------------------------------------------------------------

    def usage(self) -> dict[str, int] | None:
        if not self.usage_seen and self.prompt_tokens is None:
            return None
        prompt = self.prompt_tokens or 0
        return {"prompt_tokens": prompt, "completion_tokens": self.tokens, "total_tokens": prompt + self.tokens}

    def chat_completion(self) -> ChatCompletion:
        """The whole answer as the ChatCompletion an unstreamed call returns (usage summed over segments)."""
        if self._state is not None:
            try:
                final = self._state.get_final_completion()
            except (AssertionError, ValueError) as err:
                raise MalformedResponse(f"the stream held no chat completion: {err}"[:200]) from err
            return final
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": self.finish_reason or "stop",
        }
        if self.matched_stop is not None:
            choice["matched_stop"] = self.matched_stop
        data: dict[str, Any] = {
            "id": self.head.get("id") or "chatcmpl-model-server",
            "object": "chat.completion",
            "created": self.head.get("created") or int(time.time()),
            "model": self.head.get("model") or "",
            "choices": [choice],
        }
        usage = self.usage()
        if usage is not None:
            data["usage"] = usage
        try:
            return ChatCompletion.model_validate(data)
        except ValueError:  # e.g. a finish reason outside OpenAI's list ("abort"): keep it as sent
            return ChatCompletion.model_construct(**data)


def _no_abort(finish_reason: str) -> None:
    """SGLang ends a request it aborted (abort_request, pause_generation) with finish_reason "abort": a break."""
    if finish_reason == "abort":
        raise StreamEventError(None, "the engine aborted the request (finish_reason: abort)")


def embedding_vectors(data: Any, count: int) -> list[list[float]]:
    """The vectors of an /v1/embeddings answer in input order.

    MalformedResponse (the replica's fault) for a body that is not an embeddings answer;
    UnexpectedAnswerError (no one's fault to retry) for a well-formed answer with another count.
    """
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(d, dict) for d in items):
        raise MalformedResponse(f"not an embeddings answer: {str(data)[:120]!r}")
    try:
        ordered = sorted(items, key=lambda d: int(d.get("index", 0)))
    except (TypeError, ValueError) as err:
        raise MalformedResponse("an embedding's index is not a number") from err
    vectors = [d.get("embedding") for d in ordered]
    if not all(isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v[:4]) for v in vectors):
        raise MalformedResponse("an embedding is empty or not a list of floats")
    if len(vectors) != count:
        raise UnexpectedAnswerError(
            f"the replica answered {len(vectors)} embedding(s) for {count} input(s). The answer is well-formed, "
            f"so the request and the server disagree on what an input is: send strings, or lists of token ids."
        )
    return vectors
