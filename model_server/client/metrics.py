"""Optional Prometheus metrics of the client, per group and replica.

Off by default: ``ModelServer(metrics_registry=None)`` records nothing and
touches no global registry, so any number of ModelServers can live in one
process. To export them, pass a registry (``prometheus_client.REGISTRY`` for
the default one that ``start_http_server`` serves, or your own
``CollectorRegistry``)::

    from prometheus_client import REGISTRY, start_http_server
    server = ModelServer(metrics_registry=REGISTRY)
    start_http_server(9400)

Names (labels ``group``, ``replica``): ``model_server_client_requests_total``
(attempts sent), ``model_server_client_failures_total`` (also labelled
``kind``: connection, timeout, server, malformed),
``model_server_client_failovers_total`` (a request left this replica for
another), ``model_server_client_resumes_total`` (a stream broken on this
replica was continued on another), ``model_server_client_stalls_total``
(also labelled ``phase``: an attempt's first-token or stall deadline fired
here) and ``model_server_client_latency_seconds`` (histogram of answered
attempts). A registry takes these names once: give each ModelServer its own
registry, or share one ModelServer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ClientMetrics"]

_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ClientMetrics:
    """Counters and a histogram on ``registry``; every method is a no-op when it is None."""

    def __init__(self, registry: Any = None) -> None:
        self.enabled = registry is not None
        if not self.enabled:
            return
        from prometheus_client import Counter, Histogram

        labels = ("group", "replica")
        self._requests = Counter(
            "model_server_client_requests", "Attempts sent to a replica", labels, registry=registry
        )
        self._failures = Counter(
            "model_server_client_failures", "Attempts that failed, by kind", (*labels, "kind"), registry=registry
        )
        self._failovers = Counter(
            "model_server_client_failovers", "Requests that left this replica for another", labels, registry=registry
        )
        self._resumes = Counter(
            "model_server_client_resumes",
            "Streams broken on this replica and resumed on another",
            labels,
            registry=registry,
        )
        self._stalls = Counter(
            "model_server_client_stalls",
            "Deadlines that fired on this replica, by phase",
            (*labels, "phase"),
            registry=registry,
        )
        self._latency = Histogram(
            "model_server_client_latency_seconds",
            "Latency of answered attempts",
            labels,
            buckets=_BUCKETS_S,
            registry=registry,
        )

    def attempt(self, group: str, replica: str) -> None:
        if self.enabled:
            self._requests.labels(group, replica).inc()

    def failure(self, group: str, replica: str, kind: str) -> None:
        if self.enabled:
            self._failures.labels(group, replica, kind).inc()

    def failover(self, group: str, replica: str) -> None:
        if self.enabled:
            self._failovers.labels(group, replica).inc()

    def resume(self, group: str, replica: str) -> None:
        if self.enabled:
            self._resumes.labels(group, replica).inc()

    def stall(self, group: str, replica: str, phase: str) -> None:
        if self.enabled:
            self._stalls.labels(group, replica, phase).inc()

    def latency(self, group: str, replica: str, seconds: float) -> None:
        if self.enabled:
            self._latency.labels(group, replica).observe(seconds)
