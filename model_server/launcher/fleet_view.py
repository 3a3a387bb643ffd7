"""The whole fleet's status, host by host: each pipeline's control API, else this machine's status file and probes.

For every host of the table, :func:`read_fleet` asks its pipeline's control
API (``GET http://<host>:<launch.control_port>/status``), every host at once,
each with a short timeout, sending the control key when the variable
``launch.control_key_env`` names is set (reads from another machine need
it). A host whose control API does not answer (no ``control_port``, nothing
listening, a refusal, a timeout, an answer that is not a status) falls back:

- ``"status file + probes"``: the host is this machine and its status file
  exists: its entries (the valid ones, if it is damaged) give the states;
- ``"probes only"``: otherwise: no state, only whether each server answers.

Each host says which source it used and, if not the control API, why not.
Every server is also probed directly (``/health_generate``), so
``up``/``down`` is always what a client would see now.

Each ``[[gateways]]`` entry is read too, at the same time
(:mod:`model_server.gateway.status_read`: ``/liveness``, ``/workers`` with
the gateway's key from the variable its settings name), and shown as
:mod:`model_server.gateway.status_view` decides: up or why not, its workers
named by the table's servers, the ones it reports unhealthy, and the READY
replicas of its group it does not list.

What is returned is plain data (frozen dataclasses, :meth:`FleetView.as_dict`
for JSON), and never holds the key. The pure parts, which source a host gets
and how the answers merge (:func:`merge_host`), are apart from the I/O
(:func:`read_fleet`; a control API is read by
:mod:`model_server.common.control_status`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from model_server.common.control_status import READ_TIMEOUT_S, ControlAnswer, Recorded, get_control_status
from model_server.common.hosts import local_identities, match_servers
from model_server.common.urls import server_url
from model_server.config import Fleet, ServerSpec
from model_server.gateway.settings import GatewaySettings, resolve
from model_server.gateway.status_read import read_gateway
from model_server.gateway.status_view import GatewayAnswer, GatewayView, gateway_view
from model_server.launcher.status_file import StatusFile

__all__ = [
    "SOURCE_API",
    "SOURCE_FILE",
    "SOURCE_PROBES",
    "FleetView",
    "GatewayView",
    "HostView",
    "Live",
    "ServerView",
    "hosts_of",
    "merge_gateways",
    "merge_host",
    "read_fleet",
]

SOURCE_API = "control API"
SOURCE_FILE = "status file + probes"
SOURCE_PROBES = "probes only"
MAX_THREADS = 32


@dataclass(frozen=True)
class Live:
    """A direct ``/health_generate`` probe: answered 200, or why not."""

    ok: bool
    why: str = ""


@dataclass(frozen=True)
class ServerView:
    name: str
    group: str
    host: str
    port: int
    recorded: Recorded | None = None  # None: no pipeline said anything about it
    live: Live | None = None  # None: not probed

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def up(self) -> bool:
        """Answers its probe; when not probed, its pipeline says READY."""
        if self.live is not None:
            return self.live.ok
        return self.recorded is not None and self.recorded.state == "READY"


@dataclass(frozen=True)
class HostView:
    """One host of the table: where its servers' states came from, and them."""

    host: str
    source: str  # SOURCE_API, SOURCE_FILE or SOURCE_PROBES
    why: str  # why the control API was not used ("" when it was)
    servers: tuple[ServerView, ...]
    control_url: str | None = None
    pipeline: dict[str, Any] = field(default_factory=dict)  # API: {"started"}; file: {"pid", "running", "file"}
    rollouts: dict[str, dict[str, Any]] = field(default_factory=dict)  # the control API's, by group
    status_file_problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class FleetView:
    table: str
    hosts: tuple[HostView, ...]
    status_file: str | None  # this machine's (launch.status_file), when a host of the table is this machine
    elapsed_s: float = 0.0
    gateways: tuple[GatewayView, ...] = ()  # one per [[gateways]] entry, in table order

    @property
    def gateways_down(self) -> tuple[GatewayView, ...]:
        return tuple(g for g in self.gateways if not g.up)

    @property
    def servers(self) -> tuple[ServerView, ...]:
        return tuple(s for h in self.hosts for s in h.servers)

    @property
    def down(self) -> tuple[ServerView, ...]:
        return tuple(s for s in self.servers if not s.up)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- pure ---------------------------------------------------------------------------------------------


def hosts_of(servers: Iterable[ServerSpec]) -> dict[str, tuple[ServerSpec, ...]]:
    """The table's servers by host, hosts in order of first appearance."""
    out: dict[str, list[ServerSpec]] = {}
    for s in servers:
        out.setdefault(s.host, []).append(s)
    return {h: tuple(v) for h, v in out.items()}


def _rollouts(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    raw = data.get("rollouts")
    return {str(g): r for g, r in raw.items() if isinstance(r, dict)} if isinstance(raw, dict) else {}


def merge_host(
    host: str,
    specs: Sequence[ServerSpec],
    answer: ControlAnswer | None,
    status_file: StatusFile | None,
    probes: Mapping[str, Live],
    pipeline_running: bool | None = None,
) -> HostView:
    """One host's view: the control API's states if it answered, else the status file's (``status_file`` is
    given only for a host that is this machine), else none; with the probes that were made.

    ``answer`` None: the table has no ``launch.control_port``.
    """
    recorded, problem = answer.servers() if answer is not None else ({}, "launch.control_port is not set in the table")
    pipeline: dict[str, Any] = {}
    rollouts: dict[str, dict[str, Any]] = {}
    if answer is not None and answer.data is not None and not problem:
        pipeline = {"started": answer.data.get("started")}
        rollouts = _rollouts(answer.data)
    if not problem:
        source, why = SOURCE_API, ""
    elif status_file is not None and status_file.exists:
        source, why = SOURCE_FILE, problem
        names = {s.name for s in specs}
        recorded = {
            n: Recorded(e.state, e.pid, e.restarts, e.since or None, e.last_error)
            for n, e in status_file.servers.items()
            if n in names
        }
        pipeline = {"pid": status_file.pipeline.get("pid"), "running": pipeline_running, "file": str(status_file.path)}
    else:
        source, why = SOURCE_PROBES, problem
        if status_file is not None:
            why += f"; this machine has no status file at {status_file.path}"
    views = tuple(ServerView(s.name, s.group, s.host, s.port, recorded.get(s.name), probes.get(s.name)) for s in specs)
    return HostView(
        host, source, why, views, answer.url if answer is not None else None, pipeline, rollouts,
        status_file.problems if source == SOURCE_FILE and status_file is not None else (),
    )  # fmt: skip


def merge_gateways(
    fleet: Fleet, gateways: Sequence[GatewaySettings], answers: Sequence[GatewayAnswer], hosts: Sequence[HostView]
) -> tuple[GatewayView, ...]:
    """Each gateway's view from its answer, its workers named by the table, READY per the hosts' views."""
    servers = {server_url(s.host, s.port): s.name for s in fleet.servers}
    ready = {
        server_url(s.host, s.port): s.group
        for h in hosts
        for s in h.servers
        if s.recorded is not None and s.recorded.state == "READY"
    }
    return tuple(
        gateway_view(g.name, g.group, a, servers, [u for u, group in ready.items() if group == g.group],
                     g.gateway_key_env)
        for g, a in zip(gateways, answers, strict=True)
    )  # fmt: skip


# ---- I/O ----------------------------------------------------------------------------------------------


def _gateway_key(settings: GatewaySettings) -> str | None:
    return (os.environ.get(settings.gateway_key_env) or None) if settings.gateway_key_env else None


def _probe(spec: ServerSpec, timeout_s: float) -> Live:
    from model_server.launcher.steps import health_url  # noqa: PLC0415
    from model_server.launcher.supervisor import probe_health  # noqa: PLC0415

    ok, why = probe_health(health_url(spec.host, spec.port), timeout_s)
    return Live(ok, why)


def read_fleet(
    fleet: Fleet,
    *,
    timeout_s: float = READ_TIMEOUT_S,
    key: str | None = None,
    host_ip: Sequence[str] = (),
    identities: frozenset[str] | None = None,
    probe_one: Callable[[ServerSpec, float], Live] = _probe,
    read_one: Callable[[str, str | None, float], GatewayAnswer] = read_gateway,
) -> FleetView:
    """Every host's view, the control APIs asked, the servers probed and the gateways read concurrently, each
    within ``timeout_s`` (a gateway: twice, ``/liveness`` then ``/workers``).

    ``key``: the control key to send (default: from the environment).
    ``identities``: this machine's names (default:
    its interface addresses, its hostname, and ``host_ip``). A gateway's key
    always comes from the variable its settings name (``api_key_env``).
    """
    from model_server.common.processes import same_process  # noqa: PLC0415
    from model_server.launcher import rundir  # noqa: PLC0415
    from model_server.launcher.status_file import load_status  # noqa: PLC0415

    started = time.monotonic()
    policy = fleet.launch
    if key is None:
        key = policy.control_key(required=False)
    ids = identities if identities is not None else local_identities(host_ip)
    by_host = hosts_of(fleet.servers)
    path = rundir.status_path(policy)
    local = [h for h, specs in by_host.items() if match_servers(specs[:1], ids)]
    status_file = load_status(path) if local else None
    running = None
    if status_file is not None and status_file.exists:
        running = same_process(status_file.pipeline.get("pid"), status_file.pipeline.get("create_time"))
    gateways = [resolve(fleet, spec) for spec in fleet.gateways]
    tasks = len(by_host) + len(fleet.servers) + len(gateways)
    with ThreadPoolExecutor(max_workers=max(1, min(MAX_THREADS, tasks)), thread_name_prefix="fleet-view") as pool:
        asked: dict[str, Future[ControlAnswer]] = {}
        if policy.control_port is not None:
            asked = {h: pool.submit(get_control_status, h, policy, key, timeout_s) for h in by_host}
        read = [pool.submit(read_one, g.client_url, _gateway_key(g), timeout_s) for g in gateways]
        probed = {s.name: pool.submit(probe_one, s, timeout_s) for s in fleet.servers}
        answers = {h: f.result() for h, f in asked.items()}
        probes = {n: f.result() for n, f in probed.items()}
        gateway_answers = [f.result() for f in read]
    hosts = tuple(
        merge_host(h, specs, answers.get(h), status_file if h in local else None, probes, running)
        for h, specs in by_host.items()
    )
    views = merge_gateways(fleet, gateways, gateway_answers, hosts)
    return FleetView(fleet.source, hosts, str(path) if local else None, time.monotonic() - started, views)
