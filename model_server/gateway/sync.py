"""Which workers a gateway should add and remove so its list follows the control plane. Pure: no I/O, no clock.

The pipelines' control APIs (``GET /status`` of each host) say what each
replica of the group is doing; the gateway's worker list should hold exactly
the READY ones::

    a replica heard READY              -> a worker (added if it is not)
    heard anything else                -> not a worker (removed if it is): DRAINING (before it stops: that is
                                          what the pipeline's drain_notice_s is for), RESTARTING, STARTING,
                                          WAITING_GPU, FAILED, STOPPED
    not heard (its host's control API  -> left as it is: a control plane that is down never empties a
    did not answer, or did not list it)   gateway; the gateway's own health checks and breakers decide there

Workers the gateway lists that are not replicas of the group are not ours:
left alone. A change is a queued job of the gateway (it shows in
``GET /workers`` a moment later), so a change in flight is remembered as a
:class:`Job` and not sent again before ``patience_s``, unless what it was for
has already happened (the worker is listed, or gone) or no longer holds.

:func:`parse_workers` reads ``GET /workers`` (for the sync and for
`model-server status` alike); :func:`wanted` turns what the control APIs said
into the list the gateway should have; :func:`plan_sync` compares it with
``GET /workers`` and the jobs in flight. The thread that reads, plans and applies is
:mod:`model_server.gateway.sync_loop`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from model_server.common.urls import url_key

__all__ = ["JOB_PATIENCE_S", "READY", "Job", "Member", "Replica", "SyncPlan", "parse_workers", "plan_sync", "wanted"]

READY = "READY"
JOB_PATIENCE_S = 10.0  # a job not done by then (its worker went away meanwhile, the gateway restarted) is sent again


@dataclass(frozen=True)
class Member:
    """One worker as the gateway lists it in ``GET /workers``."""

    id: str
    url: str
    model_id: str = ""
    healthy: bool = False
    load: int = 0


def _member(w: dict[str, Any]) -> Member:
    load = w.get("load")
    return Member(
        id=str(w.get("id", "")),
        url=w["url"],
        model_id=str(w.get("model_id", "")),
        healthy=w.get("is_healthy") is True,  # "false" or a missing flag is not healthy: no traffic goes there
        load=load if isinstance(load, int) and not isinstance(load, bool) else 0,
    )


def parse_workers(data: Any) -> tuple[tuple[Member, ...], str]:
    """``GET /workers``'s JSON as its members, or ((), what is wrong with it): the one reading of that answer,
    so the status view and the worker sync never disagree about a worker."""
    workers = data.get("workers") if isinstance(data, dict) else None
    if not isinstance(workers, list):
        return (), 'its answer to GET /workers has no "workers" list'
    out: list[Member] = []
    for i, w in enumerate(workers):
        if not isinstance(w, dict) or not isinstance(w.get("url"), str) or not w["url"].strip():
            return (), f"its answer to GET /workers has no url in workers[{i}]"
        out.append(_member(w))
    return tuple(out), ""


@dataclass(frozen=True)
class Replica:
    """One replica of the group: its name and host in the table, and its URL as the gateway reaches it."""

    name: str
    host: str
    url: str


@dataclass(frozen=True)
class Job:
    """A change sent to the gateway and not yet seen in ``GET /workers``."""

    op: Literal["add", "remove"]
    since_s: float


@dataclass(frozen=True)
class SyncPlan:
    """What to send now (the replicas' URLs, as the table spells them), and the jobs in flight afterwards."""

    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    jobs: Mapping[str, Job] = field(default_factory=dict)  # by the worker's URL (as the table spells it)
    why: Mapping[str, str] = field(default_factory=dict)  # URL -> "chat-2 is DRAINING", for the log

    @property
    def empty(self) -> bool:
        return not self.add and not self.remove


def wanted(replicas: Sequence[Replica], states: Mapping[str, str]) -> dict[str, tuple[bool, str]]:
    """URL -> (should be a worker, why) for each replica whose state was heard; the others are absent.

    ``states``: replica name -> the state its own host's control API gave, only for replicas heard now.
    """
    out: dict[str, tuple[bool, str]] = {}
    for r in replicas:
        state = states.get(r.name)
        if state is not None:
            out[r.url] = (state == READY, f"{r.name} is {state}")
    return out


def _in_flight(job: Job | None, op: str, now: float, patience_s: float) -> bool:
    return job is not None and job.op == op and now - job.since_s < patience_s


def plan_sync(
    want: Mapping[str, tuple[bool, str]],
    members: Iterable[str],
    jobs: Mapping[str, Job] | None = None,
    now: float = 0.0,
    patience_s: float = JOB_PATIENCE_S,
) -> SyncPlan:
    """The changes that make the gateway's list (``members``: the URLs of ``GET /workers``) what ``want`` says.

    ``jobs``: the changes in flight (from the previous plan); ``now``: the
    caller's monotonic clock. Removals come first in the plan: a draining
    replica is about to stop, an addition only adds capacity.
    """
    listed = {url_key(m): m for m in members}
    before = dict(jobs or {})
    add: list[str] = []
    remove: list[str] = []
    why: dict[str, str] = {}
    after: dict[str, Job] = {}
    for url, (member_wanted, reason) in want.items():
        key = url_key(url)
        job = before.pop(url, None)
        if member_wanted == (key in listed):
            continue  # as wanted; a job for it is done, or moot
        verb = "add" if member_wanted else "remove"
        if _in_flight(job, verb, now, patience_s):
            after[url] = job  # type: ignore[assignment]
            continue
        (add if member_wanted else remove).append(url)
        after[url] = Job(verb, now)
        why[url] = reason
    for url, job in before.items():  # not heard now: a job keeps its place until it shows, or its patience ends
        listed_now = url_key(url) in listed
        done = listed_now if job.op == "add" else not listed_now
        if not done and now - job.since_s < patience_s:
            after[url] = job
    return SyncPlan(tuple(add), tuple(remove), after, why)
