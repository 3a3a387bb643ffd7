"""Run the simulated engine under uvicorn, in the foreground, until SIGINT/SIGTERM.

The socket is bound here first, so a port in use is one clear error (exit 2)
rather than a uvicorn traceback, and ``--port 0`` picks a free port that the
startup line reports. Access logs are off and uvicorn logs at the chosen level
(warning by default) to keep the per-request path lean.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from model_server.sim.settings import SimError, SimSettings

__all__ = ["bind_socket", "serve"]

log = logging.getLogger(__name__)
EXIT_WITH_PARENT_ENV = "MODEL_SERVER_SIM_EXIT_WITH_PARENT"  # set by SimProcess: no orphan if the test dies
GRACEFUL_SHUTDOWN_S = 1  # in-flight (possibly hung) requests are dropped after this


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
    """Serve until stopped. Logs one startup line that says this is a simulator."""
    import uvicorn
    from prometheus_client import disable_created_metrics

    from model_server.sim.app import SIMULATOR_NOTICE, create_app

    disable_created_metrics()  # SGLang exposes no *_created series
    level = settings.log_level.upper()
    logging.getLogger("model_server.sim").setLevel(level)
    log.setLevel(logging.INFO)  # the startup line always shows
    sock = bind_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="off",
    )
    server = uvicorn.Server(config)

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            kind = "embedding" if settings.is_embedding else "completion"
            state = "ready"
            if settings.startup_delay_s:
                state = f"loading for {settings.startup_delay_s:g} s (503 until then)"
            log.info(
                "%s | serving %s model %r as %r on http://%s:%d (pid %d, api key %s); %s",
                SIMULATOR_NOTICE,
                kind,
                settings.model_path,
                settings.model_name,
                host,
                port,
                os.getpid(),
                "required" if settings.api_key else "off",
                state,
            )
            if settings.startup_delay_s:
                delay_s = max(0.0, app.state.engine.ready_at - app.state.engine.clock())
                asyncio.get_running_loop().call_later(delay_s, log.info, "model-server sim: loaded; ready")
        if os.environ.get(EXIT_WITH_PARENT_ENV) == "1":
            parent = os.getppid()
            while not task.done():
                if os.getppid() != parent:
                    log.warning("model-server sim: parent process %d is gone; shutting down", parent)
                    server.should_exit = True
                    break
                await asyncio.wait({task}, timeout=1.0)
        await task

    try:
        asyncio.run(run())
    finally:
        sock.close()
