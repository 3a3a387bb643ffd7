"""Run the simulated engine under uvicorn, in the foreground, until SIGINT/SIGTERM.

The socket is bound here first, so a port in use is one clear error (exit 2)
rather than a uvicorn traceback, and ``--port 0`` picks a free port that the
startup line reports. It listens only once the simulated weights are loaded.
Access logs are off (SGLang logs no access lines either).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from model_server.common.urls import server_url
from model_server.errors import SimError
from model_server.sim.settings import SimSettings

__all__ = ["bind_socket", "serve"]

log = logging.getLogger(__name__)
EXIT_WITH_PARENT_ENV = "MODEL_SERVER_SIM_EXIT_WITH_PARENT"  # set by SimProcess: no orphan if the test dies
GRACEFUL_SHUTDOWN_S = 1  # in-flight (possibly hung) requests are dropped after this
_PARENT_POLL_S = 0.25


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound, inheritable TCP socket for (host, port); SimError if that address is unusable."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        message = f"cannot resolve --host {host!r} ({err.strerror}); give an IP address such as 127.0.0.1"
        raise SimError(message) from err
    infos.sort(key=lambda info: info[0] != socket.AF_INET)  # "localhost": prefer 127.0.0.1 over ::1
    family, _, _, _, address = infos[0]
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on accepted sockets whose proto says TCP;
    # with proto 0, Nagle plus the client's delayed ACK add ~40 ms to every two-part response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise SimError(
            f"cannot listen on {host}:{port} ({err.strerror}); choose a free --port "
            f"(or stop whatever holds it: `ss -ltnp 'sport = :{port}'`)"
        ) from err
    sock.set_inheritable(True)
    return sock


def serve(settings: SimSettings) -> None:
    """Serve until stopped, starting the way SGLang does.

    1. Log the resolved server args as SGLang 0.5.23 does
       (``[time] server_args={...}``, API key included: the log's keeper redacts it).
    2. "Load the weights" for ``--startup-delay-s``: the port is bound but not listening,
       so a client is refused (connection refused), as by SGLang before its HTTP server runs.
    3. Listen, warm up (/health* answer 503 meanwhile), then log that the server is ready.
    """
    import uvicorn
    from prometheus_client import disable_created_metrics

    from model_server.sim.app import SIMULATOR_NOTICE, create_app
    from model_server.sim.engine import SimEngine

    disable_created_metrics()  # SGLang exposes no *_created series
    level = getattr(logging, settings.log_level.upper())
    logging.basicConfig(level=level, format="[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S", force=True)
    log.setLevel(logging.INFO)  # the startup lines always show
    logging.getLogger("model_server.sim").setLevel(level)
    log.info("server_args=%s", settings.server_args())
    sock = bind_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    engine = SimEngine(settings, warming_up=True)
    app = create_app(settings, engine=engine)
    config = uvicorn.Config(
        app,
        log_level=_UVICORN_LEVELS.get(settings.log_level.lower(), "info"),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="off",
    )
    server = uvicorn.Server(config)

    async def run() -> None:
        kind = "embedding" if settings.is_embedding else "completion"
        log.info(
            "%s | %s model %r as %r on %s (pid %d, api key %s)",
            SIMULATOR_NOTICE,
            kind,
            settings.model_path,
            settings.model_name,
            server_url(host, port),
            os.getpid(),
            "required" if settings.api_key else "off",
        )
        watcher = asyncio.create_task(_exit_with_parent(server))
        if settings.startup_delay_s:
            log.info("Load weight begin (simulated: %g s, not listening meanwhile)", settings.startup_delay_s)
            await asyncio.sleep(settings.startup_delay_s)
        if server.should_exit:
            return
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            await engine.warm_up()
        await task
        watcher.cancel()

    try:
        asyncio.run(run())
    finally:
        sock.close()


_UVICORN_LEVELS = {"critical": "critical", "fatal": "critical", "error": "error", "warning": "warning",
                   "warn": "warning", "info": "info", "debug": "debug", "notset": "debug"}  # fmt: skip


async def _exit_with_parent(server: object) -> None:
    """Under SimProcess: shut down when the parent (the test) is gone, so no sim outlives its test."""
    if os.environ.get(EXIT_WITH_PARENT_ENV) != "1":
        return
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(_PARENT_POLL_S)
    log.warning("model-server sim: parent process %d is gone; shutting down", parent)
    server.should_exit = True  # type: ignore[attr-defined]
    if not getattr(server, "started", False):
        os._exit(0)
