"""The simulated engine's live state: faults, the running batch, counters, the sleeping.

One `SimEngine` per app. The HTTP layer (app.py) asks it to admit a request
(which draws the fault), then to run the request through the batch, sleeping
for the latency model's TTFT and per-token times. With zero latency nothing
sleeps, so the per-request cost is only bookkeeping.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import time
from typing import AsyncIterator, Callable

from model_server.sim.faults import FaultAction, Faults, decide
from model_server.sim.latency import LatencyModel, RunningBatch, tokens_per_slice
from model_server.sim.metrics import SimMetrics
from model_server.sim.settings import SimSettings

__all__ = ["SimEngine", "Timing", "CRASH_EXIT_STATUS", "KV_TOKENS_PER_SLOT"]

log = logging.getLogger(__name__)

CRASH_EXIT_STATUS = 1
KV_TOKENS_PER_SLOT = 2048  # the simulated KV pool is max_running_requests x this (for sglang:token_usage)
_MIN_STREAM_SLEEP_S = 0.001  # shorter waits are carried over to the next token (timer resolution)


class Timing:
    """When a request arrived and made its first token (monotonic seconds)."""

    __slots__ = ("arrived", "first_token")

    def __init__(self, arrived: float) -> None:
        self.arrived = arrived
        self.first_token: float | None = None


class SimEngine:
    def __init__(
        self,
        settings: SimSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        exit_process: Callable[[int], None] = os._exit,
    ) -> None:
        self.settings = settings
        self.latency = LatencyModel.from_settings(settings)
        self.faults = Faults.from_settings(settings)
        self.rng = random.Random(settings.seed)
        self.metrics = SimMetrics(settings.model_name)
        self.batch = RunningBatch(settings.max_running_requests)
        self.clock = clock
        self._exit_process = exit_process
        self.started_at = clock()
        self.ready_at = self.started_at + settings.startup_delay_s
        self.requests_total = 0
        self.by_route: collections.Counter[str] = collections.Counter()
        self._since_crash_armed = 0
        self._hang_lifted = asyncio.Event()

    # --- state ---

    def loading(self) -> bool:
        return self.clock() < self.ready_at

    def set_faults(self, changes: dict) -> Faults:
        """Apply a /sim/faults change (FaultError on bad input). Setting crash_after re-arms its count."""
        self.faults = self.faults.updated(changes)
        if "crash_after" in changes:
            self._since_crash_armed = 0
        if self.faults.hang:
            if self._hang_lifted.is_set():
                self._hang_lifted = asyncio.Event()
        else:
            self._hang_lifted.set()
        log.warning("simulated faults now: %s", self.faults.as_dict())
        return self.faults

    def reset_faults(self) -> Faults:
        return self.set_faults(Faults().as_dict())

    def stats(self) -> dict:
        return {
            "requests_total": self.requests_total,
            "by_route": dict(self.by_route),
            "running": self.batch.running,
            "queued": self.batch.queued,
        }

    def token_usage(self) -> float:
        pool = self.settings.max_running_requests * KV_TOKENS_PER_SLOT
        return min(1.0, self.batch.running_tokens / pool)

    def render_metrics(self) -> bytes:
        return self.metrics.render(running=self.batch.running, queued=self.batch.queued, token_usage=self.token_usage())

    # --- one request ---

    def admit(self, route: str, *, stream: bool) -> FaultAction:
        """Count a model request and decide its fault. A crash happens here, at once."""
        self.requests_total += 1
        self.by_route[route] += 1
        self._since_crash_armed += 1
        action = decide(self.faults, request_number=self._since_crash_armed, stream=stream, rng=self.rng)
        if action is FaultAction.CRASH:
            log.warning("simulated crash: model request %d reached crash_after; exiting", self._since_crash_armed)
            logging.shutdown()
            self._exit_process(CRASH_EXIT_STATUS)
        return action

    async def hang(self) -> None:
        """Wait while the hang fault is on (for ever, if nobody lifts it)."""
        while self.faults.hang:
            await self._hang_lifted.wait()

    async def run(self, prompt_tokens: int, output_tokens: int, *, record: bool = True) -> Timing:
        """A non-streamed request: queue, TTFT, then the output tokens, in slices (record: count in metrics)."""
        timing = Timing(self.clock())
        async with self.batch.slot(prompt_tokens + output_tokens):
            await _sleep(self.latency.ttft_s(prompt_tokens, self.faults.slow_factor))
            timing.first_token = self.clock()
            remaining = output_tokens - 1
            while remaining > 0:
                tpot = self.latency.tpot_s(self.batch.running, self.faults.slow_factor)
                step = min(remaining, tokens_per_slice(tpot))
                await _sleep(step * tpot)
                remaining -= step
        if record:
            self.finish(timing, prompt_tokens, output_tokens)
        return timing

    async def stream(self, prompt_tokens: int, n_pieces: int, timing: Timing) -> AsyncIterator[int]:
        """A streamed request: yields how many more pieces may be sent now (the first alone, after TTFT).

        Pieces due within the timer resolution are released together, so a zero-latency stream
        is written in two sends, not one per token.
        """
        async with self.batch.slot(prompt_tokens + n_pieces):
            await _sleep(self.latency.ttft_s(prompt_tokens, self.faults.slow_factor))
            timing.first_token = self.clock()
            if n_pieces == 0:
                return
            yield 1
            due = self.clock()
            ready = 0
            for _ in range(n_pieces - 1):
                due += self.latency.tpot_s(self.batch.running, self.faults.slow_factor)
                wait = due - self.clock()
                if wait > _MIN_STREAM_SLEEP_S:
                    if ready:
                        yield ready
                        ready = 0
                    await asyncio.sleep(wait)
                ready += 1
            if ready:
                yield ready

    def finish(self, timing: Timing, prompt_tokens: int, output_tokens: int) -> None:
        now = self.clock()
        ttft = None if timing.first_token is None else timing.first_token - timing.arrived
        self.metrics.record(
            prompt_tokens=prompt_tokens, output_tokens=output_tokens, ttft_s=ttft, e2e_s=now - timing.arrived
        )


async def _sleep(delay_s: float) -> None:
    if delay_s > 0:
        await asyncio.sleep(delay_s)
