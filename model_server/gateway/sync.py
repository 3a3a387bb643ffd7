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

:func:`wanted` turns what the control APIs said into the list the gateway
should have; :func:`plan_sync` compares it with ``GET /workers`` and the jobs
in flight. The thread that reads, plans and applies is
:mod:`model_server.gateway.sync_loop`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

__all__ = ["JOB_PATIENCE_S", "READY", "Job", "Replica", "SyncPlan", "plan_sync", "same_url", "url_key", "wanted"]

READY = "READY"
JOB_PATIENCE_S = 10.0  # a job not done by then (its worker went away meanwhile, the gateway restarted) is sent again


def url_key(url: str) -> tuple[str, str, int | None, str]:
    """A worker URL as the gateway and the table may both spell it: scheme and host lower-cased, no trailing /."""
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.scheme.lower(), (parts.hostname or "").lower(), port, parts.path.rstrip("/")


def same_url(a: str, b: str) -> bool:
    """Whether two worker URLs name the same worker (case of scheme and host, a trailing / ignored)."""
    return url_key(a) == url_key(b)


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
