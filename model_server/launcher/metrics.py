"""The pipeline's own Prometheus metrics, in a registry of its own, served by the control API's ``GET /metrics``.

Per server: its state (one series per state, 1 for the current one), restarts,
time from spawn to READY and health-probe latency; per GPU: memory used and
total, read through the same inventory the supervisors use; and the
pipeline's uptime. States, restarts and GPUs are read when scraped, so they
are never stale; the two histograms are fed as things happen.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from model_server.errors import LaunchError
from model_server.launcher.events_file import Transition
from model_server.launcher.gpu_memory import GpuReading
from model_server.launcher.lifecycle import ServerState
from model_server.launcher.status_file import ServerStatus

__all__ = ["MIB_BYTES", "PipelineMetrics"]

log = logging.getLogger(__name__)
MIB_BYTES = 1 << 20
TIME_TO_READY_BUCKETS_S = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
PROBE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 25)


class PipelineMetrics:
    """``servers()`` and ``read_gpus()`` are read at each scrape; ``clock`` is monotonic (uptime, time to READY)."""

    def __init__(
        self,
        servers: Callable[[], Sequence[ServerStatus]],
        read_gpus: Callable[[], Sequence[GpuReading]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._started_s = clock()
        self._spawned_s: dict[str, float] = {}
        self._lock = threading.Lock()
        self.time_to_ready = Histogram(
            "model_server_time_to_ready_seconds", "From the engine's spawn to its first 200 on /health_generate.",
            ["server"], buckets=TIME_TO_READY_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self.probe_latency = Histogram(
            "model_server_health_probe_seconds", "How long a health probe of a READY engine took, by outcome.",
            ["server", "outcome"], buckets=PROBE_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self.registry.register(_Snapshot(servers, read_gpus, lambda: clock() - self._started_s))

    def on_transition(self, event: Transition) -> None:
        """Time to READY: from the last STARTING to the READY that follows it."""
        now = self._clock()
        with self._lock:
            if event.new == ServerState.STARTING.value:
                self._spawned_s[event.server] = now
            elif event.new == ServerState.READY.value and event.server in self._spawned_s:
                self.time_to_ready.labels(event.server).observe(now - self._spawned_s.pop(event.server))

    def observe_probe(self, server: str, seconds: float, ok: bool) -> None:
        self.probe_latency.labels(server, "ok" if ok else "failed").observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Snapshot(Collector):
    """The gauges read at scrape time."""

    def __init__(
        self,
        servers: Callable[[], Sequence[ServerStatus]],
        read_gpus: Callable[[], Sequence[GpuReading]],
        uptime_s: Callable[[], float],
    ) -> None:
        self._servers, self._read_gpus, self._uptime_s = servers, read_gpus, uptime_s

    def describe(self) -> list:
        return []  # known only at a scrape: nothing to check at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = GaugeMetricFamily(
            "model_server_server_state", "1 for the state the server is in.", labels=["server", "state"]
        )
        restarts = GaugeMetricFamily(
            "model_server_server_restarts", "Restarts after a crash or hang.", labels=["server"]
        )
        for s in self._servers():
            for candidate in ServerState:
                state.add_metric([s.name, candidate.value], 1.0 if s.state == candidate.value else 0.0)
            restarts.add_metric([s.name], s.restarts)
        yield state
        yield restarts
        used = GaugeMetricFamily("model_server_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily("model_server_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu"])
        try:
            readings = list(self._read_gpus())
        except LaunchError as err:  # a scrape must not fail for want of NVML
            log.warning("metrics: cannot read the GPUs: %s", err)
            readings = []
        for r in readings:
            used.add_metric([str(r.index)], r.used_mib * MIB_BYTES)
            total.add_metric([str(r.index)], r.total_mib * MIB_BYTES)
        yield used
        yield total
        yield GaugeMetricFamily(
            "model_server_pipeline_uptime_seconds", "Since the pipeline started.", value=self._uptime_s()
        )
