"""The simulated engine's live state: status, faults, the KV pool and running batch, metrics, the sleeping.

One `SimEngine` per app. The HTTP layer asks it to admit a request (which
draws the fault), then to run the request through the batch, sleeping for the
latency model's TTFT and per-token times. With zero latency nothing sleeps, so
the per-request cost is only bookkeeping.

The KV pool is simulated the way SGLang sizes its own (``resolve_max_num_reqs``):
``max_total_num_tokens`` is ``--max-total-tokens`` if given, else what a
simulated 80 GiB GPU per tensor-parallel rank holds at ``--mem-fraction-static``
(default 0.88) after the weights (2 bytes per parameter, the parameter count
read from the model path such as "llama-8b", else 8 B) at 128 KiB of KV per
token (Llama 3 8B's: 32 layers x 8 KV heads x 128 x K and V x 2 bytes). The
default ``max_running_requests`` is then SGLang's: ``max_total_num_tokens /
context_length x 512``, clamped to 2048..4096, and at most half the pool.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import random
import re
import time
from collections.abc import AsyncIterator, Callable

from model_server.sim.faults import Faults, ReplyFault, decide
from model_server.sim.latency import LatencyModel, RunningBatch, tokens_per_slice
from model_server.sim.metrics import SimMetrics
from model_server.sim.settings import SimSettings

__all__ = ["CRASH_EXIT_STATUS", "SimEngine", "Timing", "kv_pool"]

log = logging.getLogger(__name__)

CRASH_EXIT_STATUS = 1
GPU_GIB = 80.0
DEFAULT_MEM_FRACTION = 0.88
KV_BYTES_PER_TOKEN = 128 * 1024
DEFAULT_PARAMS_B = 8.0
WARMUP_TOKENS = 8  # SGLang's warm-up request: max_new_tokens 8
_MIN_STREAM_SLEEP_S = 0.001  # shorter waits are carried over to the next token (timer resolution)
_PARAMS = re.compile(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])")


def kv_pool(settings: SimSettings) -> tuple[int, int]:
    """(max_total_num_tokens, max_running_requests) of the simulated GPU (see the module docstring)."""
    if settings.max_total_tokens:
        total = settings.max_total_tokens
    else:
        match = _PARAMS.search(settings.model_path)
        params_b = float(match.group(1)) if match else DEFAULT_PARAMS_B
        fraction = settings.mem_fraction_static or DEFAULT_MEM_FRACTION
        free_gib = GPU_GIB * settings.tp_size * fraction - 2 * params_b
        total = max(int(free_gib * (1 << 30) / KV_BYTES_PER_TOKEN), 1024)
    estimated = max(min(int(total / settings.effective_context_length * 512), 4096), 2048)
    requested = settings.max_running_requests
    running = min(requested if requested else estimated, max(total // 2, 1))
    return total, running


class Timing:
    """When a request arrived, started running, made its first and latest tokens (monotonic seconds)."""

    __slots__ = ("arrived", "first_token", "last_token", "streaming", "structured")

    def __init__(self, arrived: float, *, streaming: bool = False, structured: bool = False) -> None:
        self.arrived = arrived
        self.first_token: float | None = None
        self.last_token = arrived
        self.streaming = streaming
        self.structured = structured


class SimEngine:
    def __init__(
        self,
        settings: SimSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        exit_process: Callable[[int], None] = os._exit,
        warming_up: bool = False,
    ) -> None:
        self.settings = settings
        self.latency = LatencyModel.from_settings(settings)
        self.faults = Faults.from_settings(settings)
        self.rng = random.Random(settings.seed)
        self.max_total_num_tokens, self.max_running_requests = kv_pool(settings)
        self.metrics = (
            SimMetrics(
                settings.model_name,
                max_total_num_tokens=self.max_total_num_tokens,
                context_len=settings.effective_context_length,
            )
            if settings.enable_metrics
            else None
        )
        self.batch = RunningBatch(self.max_running_requests)
        self.clock = clock
        self._exit_process = exit_process
        self.started_at = clock()
        self.startup_time = time.time()
        self.starting = warming_up  # SGLang's ServerStatus.Starting: /health* answer 503
        self.requests_total = 0
        self.by_route: collections.Counter[str] = collections.Counter()
        self._since_crash_armed = 0
        self._faults_changed = asyncio.Event()

    # --- state ---

    async def warm_up(self) -> None:
        """SGLang's warm-up: one short request through the engine, then the server is up."""
        await self.run(1, WARMUP_TOKENS, record=False)
        self.starting = False
        log.info("The server is fired up and ready to roll!")  # SGLang's own line

    def set_faults(self, changes: dict) -> Faults:
        """Apply a /sim/faults change (FaultError on bad input). Setting crash_after re-arms its count."""
        self.faults = self.faults.updated(changes)
        if "crash_after" in changes:
            self._since_crash_armed = 0
        changed, self._faults_changed = self._faults_changed, asyncio.Event()
        changed.set()  # wakes every request waiting on a fault
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
        return min(1.0, self.batch.running_tokens / self.max_total_num_tokens)

    def render_metrics(self) -> bytes:
        assert self.metrics is not None
        return self.metrics.render(
            running=self.batch.running, queued=self.batch.queued, used_tokens=self.batch.running_tokens
        )

    # --- one request ---

    def admit(self, route: str, *, stream: bool) -> ReplyFault:
        """Count a model request and decide its fault. A crash happens here, at once."""
        self.requests_total += 1
        self.by_route[route] += 1
        self._since_crash_armed += 1
        fault = decide(self.faults, request_number=self._since_crash_armed, stream=stream, rng=self.rng)
        if fault is ReplyFault.CRASH:
            self.crash(f"model request {self._since_crash_armed} reached crash_after")
        return fault

    def crash(self, why: str) -> None:
        """The crash faults: log why, then exit the process at once (os._exit: no cleanup, like a real crash)."""
        log.warning("simulated crash: %s; exiting", why)
        logging.shutdown()
        self._exit_process(CRASH_EXIT_STATUS)

    async def wait_while(self, condition: Callable[[Faults], bool]) -> None:
        """Wait while `condition(faults)` holds (for ever, if nobody changes the faults)."""
        while condition(self.faults):
            await self._faults_changed.wait()

    async def hang(self) -> None:
        """Wait while the hang fault is on."""
        await self.wait_while(lambda f: f.hang)

    async def hold_unstreamed(self, output_tokens: int) -> None:
        """A non-streamed request under a token fault: the engine never makes its first
        token (hang_before_first_token) or stops after stall_after_tokens (a reply that
        needs more never comes). Waits while that holds."""

        def held(f: Faults) -> bool:
            stalled = f.stall_after_tokens is not None and output_tokens > f.stall_after_tokens
            return stalled or (f.hang_before_first_token and output_tokens > 0)

        await self.wait_while(held)

    def _first_token(self, timing: Timing, started: float, metrics: SimMetrics | None) -> None:
        now = self.clock()
        timing.first_token = timing.last_token = now
        if metrics is not None:
            metrics.first_token(now - timing.arrived, streaming=timing.streaming, queue_s=started - timing.arrived)
            metrics.tokens(1, 0.0, first=True)

    def _made(self, timing: Timing, count: int, metrics: SimMetrics | None) -> None:
        now = self.clock()
        if metrics is not None:
            metrics.tokens(count, now - timing.last_token)
        timing.last_token = now

    async def run(
        self, prompt_tokens: int, output_tokens: int, *, record: bool = True, timing: Timing | None = None
    ) -> Timing:
        """A non-streamed request: queue, TTFT, then the output tokens, in slices (record: count in metrics)."""
        timing = timing or Timing(self.clock())
        metrics = self.metrics if record else None
        async with self.batch.slot(prompt_tokens + output_tokens):
            started = self.clock()
            await _sleep(self.latency.ttft_s(prompt_tokens, self.faults.slow_factor))
            self._first_token(timing, started, metrics)
            remaining = output_tokens - 1
            while remaining > 0:
                tpot = self.latency.tpot_s(self.batch.running, self.faults.slow_factor)
                step = min(remaining, tokens_per_slice(tpot))
                await _sleep(step * tpot)
                self._made(timing, step, metrics)
                remaining -= step
        if record:
            self.finish(timing, prompt_tokens, output_tokens)
        return timing

    async def stream(self, prompt_tokens: int, n_pieces: int, timing: Timing) -> AsyncIterator[int]:
        """A streamed request: yields how many more pieces may be sent now (the first alone, after TTFT).

        Pieces due within the timer resolution are released together, so a zero-latency stream
        is written in two sends, not one per token. A stream cancelled (its client went away)
        counts as aborted.
        """
        try:
            async with self.batch.slot(prompt_tokens + n_pieces):
                started = self.clock()
                await _sleep(self.latency.ttft_s(prompt_tokens, self.faults.slow_factor))
                self._first_token(timing, started, self.metrics)
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
                            self._made(timing, ready, self.metrics)
                            yield ready
                            ready = 0
                        await asyncio.sleep(wait)
                    ready += 1
                if ready:
                    self._made(timing, ready, self.metrics)
                    yield ready
        except (asyncio.CancelledError, GeneratorExit):
            if self.metrics is not None:
                self.metrics.aborted()
            raise

    def finish(self, timing: Timing, prompt_tokens: int, output_tokens: int, *, streaming: bool = False) -> None:
        if self.metrics is None:
            return
        now = self.clock()
        tpot = None
        if timing.first_token is not None and output_tokens > 1:
            tpot = (now - timing.first_token) / (output_tokens - 1)
        self.metrics.finished(
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            e2e_s=now - timing.arrived,
            tpot_s=tpot if tpot is None or math.isfinite(tpot) else None,
            streaming=streaming or timing.streaming,
            structured=timing.structured,
        )


async def _sleep(delay_s: float) -> None:
    if delay_s > 0:
        await asyncio.sleep(delay_s)
