"""Prometheus metrics under SGLang 0.5.23's `sglang:` names, labels and buckets, one registry per app.

Served on /metrics only with ``--enable-metrics``, as SGLang does (404 without).
Two families, as in SGLang's ``observability/metrics_collector.py``:

- scheduler gauges (``model_name``, ``engine_type``, ``tp_rank``, ``pp_rank``,
  ``moe_ep_rank``): running/queued requests, KV pool use, throughput; read from
  the live engine when /metrics is scraped;
- tokenizer counters and histograms (``model_name``, ``engine_type``, plus
  ``is_streaming`` where SGLang has it): updated as requests make tokens and
  finish; a labelled series appears on its first use, as in SGLang.

Inter-token latency is observed per token (a release of k tokens adds k
observations of interval/k, SGLang's own bulk trick). The sim has no prefix
cache, so ``cache_hit_rate`` is 0 and no ``cached_tokens_total`` series appears.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "HttpMetricsMiddleware", "SimMetrics", "ThroughputMeter", "observe_many"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400)
ITL_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080, 0.100,
    0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000,
)  # fmt: skip
QUEUE_BUCKETS = (
    0.0, 0.001, 0.005, 0.010, 0.050, 0.100, 0.200, 0.500, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90,
    100, 200, 300, 400, 500, 600,
)  # fmt: skip
TOKEN_BUCKETS = (
    100, 300, 500, 700, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000, 12500, 15000, 17500,
    20000, 22500, 25000, 27500, 30000, 35000, 40000, 60000, 80000, 100000, 200000, 300000, 400000, 600000,
    800000, 1000000, 1100000,
)  # fmt: skip
SCHEDULER_LABELS = ("model_name", "engine_type", "tp_rank", "pp_rank", "moe_ep_rank")
TOKENIZER_LABELS = ("model_name", "engine_type")


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


def observe_many(histogram: object, total: float, count: int) -> None:
    """`count` observations of total/count at once (SGLang's observe_inter_token_latency)."""
    if count <= 0:
        return
    value = total / count
    histogram._sum.inc(total)  # type: ignore[attr-defined]
    for i, bound in enumerate(histogram._upper_bounds):  # type: ignore[attr-defined]
        if value <= bound:
            histogram._buckets[i].inc(count)  # type: ignore[attr-defined]
            break


# The scheduler's gauges, by name after "sglang:", with SGLang's help strings, in its order.
SCHEDULER_GAUGES = (
    ("num_running_reqs", "The number of running requests."),
    ("num_queue_reqs", "The number of requests in the waiting queue."),
    ("num_grammar_queue_reqs", "The number of requests in the grammar waiting queue."),
    ("gen_throughput", "The generation throughput (token/s)."),
    ("cache_hit_rate", "The prefix cache hit rate."),
    ("decode_sum_seq_lens", "The sum of all sequence lengths in decode."),
    ("token_usage", "The token usage."),
    ("full_token_usage", "The token usage for full attention layers."),
    ("num_used_tokens", "The number of used tokens."),
    ("kv_available_tokens", "Number of free token slots in the KV cache pool."),
    ("kv_evictable_tokens", "Number of evictable (radix-cached) token slots in the KV cache pool."),
    ("kv_used_tokens", "Number of actively used token slots in the KV cache pool."),
    ("utilization", "The utilization."),
    ("num_retracted_reqs", "The number of retracted requests."),
    ("num_paused_reqs", "The number of paused requests by async weight sync."),
    ("max_total_num_tokens", "Maximum total number of tokens in the KV cache pool."),
    ("context_len", "Maximum context length."),
)
# The tokenizer's counters and histograms, in SGLang's order: (name after "sglang:", help, the buckets of a
# histogram (None: a counter), labelled by is_streaming).
TOKENIZER_METRICS = (
    ("prompt_tokens_total", "Number of prefill tokens processed.", None, True),
    ("generation_tokens_total", "Number of generation tokens processed.", None, True),
    ("num_requests_total", "Number of requests processed.", None, True),
    ("num_aborted_requests_total", "Number of requests aborted.", None, False),
    ("num_so_requests_total", "Number of structured output requests processed.", None, False),
    ("prompt_tokens_histogram", "Histogram of prompt token length.", TOKEN_BUCKETS, False),
    ("uncached_prompt_tokens_histogram", "Histogram of uncached (compute) prompt token length.", TOKEN_BUCKETS, False),
    ("generation_tokens_histogram", "Histogram of generation token length.", TOKEN_BUCKETS, False),
    ("time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS, True),
    ("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS, False),
    (
        "request_time_per_output_token_seconds",
        "Per-request TPOT in seconds: (finished_time - first_token_time) / (completion_tokens - 1).",
        ITL_BUCKETS,
        True,
    ),
    ("e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds", E2E_BUCKETS, True),
)


class SimMetrics:
    """The `sglang:` metrics of one simulated server."""

    def __init__(self, model_name: str, *, max_total_num_tokens: int, context_len: int) -> None:
        self.registry = r = CollectorRegistry(auto_describe=False)
        sched = {"model_name": model_name, "engine_type": "unified", "tp_rank": "0", "pp_rank": "0", "moe_ep_rank": "0"}
        self._tok = {"model_name": model_name, "engine_type": "unified"}
        self._gauges = {
            name: Gauge(f"sglang:{name}", doc, SCHEDULER_LABELS, registry=r).labels(**sched)
            for name, doc in SCHEDULER_GAUGES
        }
        self._gauges["max_total_num_tokens"].set(max_total_num_tokens)
        self._gauges["context_len"].set(context_len)
        self.max_total_num_tokens = max_total_num_tokens
        self.queue_time = Histogram(
            "sglang:queue_time_seconds", "Histogram of queueing time in seconds.", SCHEDULER_LABELS,
            buckets=QUEUE_BUCKETS, registry=r,
        ).labels(**sched)  # fmt: skip
        self._tokenizer: dict[str, Any] = {}
        for name, doc, buckets, streaming in TOKENIZER_METRICS:
            labels = (*TOKENIZER_LABELS, "is_streaming") if streaming else TOKENIZER_LABELS
            self._tokenizer[name] = (
                Counter(f"sglang:{name}", doc, labels, registry=r)
                if buckets is None
                else Histogram(f"sglang:{name}", doc, labels, buckets=buckets, registry=r)
            )
        self.throughput = ThroughputMeter()
        self._children: dict[tuple[str, bool | None], Any] = {}
        # observability/http_request_metrics.py
        self.http_requests = Counter(
            "sglang:http_requests_total", "Total number of HTTP requests by endpoint and method",
            ("endpoint", "method"), registry=r,
        )  # fmt: skip
        self.http_responses = Counter(
            "sglang:http_responses_total", "Total number of HTTP responses by endpoint and status code",
            ("endpoint", "status_code", "method"), registry=r,
        )  # fmt: skip
        self.http_active = Gauge(
            "sglang:http_requests_active", "Number of currently active HTTP requests", ("endpoint", "method"),
            registry=r,
        )  # fmt: skip

    def _s(self, streaming: bool) -> dict[str, str]:
        return {**self._tok, "is_streaming": "true" if streaming else "false"}

    def _child(self, name: str, streaming: bool | None = None) -> Any:
        """The series of tokenizer metric ``name`` (labelled by is_streaming unless None), looked up once
        (labels() is not free on the hot path)."""
        key = (name, streaming)
        child = self._children.get(key)
        if child is None:
            labels = self._tok if streaming is None else self._s(streaming)
            child = self._children[key] = self._tokenizer[name].labels(**labels)
        return child

    def first_token(self, ttft_s: float, *, streaming: bool, queue_s: float) -> None:
        self._child("time_to_first_token_seconds", streaming).observe(ttft_s)
        self.queue_time.observe(queue_s)

    def tokens(self, count: int, interval_s: float, *, first: bool = False) -> None:
        """`count` tokens made over `interval_s` (the first token's is TTFT, not inter-token)."""
        self.throughput.add(count)
        itl_count = count - 1 if first else count
        if itl_count > 0:
            observe_many(self._child("inter_token_latency_seconds"), interval_s, itl_count)

    def finished(
        self,
        *,
        prompt_tokens: int,
        output_tokens: int,
        e2e_s: float,
        tpot_s: float | None,
        streaming: bool,
        structured: bool = False,
    ) -> None:
        """One finished request."""
        child = self._child
        child("num_requests_total", streaming).inc()
        child("prompt_tokens_total", streaming).inc(prompt_tokens)
        child("generation_tokens_total", streaming).inc(output_tokens)
        child("e2e_request_latency_seconds", streaming).observe(e2e_s)
        if tpot_s is not None:
            child("request_time_per_output_token_seconds", streaming).observe(tpot_s)
        child("prompt_tokens_histogram").observe(prompt_tokens)
        child("uncached_prompt_tokens_histogram").observe(prompt_tokens)  # no prefix cache: every token is computed
        child("generation_tokens_histogram").observe(output_tokens)
        if structured:
            child("num_so_requests_total").inc()

    def aborted(self) -> None:
        self._child("num_aborted_requests_total").inc()

    def render(self, *, running: int, queued: int, used_tokens: int) -> bytes:
        usage = min(1.0, used_tokens / self.max_total_num_tokens) if self.max_total_num_tokens else 0.0
        now = {
            "num_running_reqs": running,
            "num_queue_reqs": queued,
            "token_usage": usage,
            "full_token_usage": usage,
            "num_used_tokens": used_tokens,
            "kv_used_tokens": used_tokens,
            "kv_available_tokens": max(0, self.max_total_num_tokens - used_tokens),
            "decode_sum_seq_lens": used_tokens,
            "utilization": 1.0 if running else 0.0,
            "gen_throughput": self.throughput.rate(),
        }
        for name, value in now.items():
            self._gauges[name].set(value)
        return generate_latest(self.registry)


class HttpMetricsMiddleware:
    """SGLang's HTTP request metrics (with --enable-metrics): requests, responses by status, active.

    The endpoint label is the route's path template (the request's path for an unknown route),
    as SGLang's _get_fastapi_request_path gives it.
    """

    _MAX_PATHS = 4096

    def __init__(self, app: Callable, metrics: SimMetrics, routes: Callable[[], list]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self._endpoints: dict[tuple[str, str], str] = {}
        self._series: dict[tuple[str, str], tuple[Any, Any]] = {}

    def _endpoint(self, scope: dict) -> str:
        key = (scope["path"], scope["method"])
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            from starlette.routing import Match

            endpoint = scope["path"]
            for route in self.routes():
                match, _ = route.matches(scope)
                if match == Match.FULL:
                    endpoint = getattr(route, "path", endpoint)
                    break
            if len(self._endpoints) < self._MAX_PATHS:
                self._endpoints[key] = endpoint
        return endpoint

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = self.metrics
        endpoint, method = self._endpoint(scope), scope["method"]
        series = self._series.get((endpoint, method))
        if series is None:
            series = (m.http_requests.labels(endpoint, method), m.http_active.labels(endpoint, method))
            if len(self._series) < self._MAX_PATHS:
                self._series[(endpoint, method)] = series
        requests, active = series
        requests.inc()
        active.inc()

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                m.http_responses.labels(endpoint, str(message["status"]), method).inc()
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            active.dec()
