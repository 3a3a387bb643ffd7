"""Resuming a broken stream on another replica (pure: decisions and request bodies).

When a stream breaks after text has arrived (connection reset, replica
killed, a stall, a 5xx or malformed chunk mid-stream), the client sends a
*continuation* to another replica and the caller's iterator goes on:

- chat: the original messages plus the text received as a final assistant
  message, with ``continue_final_message: true`` (SGLang's
  ``ChatCompletionRequest`` field), so the model continues that message;
- completions: the prompt plus the text received;
- ``max_tokens`` (or ``max_completion_tokens``) reduced by the tokens received.

At temperature 0 the continuation is the answer the first replica would have
given. It is not the same answer, and so never tried, when the request asks
for several choices (``n > 1``), tools, a response format or constrained
decoding (a grammar cannot restart mid-way), or log-probabilities (the
received tokens' would be missing): :func:`why_not_resumable` says which.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model_server.config import ClientPolicy

__all__ = ["continuation_body", "why_no_resume", "why_not_resumable"]

_NOT_RESUMABLE = {
    "tools": "it uses tools (a continuation could not finish a tool call the same way)",
    "tool_choice": "it sets tool_choice",
    "functions": "it uses functions",
    "function_call": "it sets function_call",
    "response_format": "it asks for a response_format (structured output restarts its grammar)",
    "logprobs": "it asks for logprobs (the received tokens' log-probabilities would be missing)",
    "top_logprobs": "it asks for top_logprobs",
}
_CONSTRAINED = ("regex", "json_schema", "ebnf", "structural_tag")  # SGLang's constrained decoding, in extra_body


def why_not_resumable(kind: str, body: Mapping[str, Any], policy: ClientPolicy) -> str | None:
    """None if a broken stream of this request may be resumed; else the reason, for the error message."""
    if not policy.resume_streams:
        return "resuming is off (client.resume_streams = false)"
    if policy.max_resumes < 1:
        return "client.max_resumes is 0"
    n = body.get("n")
    if n not in (None, 1):
        return f"it asks for n = {n} choices (a continuation is one answer)"
    for key, reason in _NOT_RESUMABLE.items():
        if body.get(key) not in (None, False, [], {}):
            return reason
    for key in _CONSTRAINED:
        if body.get(key) is not None:
            return f"it uses constrained decoding ({key})"
    if kind == "completion":
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return "its prompt is not a single string (a batch or token ids)"
        if body.get("echo") or body.get("suffix") is not None or body.get("best_of") not in (None, 1):
            return "it uses echo, suffix or best_of"
    return None


def why_no_resume(static_reason: str | None, resumes_done: int, policy: ClientPolicy, budget_left: bool) -> str | None:
    """None to resume now; else why not (the request's own reason, the resume limit, or the spent budget)."""
    if static_reason is not None:
        return static_reason
    if resumes_done >= policy.max_resumes:
        return f"it was resumed {resumes_done} time(s) already (client.max_resumes = {policy.max_resumes})"
    if not budget_left:
        return "the request's retry budget or deadline is spent"
    return None


def _reduced(body: dict[str, Any], tokens: int) -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            body[key] = max(1, value - tokens)


def continuation_body(kind: str, original: Mapping[str, Any], received: str, tokens: int) -> dict[str, Any]:
    """The body that continues ``original`` after ``received`` (``tokens`` of it) on another replica."""
    body = dict(original)
    _reduced(body, tokens)
    if kind == "completion":
        body["prompt"] = str(original["prompt"]) + received
        return body
    messages = [dict(m) if isinstance(m, Mapping) else m for m in original["messages"]]
    last = messages[-1] if messages else None
    if original.get("continue_final_message") and isinstance(last, dict) and last.get("role") == "assistant":
        last["content"] = str(last.get("content") or "") + received  # the caller's own continuation, extended
    else:
        messages.append({"role": "assistant", "content": received})
    body["messages"] = messages
    body["continue_final_message"] = True
    return body
