"""What `model-server status` shows of one gateway: its answers turned into a row and its flags. Pure: no I/O.

A read of a gateway (:mod:`model_server.gateway.status_read`) gives a
:class:`GatewayAnswer`: what ``GET /liveness`` and ``GET /workers`` answered,
or why nothing did. :func:`gateway_view` turns it, with the table's worker
URL -> server name map and the replicas the pipelines call READY, into a
:class:`GatewayView`::

    /liveness 200                 -> up (else: not up, and why in one short phrase)
    /workers {"workers": [...]}   -> its workers, each named by the table's server at that URL
    a worker with is_healthy false  -> flagged: the gateway sends it nothing until its health checks pass
    a READY replica of the group  -> flagged: the gateway does not route to it (its worker list lags or
      that is not a worker           failed to add it)

A gateway that does not answer is a view that says so, never an error.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from model_server.common.urls import url_key
from model_server.gateway.sync import parse_workers

__all__ = ["GatewayAnswer", "GatewayView", "WorkerView", "gateway_view"]


@dataclass(frozen=True)
class GatewayAnswer:
    """What one read of a gateway got: each route's status and JSON, or why it got none (a short phrase)."""

    url: str
    liveness_status: int | None = None
    problem: str = ""  # the gateway gave no answer at all: connection refused, no answer within N s, ...
    workers_status: int | None = None
    workers_data: Any = None
    workers_problem: str = ""  # GET /workers gave no answer (the gateway answered /liveness)


@dataclass(frozen=True)
class WorkerView:
    """One worker as the gateway lists it; ``server`` is the table's name for its URL (None: not in the table)."""

    url: str
    server: str | None
    healthy: bool

    @property
    def label(self) -> str:
        return self.server or self.url


@dataclass(frozen=True)
class GatewayView:
    """One ``[[gateways]]`` entry as status shows it. ``why``: why it is not up ("" when it is)."""

    name: str
    group: str
    url: str
    up: bool
    why: str = ""
    workers: tuple[WorkerView, ...] = ()
    workers_problem: str = ""  # why its worker list is unknown ("" when it was read)
    unhealthy: tuple[str, ...] = ()  # the workers it reports unhealthy: server names (URLs when not in the table)
    missing: tuple[str, ...] = ()  # READY replicas of its group that are not among its workers

    @property
    def ok(self) -> bool:
        return self.up and not self.workers_problem and not self.unhealthy and not self.missing


def _workers_problem(answer: GatewayAnswer, key_env: str | None) -> str:
    if answer.workers_problem:
        return f"GET /workers: {answer.workers_problem}"
    status = answer.workers_status
    if status in (401, 403):
        fix = (
            f"export {key_env}=<the gateway's key> here"
            if key_env
            else "it wants a key and the table names none: set api_key_env in its [[gateways]] entry (or the "
            "table's) and export it here"
        )
        return f"GET /workers answered {status}: {fix}"
    if status != 200:
        return f"GET /workers answered {status}"
    return ""


def gateway_view(
    name: str,
    group: str,
    answer: GatewayAnswer,
    servers: Mapping[str, str],
    ready: Collection[str] = (),
    key_env: str | None = None,
) -> GatewayView:
    """One gateway's view from its answer.

    ``servers``: worker URL -> server name, for every server of the table;
    ``ready``: the URLs of the replicas of the gateway's group that their
    pipelines report READY (empty when no pipeline said); ``key_env``: the
    variable that holds the gateway's key, for the fix when it refuses.
    """
    if answer.problem:
        return GatewayView(name, group, answer.url, False, answer.problem)
    if answer.liveness_status != 200:
        return GatewayView(name, group, answer.url, False, f"/liveness answered {answer.liveness_status}")
    problem = _workers_problem(answer, key_env)
    if problem:
        return GatewayView(name, group, answer.url, True, workers_problem=problem)
    listed, problem = parse_workers(answer.workers_data)
    if problem:
        return GatewayView(name, group, answer.url, True, workers_problem=problem)
    names = {url_key(url): server for url, server in servers.items()}
    order = {server: i for i, server in enumerate(servers.values())}
    listed_workers = (WorkerView(m.url, names.get(url_key(m.url)), m.healthy) for m in listed)
    workers = tuple(sorted(listed_workers, key=lambda w: order.get(w.server or "", len(order))))  # table order
    keys = {url_key(w.url) for w in workers}
    missing = tuple(servers.get(url, url) for url in ready if url_key(url) not in keys)
    unhealthy = tuple(w.label for w in workers if not w.healthy)
    return GatewayView(name, group, answer.url, True, workers=workers, unhealthy=unhealthy, missing=missing)
