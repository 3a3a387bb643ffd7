"""The latency model (pure) and the bounded running batch (asyncio).

TTFT = (ttft_ms + ttft_per_prompt_token_ms x prompt_tokens) x slow_factor.
Each output token takes tpot_ms x (1 + tpot_growth x (running - 1)) x slow_factor,
where `running` is the size of the running batch when the token is made. At most
``max_running_requests`` run at once; the rest wait in FIFO order.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model_server.sim.settings import SimSettings

__all__ = ["LatencyModel", "RunningBatch", "tokens_per_slice"]

# A non-streamed reply sleeps in slices of at least this long, re-reading the
# batch size each time, instead of once per token (timers are not free).
MIN_SLICE_S = 0.005


@dataclass(frozen=True)
class LatencyModel:
    """The timing half of the settings (their defaults live in SimSettings, once)."""

    ttft_ms: float
    ttft_per_prompt_token_ms: float
    tpot_ms: float
    tpot_growth: float

    @classmethod
    def from_settings(cls, settings: SimSettings) -> LatencyModel:
        return cls(settings.ttft_ms, settings.ttft_per_prompt_token_ms, settings.tpot_ms, settings.tpot_growth)

    def ttft_s(self, prompt_tokens: int, slow_factor: float = 1.0) -> float:
        """Seconds from the start of running to the first output token."""
        return (self.ttft_ms + self.ttft_per_prompt_token_ms * prompt_tokens) * slow_factor / 1000.0

    def tpot_s(self, running: int, slow_factor: float = 1.0) -> float:
        """Seconds per output token while `running` requests share the batch."""
        return self.tpot_ms * (1.0 + self.tpot_growth * (max(running, 1) - 1)) * slow_factor / 1000.0

    def total_s(self, prompt_tokens: int, output_tokens: int, running: int = 1, slow_factor: float = 1.0) -> float:
        """End-to-end seconds at a constant batch size: TTFT plus the tokens after the first."""
        rest = max(output_tokens - 1, 0)
        return self.ttft_s(prompt_tokens, slow_factor) + rest * self.tpot_s(running, slow_factor)


def tokens_per_slice(tpot_s: float) -> int:
    """How many tokens one sleep covers so that a sleep lasts at least MIN_SLICE_S."""
    if tpot_s <= 0:
        return 1 << 30
    return max(1, math.ceil(MIN_SLICE_S / tpot_s))


class RunningBatch:
    """At most `capacity` requests run; the others queue. Counts both for metrics."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.running = 0
        self.queued = 0
        self.running_tokens = 0  # prompt + planned output tokens of running requests
        self._slots = asyncio.Semaphore(capacity)

    @contextlib.asynccontextmanager
    async def slot(self, tokens: int = 0) -> AsyncIterator[None]:
        self.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.queued -= 1
        self.running += 1
        self.running_tokens += tokens
        try:
            yield
        finally:
            self.running -= 1
            self.running_tokens -= tokens
            self._slots.release()
