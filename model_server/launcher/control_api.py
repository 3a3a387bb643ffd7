"""The control API's routes: what a pipeline shows (status, events, metrics) and what an operator may ask.

Reads (``GET /status``, ``/events``, ``/metrics``) are open from this machine
(127.0.0.1, ::1) and need the control key from anywhere else; the write routes
(``POST /servers/{name}/drain|undrain|restart|stop|start`` and
``POST /groups/{group}/rollout``) always need it, as ``Authorization: Bearer
<key>``, compared in constant time. The key comes from the variable
``launch.control_key_env`` names; without one the write routes are refused.

``POST /groups/{group}/rollout`` restarts that group's servers on this host
one at a time (each drained, restarted, and READY again with a new pid before
the next; see :mod:`model_server.launcher.rollout`). It answers 202 with the
plan at once; ``GET /status`` shows its progress under ``rollouts``.

Every refusal is JSON ``{"error": ...}`` naming the thing and the fix: 401 (no
or wrong key), 404 (unknown server, or no server of that group here), 409 (its
state does not allow it; a rollout of that group already running, or a server
of it not READY), 422 (a body that is not the JSON object the route takes).
The key never appears in an answer.

The fleet dashboard's page and routes (``GET /``, ``GET /fleet``, ``POST
/fleet/...``) are added here too, under the same key rules: see
:mod:`model_server.launcher.dashboard`.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from model_server.config import Fleet
from model_server.launcher import dashboard as dash
from model_server.launcher.events_file import EventLog
from model_server.launcher.fleet_control import CommandRefused, FleetControl
from model_server.launcher.metrics import PipelineMetrics
from model_server.launcher.redact import Secret

__all__ = ["LOCAL_CLIENTS", "build_app"]

log = logging.getLogger(__name__)
LOCAL_CLIENTS = frozenset({"127.0.0.1", "::1"})
MAX_EVENTS = 1000
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
ROUTES = (
    "GET /status, GET /events?limit=N, GET /metrics, POST /servers/{name}/drain|undrain|restart|stop|start, "
    "POST /groups/{group}/rollout; the dashboard: " + dash.ROUTES
)


class _NoFields(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DrainBody(_NoFields):
    """``POST /servers/{name}/drain``: what to do once drained (stop, the default, or restart)."""

    then: Literal["stop", "restart"] = "stop"


# each write route on a server, and the body it takes (the dashboard's local writes use the same)
BODIES: dict[str, type[_NoFields]] = {
    "drain": DrainBody,
    "undrain": _NoFields,
    "restart": _NoFields,
    "stop": _NoFields,
    "start": _NoFields,
}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _presented_key(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _key_refusal(request: Request, key: Secret | None, *, write: bool) -> JSONResponse | None:
    """None if the request may go on; else the 401 (or 403) saying what to send, never the key."""
    if not write and request.client is not None and request.client.host in LOCAL_CLIENTS:
        return None
    what = "change a server" if write else "read the control API from another machine"
    if key is None:
        return _error(
            401 if write else 403,
            f"a control key is needed to {what}, and this pipeline has none. Set launch.control_key_env to the name "
            f"of an environment variable holding a long random key, export it, and start the pipeline again",
        )
    presented = _presented_key(request)
    if presented is None:
        return _error(401, f"a control key is needed to {what}: send the header 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(presented.encode(), key.value.encode()):
        return _error(401, "the control key sent is not this pipeline's (see launch.control_key_env)")
    return None


async def _body(request: Request, model: type[BaseModel]) -> BaseModel | JSONResponse:
    """The request's JSON body as ``model`` (an empty body: the defaults), or the 422 that says what is wrong."""
    raw = await request.body()
    if not raw.strip():
        return model()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        return _error(422, f"the body is not JSON ({err}). Send a JSON object, or no body")
    if not isinstance(data, dict):
        return _error(422, f"the body is JSON {type(data).__name__}, not an object. Send a JSON object, or no body")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())
        fields = ", ".join(model.model_fields) or "none"
        return _error(422, f"bad body: {problems}. Fields this route takes: {fields}")


async def _allowed_body(request: Request, key: Secret | None, model: type[BaseModel]) -> BaseModel | JSONResponse:
    """A write route's body, once the key is right; else the 401 or 422 to answer."""
    return _key_refusal(request, key, write=True) or await _body(request, model)


def build_app(
    control: FleetControl,
    events: EventLog,
    metrics: PipelineMetrics,
    key: Secret | None,
    fleet: Fleet,
    *,
    dashboard_transport: httpx.MockTransport | None = None,
) -> FastAPI:
    """The control API. ``fleet``: the pipeline's table, for the dashboard's other hosts;
    ``dashboard_transport``: serves the dashboard's reads instead of the network (tests)."""
    app = FastAPI(title="model-server pipeline control", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, err: Exception) -> JSONResponse:  # a bug: say so, keep serving
        log.exception("control API: unexpected error")
        return _error(500, f"internal error in the control API ({type(err).__name__}); see the pipeline's log")

    @app.exception_handler(HTTPException)
    async def _no_route(request: Request, err: HTTPException) -> JSONResponse:
        if err.status_code in (404, 405):
            return _error(err.status_code, f"no route {request.method} {request.url.path}. The routes: {ROUTES}")
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def _bad_query(_request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return _error(422, f"bad request: {problems}")

    @app.get("/status")
    async def status(request: Request) -> Response:
        return _key_refusal(request, key, write=False) or JSONResponse(control.status())

    @app.get("/events")
    async def recent_events(request: Request, limit: int = 100) -> Response:
        refused = _key_refusal(request, key, write=False)
        if refused is not None:
            return refused
        if not 1 <= limit <= MAX_EVENTS:
            return _error(422, f"limit is {limit}: give 1 to {MAX_EVENTS}")
        path = str(events.path) if events.path is not None else None
        return JSONResponse({"file": path, "events": [e.as_json() for e in events.recent(limit)]})

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        return _key_refusal(request, key, write=False) or Response(metrics.exposition(), media_type=PROMETHEUS_TEXT)

    async def _write(request: Request, name: str, verb: str, model: type[BaseModel]) -> Response:
        body = await _allowed_body(request, key, model)
        if isinstance(body, JSONResponse):
            return body
        try:
            if verb == "start":
                state = control.start(name)
            else:
                then = body.then if isinstance(body, DrainBody) else "stop"
                state = control.command(name, verb, then)  # type: ignore[arg-type]  # verb: one of _route's
        except CommandRefused as err:
            return _error(err.status, err.message)
        log.info("control API: %s of server %s asked by %s", verb, name, request.client.host if request.client else "?")
        return JSONResponse({"server": name, "accepted": verb, "state": state.value}, status_code=202)

    def _route(verb: str, model: type[BaseModel]) -> None:
        async def handler(request: Request, name: str) -> Response:
            return await _write(request, name, verb, model)

        app.add_api_route(f"/servers/{{name}}/{verb}", handler, methods=["POST"], name=verb)

    for verb, model in BODIES.items():
        _route(verb, model)

    async def _rollout(request: Request, group: str) -> Response:
        body = await _allowed_body(request, key, _NoFields)
        if isinstance(body, JSONResponse):
            return body
        try:
            plan = control.rollout(group)
        except CommandRefused as err:
            return _error(err.status, err.message)
        log.info("control API: rollout of group %s asked by %s", group, request.client.host if request.client else "?")
        return JSONResponse(plan, status_code=202)

    app.add_api_route("/groups/{group}/rollout", _rollout, methods=["POST"], name="rollout")

    async def _local_server(request: Request, name: str, verb: str) -> Response:
        return await _write(request, name, verb, BODIES[verb])  # verb: checked by write_target

    dash.add_routes(
        app,
        dash.Dashboard(control, events, key, fleet, transport=dashboard_transport),
        lambda request, write: _key_refusal(request, key, write=write),
        _local_server,
        _rollout,
    )
    return app
