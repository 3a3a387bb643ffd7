"""Prometheus metrics under SGLang's `sglang:` names, one registry per app instance.

Counters and histograms are updated once per finished request (never per
token); gauges (running, queued, token usage, generation throughput) are read
from the live batch when /metrics is scraped.
"""

from __future__ import annotations

import collections
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["SimMetrics", "ThroughputMeter", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
_ITL_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.02, 0.04, 0.06, 0.1, 0.25, 0.5, 1.0)


class ThroughputMeter:
    """Tokens per second over a sliding window (default 10 s), from (time, tokens) events."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._sum = 0
        self._born = clock()

    def add(self, tokens: int, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        self._events.append((now, tokens))
        self._sum += tokens
        self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = self._clock() if now is None else now
        self._trim(now)
        span = min(self.window_s, max(now - self._born, 1e-9))
        return self._sum / span

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._events and self._events[0][0] < horizon:
            self._sum -= self._events.popleft()[1]


class SimMetrics:
    """The `sglang:` metrics of one simulated server."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        self.num_running_reqs = gauge("sglang:num_running_reqs", "The number of running requests.")
        self.num_queue_reqs = gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.")
        self.token_usage = gauge("sglang:token_usage", "The token usage (share of the simulated KV pool).")
        self.gen_throughput = gauge("sglang:gen_throughput", "The generation throughput (token/s).")
        self.prompt_tokens = counter("sglang:prompt_tokens_total", "Number of prefill tokens processed.")
        self.generation_tokens = counter("sglang:generation_tokens_total", "Number of generation tokens processed.")
        self.num_requests = counter("sglang:num_requests_total", "Number of requests processed.")
        self.ttft = Histogram(
            "sglang:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.e2e = Histogram(
            "sglang:e2e_request_latency_seconds",
            "Histogram of End-to-end request latency in seconds",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.itl = Histogram(
            "sglang:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds (one mean observation per request).",
            labels,
            buckets=_ITL_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.throughput = ThroughputMeter()

    def record(self, *, prompt_tokens: int, output_tokens: int, ttft_s: float | None, e2e_s: float) -> None:
        """One finished request."""
        self.num_requests.inc()
        self.prompt_tokens.inc(prompt_tokens)
        if output_tokens:
            self.generation_tokens.inc(output_tokens)
            self.throughput.add(output_tokens)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            if output_tokens > 1:
                self.itl.observe((e2e_s - ttft_s) / (output_tokens - 1))
        self.e2e.observe(e2e_s)

    def render(self, *, running: int, queued: int, token_usage: float) -> bytes:
        self.num_running_reqs.set(running)
        self.num_queue_reqs.set(queued)
        self.token_usage.set(token_usage)
        self.gen_throughput.set(self.throughput.rate())
        return generate_latest(self.registry)
