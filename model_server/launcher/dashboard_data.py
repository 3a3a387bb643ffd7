"""What the fleet dashboard shows, made from what was read (no I/O): the page's JSON, and where a write goes.

:mod:`model_server.launcher.dashboard` does the reading (this host's servers
from its :class:`~model_server.launcher.fleet_control.FleetControl`, other
hosts' control APIs, each engine's and each client's ``/metrics``) and hands
the answers here:

- :func:`engine_load`: an engine's live load from SGLang's Prometheus text
  (running and queued requests, KV token usage, generation throughput, prefix
  cache hit rate);
- :func:`client_replicas`: what one client (a ``ModelServer`` with
  ``metrics_registry``) has seen of each replica: attempts, failures,
  failovers, resumes, stalls, mean latency, and its breaker state and smoothed
  latency when it exports them;
- :func:`host_view`, :func:`fleet_page`: the page's JSON, host by host, group
  by group, with the recent transitions of every host merged, newest first;
- :func:`write_target`: whether a write from the page is this pipeline's to
  do or goes to another host's control API, and at which path.

The page's JSON never holds the control key: nothing here ever sees it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from model_server.common.control_status import Recorded

__all__ = [
    "ENGINE_METRICS",
    "NOT_RUN",
    "SERVER_VERBS",
    "UNKNOWN",
    "ClientReplica",
    "EngineLoad",
    "HostStatus",
    "WriteTarget",
    "client_replicas",
    "engine_load",
    "fleet_page",
    "host_view",
    "merge_events",
    "server_row",
    "write_target",
]

UNKNOWN = "UNKNOWN"  # a server whose host's control API did not answer, or does not list it
NOT_RUN = "the pipeline on its host does not run it (started with --only?)"
SERVER_VERBS = ("drain", "undrain", "restart", "stop", "start")
# EngineLoad field -> the SGLang gauge it is read from (summed over its series; token_usage: the highest).
ENGINE_METRICS = {
    "running": "sglang:num_running_reqs",
    "queued": "sglang:num_queue_reqs",
    "token_usage": "sglang:token_usage",
    "gen_throughput": "sglang:gen_throughput",
    "cache_hit_rate": "sglang:cache_hit_rate",
}
_CLIENT = "model_server_client_"
_CLIENT_COUNTERS = ("requests", "failures", "failovers", "resumes", "stalls")


@dataclass(frozen=True)
class EngineLoad:
    """An engine's load now; None where its ``/metrics`` has no such gauge."""

    running: float | None = None
    queued: float | None = None
    token_usage: float | None = None  # 0..1 of the KV cache pool
    gen_throughput: float | None = None  # generated tokens per second
    cache_hit_rate: float | None = None  # 0..1


@dataclass(frozen=True)
class ClientReplica:
    """One client's view of one replica (a group's server), from that client's Prometheus text."""

    group: str
    replica: str
    requests: float = 0.0
    failures: float = 0.0
    failovers: float = 0.0
    resumes: float = 0.0
    stalls: float = 0.0
    mean_latency_s: float | None = None  # of answered attempts, since the client started
    breaker: str | None = None  # when the client exports model_server_client_breaker_state
    smoothed_latency_s: float | None = None  # when it exports model_server_client_smoothed_latency_seconds


@dataclass(frozen=True)
class WriteTarget:
    """Where a write asked from the page goes: ``host`` None is this pipeline; else that host's control API."""

    path: str  # the control API route: /servers/<name>/<verb> or /groups/<group>/rollout
    host: str | None = None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def engine_load(text: str) -> EngineLoad | None:
    """The load in an engine's Prometheus text; None if it has none of SGLang's gauges. ValueError: not Prometheus."""
    wanted = {metric: field for field, metric in ENGINE_METRICS.items()}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        field = wanted.get(family.name)
        if field is None or not family.samples:
            continue
        values = [s.value for s in family.samples]
        found[field] = max(values) if field == "token_usage" else sum(values)
    if not found:
        return None
    return EngineLoad(**{k: _finite(v) for k, v in found.items()})


def client_replicas(text: str) -> tuple[ClientReplica, ...]:
    """Every (group, replica) in a client's Prometheus text, sorted. ValueError: not Prometheus text."""
    counts: dict[tuple[str, str], dict[str, float]] = {}
    latency: dict[tuple[str, str], list[float]] = {}  # [sum, count]
    breaker: dict[tuple[str, str], str] = {}
    smoothed: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(_CLIENT):
            continue
        what = family.name[len(_CLIENT) :]
        for s in family.samples:
            key = (s.labels.get("group"), s.labels.get("replica"))
            if key[0] is None or key[1] is None:
                continue
            ident = (str(key[0]), str(key[1]))
            if what in _CLIENT_COUNTERS and s.name.endswith("_total"):
                row = counts.setdefault(ident, {})
                row[what] = row.get(what, 0.0) + s.value
            elif what == "latency_seconds" and s.name.endswith(("_sum", "_count")):
                pair = latency.setdefault(ident, [0.0, 0.0])
                pair[0 if s.name.endswith("_sum") else 1] += s.value
            elif what == "breaker_state" and s.value == 1 and "state" in s.labels:
                breaker[ident] = s.labels["state"]
            elif what == "smoothed_latency_seconds":
                smoothed[ident] = s.value
    out = []
    for ident in sorted(set(counts) | set(latency) | set(breaker) | set(smoothed)):
        total, n = latency.get(ident, (0.0, 0.0))
        out.append(
            ClientReplica(
                *ident,
                **counts.get(ident, {}),
                mean_latency_s=total / n if n else None,
                breaker=breaker.get(ident),
                smoothed_latency_s=_finite(smoothed[ident]) if ident in smoothed else None,
            )  # fmt: skip
        )
    return tuple(out)


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _gpus(raw: Any) -> list[dict[str, Any]]:
    out = []
    for g in raw if isinstance(raw, list) else ():
        if isinstance(g, dict) and isinstance(g.get("index"), int):
            out.append({"index": g["index"], "used_mib": _number(g.get("used_mib")),
                        "total_mib": _number(g.get("total_mib"))})  # fmt: skip
    return out


@dataclass(frozen=True)
class HostStatus:
    """What one host's pipeline said: its ``/status`` JSON and its servers parsed from it, its recent events;
    or (``status`` None) why it said nothing."""

    status: Mapping[str, Any] | None = None
    recorded: Mapping[str, Recorded] = field(default_factory=dict)
    problem: str = ""
    events: Sequence[Mapping[str, Any]] = ()


def server_row(
    spec: Mapping[str, Any],
    recorded: Recorded,
    now: float,
    gpus: Any = None,
    load: EngineLoad | None = None,
    load_problem: str = "",
) -> dict[str, Any]:
    """One server's row: where it is (``spec``), what its pipeline says of it, its time in that state, its GPUs
    (the control API's raw list) and its engine's load."""
    since = _number(recorded.since)
    return {
        "name": str(spec.get("name")),
        "group": str(spec.get("group", "")),
        "host": str(spec.get("host", "")),
        "port": spec.get("port") if isinstance(spec.get("port"), int) else None,
        "state": recorded.state,
        "pid": recorded.pid,
        "restarts": recorded.restarts,
        "since": since,
        "in_state_s": max(0.0, now - since) if since else None,
        "last_error": recorded.last_error,
        "gpus": _gpus(gpus),
        "load": asdict(load) if load is not None else None,
        "load_problem": load_problem,
    }


def _entries(status: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    """The raw server entries of a ``/status`` by name: for their GPUs, and where a server the table lacks is."""
    listed = status.get("servers") if status is not None else None
    return {
        s["name"]: s for s in (listed if isinstance(listed, list) else ())
        if isinstance(s, dict) and isinstance(s.get("name"), str)
    }  # fmt: skip


def host_view(
    host: str,
    specs: Sequence[Mapping[str, Any]],
    answer: HostStatus,
    here: bool,
    loads: Mapping[str, tuple[EngineLoad | None, str]],
    now: float,
) -> dict[str, Any]:
    """One host of the page: its groups and their servers, in table order.

    ``specs``: the table's servers of this host ({name, group, host, port});
    ``answer``: what its pipeline said (each server UNKNOWN when it said
    nothing, and ``answer.problem`` says why); ``loads``: each server's
    engine load (or why there is none).
    """
    status = answer.status
    raw = _entries(status)
    table = {str(s["name"]): s for s in specs}
    names = list(table) + [n for n in answer.recorded if n not in table]
    # its host did not answer, or its pipeline does not run it (started with --only, say)
    missing = Recorded(UNKNOWN, last_error="" if status is None else NOT_RUN)
    groups: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        load, why = loads.get(name, (None, ""))
        entry = raw.get(name, {})
        row = server_row(table.get(name, entry), answer.recorded.get(name, missing), now, entry.get("gpus"), load, why)
        groups.setdefault(row["group"], []).append(row)
    rollouts = status.get("rollouts") if status is not None and isinstance(status.get("rollouts"), dict) else {}
    started = _number(status.get("started")) if status is not None else None
    return {
        "host": host,
        "here": here,
        "reachable": status is not None,
        "problem": answer.problem,
        "started": started,
        "uptime_s": max(0.0, now - started) if started else None,
        "gpu_error": status.get("gpu_error", "") if status is not None else "",
        "groups": [
            {"group": g, "servers": rows, "rollout": rollouts.get(g) if isinstance(rollouts.get(g), dict) else None}
            for g, rows in groups.items()
        ],
    }


def merge_events(per_host: Mapping[str, Iterable[Mapping[str, Any]]], limit: int) -> list[dict[str, Any]]:
    """Every host's recent transitions, each tagged with its host, newest first, at most ``limit``."""
    merged = []
    for host, events in per_host.items():
        for e in events:
            if isinstance(e, dict) and _number(e.get("time")) is not None:
                merged.append({"host": host, "time": e["time"], "server": str(e.get("server", "")),
                               "from": str(e.get("from", "")), "to": str(e.get("to", "")),
                               "reason": str(e.get("reason", ""))})  # fmt: skip
    merged.sort(key=lambda e: e["time"], reverse=True)
    return merged[:limit]


def fleet_page(
    table: str,
    hosts: Sequence[dict[str, Any]],
    events: Sequence[dict[str, Any]],
    clients: Sequence[dict[str, Any]],
    now: float,
    writable: bool,
) -> dict[str, Any]:
    """``GET /fleet``: everything the page draws. ``writable``: this pipeline has a control key (actions possible)."""
    counts: dict[str, int] = {}
    for h in hosts:
        for g in h["groups"]:
            for s in g["servers"]:
                counts[s["state"]] = counts.get(s["state"], 0) + 1
    return {
        "table": table,
        "now": now,
        "writable": writable,
        "states": dict(sorted(counts.items())),
        "hosts": list(hosts),
        "events": list(events),
        "clients": list(clients),
    }


def write_target(
    kind: str, name: str, verb: str, here: Iterable[str], hosts: Mapping[str, Sequence[str]], host: str | None = None
) -> WriteTarget | tuple[int, str]:
    """Where the page's write goes, or (status, why not).

    ``kind``: "server" (``name`` a server, ``verb`` one of SERVER_VERBS) or
    "group" (``name`` a group, ``verb`` "rollout", on ``host``: default this
    one); ``here``: this pipeline's servers; ``hosts``: each host of the table
    and its servers.
    """
    mine = set(here)
    if kind == "server":
        if verb not in SERVER_VERBS:
            return 404, f"no action {verb!r} for a server: give one of {', '.join(SERVER_VERBS)}"
        path = f"/servers/{name}/{verb}"
        if name in mine:
            return WriteTarget(path)
        owner = next((h for h, names in hosts.items() if name in names), None)
        if owner is None:
            return 404, f"no server named {name!r} in the table. Its servers: {', '.join(_all(hosts, mine))}"
        return WriteTarget(path, owner)
    if verb != "rollout":
        return 404, f"no action {verb!r} for a group: the one action is rollout"
    path = f"/groups/{name}/rollout"
    here_hosts = {h for h, names in hosts.items() if mine & set(names)}
    if host is None or host in here_hosts:
        return WriteTarget(path)
    if host not in hosts:
        return 404, f"no host {host!r} in the table. Its hosts: {', '.join(hosts) or 'only this one'}"
    return WriteTarget(path, host)


def _all(hosts: Mapping[str, Sequence[str]], mine: set[str]) -> list[str]:
    names = [n for ns in hosts.values() for n in ns]
    return names + sorted(mine - set(names))
