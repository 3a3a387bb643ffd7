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
attempts). Read from the replicas' state at each scrape:
``model_server_client_breaker_state`` (also labelled ``state``: 1 for the
breaker's state now, 0 for the others) and
``model_server_client_smoothed_latency_seconds`` (the latency routing
compares: per output token for chat groups). A registry takes these names
once: give each ModelServer its own registry, or share one ModelServer.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from model_server.client.breaker import BreakerState

__all__ = ["ClientMetrics"]

_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_LABELS = ("group", "replica")
# The counters: name after "model_server_client_" (exposed with "_total"), help, labels after _LABELS.
_COUNTERS = (
    ("requests", "Attempts sent to a replica", ()),
    ("failures", "Attempts that failed, by kind", ("kind",)),
    ("failovers", "Requests that left this replica for another", ()),
    ("resumes", "Streams broken on this replica and resumed on another", ()),
    ("stalls", "Deadlines that fired on this replica, by phase", ("phase",)),
)


class ClientMetrics:
    """Counters and a histogram on ``registry``; every method is a no-op when it is None."""

    def __init__(self, registry: Any = None) -> None:
        self.enabled = registry is not None
        self._registry = registry
        if not self.enabled:
            return
        from prometheus_client import Counter, Histogram

        self._counters = {
            name: Counter(f"model_server_client_{name}", doc, (*_LABELS, *more), registry=registry)
            for name, doc, more in _COUNTERS
        }
        self._latency = Histogram(
            "model_server_client_latency_seconds",
            "Latency of answered attempts",
            _LABELS,
            buckets=_BUCKETS_S,
            registry=registry,
        )

    def watch(self, replicas: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        """Export each replica's breaker state and smoothed latency, read from ``replicas()`` (group -> name ->
        :class:`~model_server.client.replica.EndpointSnapshot`) at each scrape."""
        if self.enabled:  # held weakly: the registry outlives a client, and must not keep it (and its state) alive
            ref = weakref.WeakMethod(replicas) if inspect.ismethod(replicas) else (lambda: replicas)
            self._registry.register(_ReplicaGauges(ref))

    def _count(self, counter: str, *labels: str) -> None:
        if self.enabled:
            self._counters[counter].labels(*labels).inc()

    def attempt(self, group: str, replica: str) -> None:
        self._count("requests", group, replica)

    def failure(self, group: str, replica: str, kind: str) -> None:
        self._count("failures", group, replica, kind)

    def failover(self, group: str, replica: str) -> None:
        self._count("failovers", group, replica)

    def resume(self, group: str, replica: str) -> None:
        self._count("resumes", group, replica)

    def stall(self, group: str, replica: str, phase: str) -> None:
        self._count("stalls", group, replica, phase)

    def latency(self, group: str, replica: str, seconds: float) -> None:
        if self.enabled:
            self._latency.labels(group, replica).observe(seconds)


class _ReplicaGauges:
    """A collector: the replicas' state as it is when Prometheus scrapes (nothing to keep up to date)."""

    def __init__(self, replicas: Callable[[], Callable[[], Mapping[str, Mapping[str, Any]]] | None]) -> None:
        self._replicas = replicas  # a weak reference: None once the client is gone

    def describe(self) -> list:
        return []  # the names are checked at the first collect, not at register time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        breaker = GaugeMetricFamily(
            "model_server_client_breaker_state", "1 for the replica's breaker state now", labels=[*_LABELS, "state"]
        )
        latency = GaugeMetricFamily(
            "model_server_client_smoothed_latency_seconds",
            "The latency routing compares (per output token for chat groups)",
            labels=list(_LABELS),
        )
        read = self._replicas()
        for group, replicas in (read() if read is not None else {}).items():
            for name, snap in replicas.items():
                for state in BreakerState:
                    breaker.add_metric([group, name, state.value], 1.0 if snap.breaker is state else 0.0)
                if snap.latency_s is not None:
                    latency.add_metric([group, name], snap.latency_s)
        yield breaker
        yield latency
