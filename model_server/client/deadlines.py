"""Deadlines inside one attempt, derived from what the group has shown (pure).

A hung replica (SIGSTOP, a deadlocked scheduler) accepts the connection and
never answers; a request sent there must not wait out a whole request
timeout of tens of seconds. Each attempt therefore has:

- a **first-token deadline**: ``factor x`` the group's smoothed time to first
  token, plus the prompt's prefill allowance (``prompt_tokens /
  prefill_tokens_per_s``: a long prompt is slow to prefill), clamped to
  ``[floor, ceiling]``. For embeddings the "first token" is the whole answer.
- a **stall deadline** between two chunks once text flows: ``factor x`` the
  group's smoothed gap between chunks, clamped to ``[floor, ceiling]``.

A busy replica is not a hung one: the smoothed times follow the group's real
answers (queueing included), and the floors keep a deadline from firing on
the ordinary jitter of a loaded server. :class:`StreamTiming` holds the two
smoothed times of one group; :func:`attempt_deadlines` is the decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model_server.config import ClientPolicy

__all__ = [
    "AttemptDeadlines",
    "GroupTiming",
    "StreamTiming",
    "attempt_deadlines",
    "estimate_tokens",
    "first_token_timeout_s",
    "stall_timeout_s",
]

CHARS_PER_TOKEN = 4.0  # a rough, tokenizer-free estimate (English text with a BPE tokenizer)
TIMING_ALPHA = 0.2


@dataclass(frozen=True)
class AttemptDeadlines:
    first_token_s: float  # from the send to the first text (the whole answer, unstreamed)
    stall_s: float  # between two chunks once text flows


@dataclass(frozen=True)
class GroupTiming:
    """What a group has shown (smoothed time to first token and gap between chunks) and the deadlines it gives."""

    ttft_s: float | None
    gap_s: float | None
    first_token_s: float
    stall_s: float


class StreamTiming:
    """A group's smoothed time to first token and gap between chunks (mutated under the group's lock)."""

    def __init__(self, alpha: float = TIMING_ALPHA) -> None:
        self.alpha = alpha
        self.ttft_s: float | None = None
        self.gap_s: float | None = None

    def seed_ttft(self, probe_latencies_s: Sequence[float]) -> None:
        """Before any real answer: the probes' latency (a one-token answer is mostly time to first token)."""
        if self.ttft_s is None and probe_latencies_s:
            self.ttft_s = sorted(probe_latencies_s)[len(probe_latencies_s) // 2]

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_s = seconds if self.ttft_s is None else self.ttft_s + self.alpha * (seconds - self.ttft_s)

    def observe_gap(self, seconds: float) -> None:
        self.gap_s = seconds if self.gap_s is None else self.gap_s + self.alpha * (seconds - self.gap_s)


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def first_token_timeout_s(policy: ClientPolicy, ttft_s: float | None, prompt_tokens: int) -> float:
    base = policy.first_token_timeout_factor * ttft_s if ttft_s is not None else 0.0
    prefill = max(0, prompt_tokens) / policy.prefill_tokens_per_s
    return _clamp(base + prefill, policy.first_token_timeout_floor_s, policy.first_token_timeout_ceiling_s)


def stall_timeout_s(policy: ClientPolicy, gap_s: float | None) -> float:
    base = policy.stall_timeout_factor * gap_s if gap_s is not None else 0.0
    return _clamp(base, policy.stall_timeout_floor_s, policy.stall_timeout_ceiling_s)


def attempt_deadlines(policy: ClientPolicy, timing: StreamTiming, prompt_tokens: int) -> AttemptDeadlines:
    return AttemptDeadlines(
        first_token_timeout_s(policy, timing.ttft_s, prompt_tokens), stall_timeout_s(policy, timing.gap_s)
    )


def estimate_tokens(value: Any) -> int:
    """A rough token count of a prompt, messages or inputs (characters / 4; token ids counted as given)."""
    if isinstance(value, str):
        return int(len(value) / CHARS_PER_TOKEN) + 1
    if isinstance(value, int) and not isinstance(value, bool):
        return 1
    if isinstance(value, dict):
        return sum(estimate_tokens(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(estimate_tokens(v) for v in value)
    return 0
