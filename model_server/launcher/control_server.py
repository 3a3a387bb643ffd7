"""The control API's HTTP server: uvicorn in a thread of the pipeline's process, started and stopped with deadlines.

uvicorn installs no signal handlers outside the main thread, so the pipeline
keeps its own (Ctrl-C stops the fleet, then this server).
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn
from fastapi import FastAPI

from model_server.errors import LaunchError
from model_server.launcher import processes as procs

__all__ = ["ControlServer"]

log = logging.getLogger(__name__)
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
POLL_S = 0.02


class ControlServer:
    """Serves ``app`` on ``host:port`` from a daemon thread; :meth:`start` returns once it listens."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.host, self.port = host, port
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="control-api", daemon=True)

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """LaunchError if the port is taken or the server is not listening within ``timeout_s``."""
        fix = "Stop that process, or give launch.control_port another port"
        if procs.port_in_use(self.host, self.port):
            raise LaunchError(f"the control API's port {self.port} on {self.host} is already in use. {fix}")
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise LaunchError(f"the control API could not listen on {self.host}:{self.port} (see the log). {fix}")
            if time.monotonic() > deadline:
                self.stop()
                raise LaunchError(f"the control API did not listen on {self.host}:{self.port} within {timeout_s:g} s")
            time.sleep(POLL_S)
        log.info("control API on http://%s:%d (GET /status, /events, /metrics)", self.host, self.port)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Ask it to finish (open connections get ``timeout_s``), then make it."""
        if not self._thread.is_alive():
            return
        self._server.should_exit = True
        self._thread.join(timeout_s / 2)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout_s / 2)
        if self._thread.is_alive():
            log.warning("the control API's thread did not end within %g s; it ends with the process", timeout_s)
