"""The fleet dashboard: one page for every host's servers, live, served by this pipeline's control API.

Routes (added by :func:`model_server.launcher.control_api.build_app`):

- ``GET /``: the page (``static/index.html``; its script and style under
  ``/dashboard/``). Plain files shipped in the package: no build step, nothing
  from a CDN. It holds no data and no key.
- ``GET /fleet``: what the page draws (:func:`~model_server.launcher.dashboard_data.fleet_page`):
  every host of the table (this one from its supervisors, the others from their
  control APIs' ``/status`` and ``/events``), each running engine's load from
  its ``/metrics``, and each client's view of the replicas
  (``launch.dashboard_client_metrics``). A read: open from this machine, the
  control key from any other, as ``GET /status``. The page polls it every
  second; answers are shared for :data:`MAX_AGE_S` between viewers.
- ``POST /fleet/servers/{name}/{verb}`` (drain, undrain, restart, stop,
  start) and ``POST /fleet/groups/{group}/rollout?host=H``: a write, so the
  control key is needed. Done here when the server (or ``H``) is this host's;
  else forwarded to its host's control API with the ``Authorization`` header
  the browser sent, and that host's answer returned as it came.

The page asks for the key, keeps it in the tab's ``sessionStorage`` at most
and sends it as ``Authorization: Bearer``; it never appears in a URL, the
page, an answer or a log line. The table's other hosts come from the table
the pipeline was started with (``fleet``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from importlib import resources
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from model_server.common.control_status import ControlAnswer, get_control_status, parse_control_status
from model_server.common.urls import bearer_headers, server_url
from model_server.config import Fleet, LaunchPolicy, ServerSpec
from model_server.launcher import dashboard_data as view
from model_server.launcher.events_file import EventLog
from model_server.launcher.fleet_control import FleetControl
from model_server.launcher.fleet_view import hosts_of
from model_server.launcher.lifecycle import ServerState
from model_server.launcher.redact import Secret

__all__ = ["MAX_AGE_S", "ROUTES", "Dashboard", "add_routes", "static_file"]

log = logging.getLogger(__name__)
MAX_AGE_S = 0.5  # a /fleet answer is shared this long between viewers
READ_TIMEOUT_S = 1.5  # each read behind /fleet (a control API, an engine's or a client's /metrics)
FORWARD_TIMEOUT_S = 10.0
EVENTS = 40  # recent transitions asked of each host; the page shows the newest of all
ROUTES = "GET /, GET /fleet, POST /fleet/servers/{name}/{verb}, POST /fleet/groups/{group}/rollout?host=H"
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
INDEX = "index.html"
ASSETS = tuple(name for name in STATIC if name != INDEX)
# The page loads only its own files and talks only to its own origin.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
UP = frozenset({ServerState.READY.value, ServerState.DRAINING.value, view.UNKNOWN})  # engines worth a /metrics read

Refuse = Callable[[Request, bool], "JSONResponse | None"]
LocalServer = Callable[[Request, str, str], Awaitable[Response]]
LocalRollout = Callable[[Request, str], Awaitable[Response]]


def static_file(name: str) -> bytes:
    """One of the page's files, from the package (``model_server/launcher/static``)."""
    return (resources.files("model_server.launcher") / "static" / name).read_bytes()


def _spec_dict(s: ServerSpec) -> dict[str, Any]:
    return {"name": s.name, "group": s.group, "host": s.host, "port": s.port}


class Dashboard:
    """Reads the fleet for the page. ``transport``: serves every read and forward instead of the network (a test's
    fake hosts: an ``httpx.MockTransport``, which answers both sync and async clients)."""

    def __init__(
        self,
        control: FleetControl,
        events: EventLog,
        key: Secret | None,
        fleet: Fleet,
        *,
        timeout_s: float = READ_TIMEOUT_S,
        max_age_s: float = MAX_AGE_S,
        transport: httpx.MockTransport | None = None,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.control, self.events, self.key = control, events, key
        self.timeout_s, self.max_age_s = timeout_s, max_age_s
        self.fleet = fleet
        self._transport = transport
        self._wall, self._clock = wall, clock
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock: asyncio.Lock | None = None

    # ---- the table ---------------------------------------------------------------------------------

    def here(self) -> list[str]:
        return list(self.control.specs)

    def hosts(self) -> dict[str, list[dict[str, Any]]]:
        """Every host of the table and its servers ({name, group, host, port}); this pipeline's are among them."""
        return {h: [_spec_dict(s) for s in specs] for h, specs in hosts_of(self.fleet.servers).items()}

    # ---- GET /fleet --------------------------------------------------------------------------------

    async def page(self) -> dict[str, Any]:
        """The page's JSON; one read at a time, shared with every viewer asking within ``max_age_s``."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._cached is not None and self._clock() - self._cached[0] < self.max_age_s:
                return self._cached[1]
            data = await self._read()
            self._cached = (self._clock(), data)
            return data

    async def _read(self) -> dict[str, Any]:
        policy = self.fleet.launch
        hosts = self.hosts()
        mine = set(self.here())
        here = {h for h, specs in hosts.items() if any(s["name"] in mine for s in specs)}
        key = self.key.value if self.key is not None else None
        async with httpx.AsyncClient(timeout=self.timeout_s, transport=self._transport) as client:
            statuses = await asyncio.gather(
                *(self._host_status(client, h, h in here, policy, key) for h in hosts)
            )  # fmt: skip
            by_host = dict(zip(hosts, statuses))
            engines = [
                s
                for h, specs in hosts.items()
                for s in specs
                if _state_of(by_host[h], s["name"]) in UP and s.get("port")
            ]
            loads = await asyncio.gather(*(self._engine_load(client, s) for s in engines))
            clients = await asyncio.gather(*(self._client(client, url) for url in policy.dashboard_client_metrics))
        load_of = {s["name"]: load for s, load in zip(engines, loads)}
        now = self._wall()
        views = []
        for h, specs in hosts.items():
            views.append(view.host_view(h, specs, by_host[h], h in here, load_of, now))
        events = view.merge_events({h: by_host[h].events for h in hosts}, EVENTS)
        return view.fleet_page(self.fleet.source, views, events, clients, now, key is not None)

    async def _host_status(
        self, client: httpx.AsyncClient, host: str, here: bool, policy: LaunchPolicy, key: str | None
    ) -> view.HostStatus:
        """Its /status, parsed, and its recent events; or why there are none."""
        if here:  # in a thread: it reads the GPUs (NVML)
            return _parsed(
                await asyncio.to_thread(self.control.status), [e.as_json() for e in self.events.recent(EVENTS)]
            )
        if policy.control_port is None:
            return view.HostStatus(problem="launch.control_port is not set in the table: no control API to ask")
        answer = await asyncio.to_thread(self._control_status, host, policy, key)
        recorded, problem = answer.servers()
        if answer.data is None or problem:
            return view.HostStatus(problem=problem)
        events, _why = await _get_json(client, server_url(host, policy.control_port, f"/events?limit={EVENTS}"), key)
        listed = (events or {}).get("events", []) if isinstance(events, dict) else []
        return view.HostStatus(answer.data, recorded, events=listed)

    def _control_status(self, host: str, policy: LaunchPolicy, key: str | None) -> ControlAnswer:
        """A host's /status, read as every reader does (common.control_status): its refusals name their fix."""
        if self._transport is None:
            return get_control_status(host, policy, key, self.timeout_s)
        with httpx.Client(transport=self._transport) as client:
            return get_control_status(host, policy, key, self.timeout_s, client)

    async def _engine_load(self, client: httpx.AsyncClient, spec: dict[str, Any]) -> tuple[view.EngineLoad | None, str]:
        url = server_url(spec["host"], spec["port"], "/metrics")
        text, problem = await _get_text(client, url)
        if text is None:
            return None, problem
        try:
            load = view.engine_load(text)
        except ValueError as err:
            return None, f"unreadable metrics from {url}: {err}"
        return load, "" if load is not None else f"{url} has no sglang: gauges (is launch.enable_metrics on?)"

    async def _client(self, client: httpx.AsyncClient, url: str) -> dict[str, Any]:
        text, problem = await _get_text(client, url)
        replicas: Sequence[view.ClientReplica] = ()
        if text is not None:
            try:
                replicas = view.client_replicas(text)
            except ValueError as err:
                problem = f"unreadable metrics from {url}: {err}"
            else:
                if not replicas:
                    problem = f"{url} has no model_server_client_ series yet (no request sent, or metrics off)"
        return {"url": url, "problem": problem, "replicas": [asdict(r) for r in replicas]}

    # ---- writes on another host ------------------------------------------------------------------

    async def forward(self, host: str, path: str, authorization: str, body: bytes) -> Response:
        """POST ``path`` to ``host``'s control API with the browser's ``authorization``; its answer as it came."""
        port = self.fleet.launch.control_port
        if port is None:
            return _error(409, f"cannot reach host {host}: launch.control_port is not set in the table")
        url = server_url(host, port, path)
        headers = {"Authorization": authorization, "Content-Type": "application/json"}
        try:
            async with httpx.AsyncClient(timeout=FORWARD_TIMEOUT_S, transport=self._transport) as client:
                answer = await client.post(url, headers=headers, content=body)
        except httpx.HTTPError as err:
            return _error(502, f"host {host}'s control API at {url} did not answer ({type(err).__name__}): {err}")
        try:
            data = answer.json()
        except ValueError:
            return _error(502, f"host {host}'s control API at {url} answered {answer.status_code}, not JSON")
        return JSONResponse(data, status_code=answer.status_code)


def _parsed(status: dict[str, Any], events: list[dict[str, Any]]) -> view.HostStatus:
    """This host's own status, parsed as another host's would be (its answer's shape is the same)."""
    recorded, problem = parse_control_status(status)
    return view.HostStatus(status, recorded, problem, events)


def _state_of(status: view.HostStatus, name: str) -> str:
    recorded = status.recorded.get(name)
    return recorded.state if recorded is not None else view.UNKNOWN


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _get_text(client: httpx.AsyncClient, url: str, key: str | None = None) -> tuple[str | None, str]:
    try:
        answer = await client.get(url, headers=bearer_headers(key))
    except httpx.HTTPError as err:
        return None, f"{url}: {type(err).__name__}" + (f": {err}" if str(err) else "")
    if answer.status_code != 200:
        return None, f"{url} answered {answer.status_code}"
    return answer.text, ""


async def _get_json(client: httpx.AsyncClient, url: str, key: str | None) -> tuple[Any, str]:
    text, problem = await _get_text(client, url, key)
    if text is None:
        return None, problem
    try:
        return json.loads(text), ""
    except ValueError:
        return None, f"{url} did not answer JSON"


# ---- the routes -------------------------------------------------------------------------------------


def add_routes(
    app: FastAPI, dashboard: Dashboard, refuse: Refuse, local_server: LocalServer, local_rollout: LocalRollout
) -> None:
    """The page's routes on the control API's ``app``.

    ``refuse(request, write)``: the control API's key check (None: go on);
    ``local_server`` and ``local_rollout``: its own write routes' handlers, for this host's servers.
    """
    files = {name: static_file(name) for name in STATIC}

    def _static(name: str) -> Response:
        return Response(files[name], media_type=STATIC[name], headers=HEADERS)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def index() -> Response:
        return _static(INDEX)

    @app.get("/dashboard/{name}")
    async def asset(name: str) -> Response:
        if name not in files or name == INDEX:
            return _error(404, f"no file {name!r} here: the page's files are {', '.join(ASSETS)} (the page: GET /)")
        return _static(name)

    @app.get("/fleet")
    async def fleet(request: Request) -> Response:
        refused = refuse(request, False)
        if refused is not None:
            return refused
        return JSONResponse(await dashboard.page(), headers={"Cache-Control": "no-store"})

    async def _write(request: Request, kind: str, name: str, verb: str, host: str | None) -> Response:
        refused = refuse(request, True)
        if refused is not None:
            return refused
        hosts = {h: [s["name"] for s in specs] for h, specs in dashboard.hosts().items()}
        target = view.write_target(kind, name, verb, dashboard.here(), hosts, host)
        if isinstance(target, tuple):
            return _error(*target)
        if target.host is None:
            return await (local_server(request, name, verb) if kind == "server" else local_rollout(request, name))
        who = request.client.host if request.client else "?"
        log.info("dashboard: %s of %s %s forwarded to host %s, asked by %s", verb, kind, name, target.host, who)
        return await dashboard.forward(
            target.host, target.path, request.headers.get("authorization", ""), await request.body()
        )

    @app.post("/fleet/servers/{name}/{verb}")
    async def server_write(request: Request, name: str, verb: str) -> Response:
        return await _write(request, "server", name, verb, None)

    @app.post("/fleet/groups/{group}/rollout")
    async def group_rollout(request: Request, group: str, host: str | None = None) -> Response:
        return await _write(request, "group", group, "rollout", host)
