"""The simulated engine's HTTP surface: SGLang 0.5.23's routes, in SGLang's shapes.

`create_app(settings)` returns a FastAPI app with its own engine (state,
faults, metrics registry). Handlers read raw JSON and answer pre-encoded
bytes: the simulator must sustain hundreds of requests per second on two
cores. Middleware as in SGLang: CORS open to every origin (so ``OPTIONS``
preflights answer), and the API-key rule of auth.py when a key is set.

Routes: openai_routes (``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/v1/tokenize``, ``/v1/detokenize``, ``/v1/models``,
``/v1/models/{id}``), native_routes (``/generate``, ``/encode``, ``/health``,
``/health_generate``, ``/ready``, ``/ping``, ``/``, ``/model_info``,
``/server_info``, ``/v1/loads``, ``/get_load``, ``/flush_cache``,
``/metrics`` with ``--enable-metrics``), and the sim's own ``/sim/faults``,
``/sim/reset``, ``/sim/stats`` (admin routes: the admin key if set, else the
API key).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from model_server.sim import native_routes, openai_routes
from model_server.sim.auth import ApiKeyMiddleware
from model_server.sim.engine import SimEngine
from model_server.sim.faults import FaultError
from model_server.sim.metrics import HttpMetricsMiddleware
from model_server.sim.native_routes import SGLANG_VERSION
from model_server.sim.protocol import BadRequest, json_response, openai_error, read_body
from model_server.sim.server import DEFAULT_MODEL, SIMULATOR_NOTICE, SimServer
from model_server.sim.settings import SimSettings
from model_server.sim.streaming import DropStreamLogFilter

__all__ = ["DEFAULT_MODEL", "SGLANG_VERSION", "SIMULATOR_NOTICE", "ApiKeyMiddleware", "create_app"]

_NATIVE_VALUE_ERRORS = ("/generate", "/encode")


def create_app(settings: SimSettings, *, engine: SimEngine | None = None) -> FastAPI:
    """The simulated SGLang server for `settings` (a fresh engine unless one is given)."""
    engine = engine or SimEngine(settings)
    app = FastAPI(title="model-server sim", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, DropStreamLogFilter) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(DropStreamLogFilter())
    app.add_middleware(
        CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"], allow_headers=["*"]
    )
    if settings.api_key or settings.admin_api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key, admin_api_key=settings.admin_api_key)
    if engine.metrics is not None:
        app.add_middleware(HttpMetricsMiddleware, metrics=engine.metrics, routes=lambda: app.router.routes)

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, err: BadRequest) -> Response:
        return openai_error(err.status, str(err), err_type=err.err_type, param=err.param)

    server = SimServer(app, settings, engine)
    openai_routes.register(server)  # the hot path first: routes are matched in order
    native_routes.register(server)

    # --- run-time fault control (the sim's own) ---

    @server.route("/sim/faults", "GET")
    async def get_faults(request: Request) -> Response:
        return json_response(engine.faults.as_dict())

    @server.route("/sim/faults", "POST")
    async def post_faults(request: Request) -> Response:
        data = await read_body(request)
        try:
            return json_response(engine.set_faults(data).as_dict())
        except FaultError as err:
            raise BadRequest(str(err)) from None

    @server.route("/sim/reset", "POST")
    async def reset_faults(request: Request) -> Response:
        return json_response(engine.reset_faults().as_dict())

    @server.route("/sim/stats", "GET")
    async def stats(request: Request) -> Response:
        return json_response(engine.stats())

    return app
