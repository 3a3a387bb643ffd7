"""`SimProcess`: a real ``python -m model_server sim`` subprocess, for tests and benchmarks.

It picks a free port, passes the API key through a 0600 ``--config`` YAML file
in a private temp dir (never argv), sends output to a log file whose tail goes
into every start error, and always cleans up: ``stop()`` ends its process
group (SIGTERM, SIGKILL after a grace period, a bounded wait); it is
idempotent and ``__exit__`` calls it.

Its argv comes from the launcher's own :func:`~model_server.launcher.command.build_command`
(a server of kind sim, as the pipeline starts for configs/local.toml), so the
simulator tests run what the pipeline runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from model_server.common.atomic import atomic_write_text
from model_server.common.processes import end_processes, tail_lines
from model_server.common.urls import bearer_headers, server_url
from model_server.config import LaunchPolicy, ServerKind, ServerSpec
from model_server.errors import SimError
from model_server.launcher.command import build_command
from model_server.sim.engine import DEFAULT_MEM_FRACTION

__all__ = ["SimProcess", "free_port"]

log = logging.getLogger(__name__)

PORT_ATTEMPTS = 3
PORT_TAKEN = "Address already in use"

_POLL_S = 0.05
_HTTP_TIMEOUT_S = 5.0
# The pipeline's size flags are left to the simulator's own defaults (its KV pool is the one it has without them).
_SIM_DEFAULTS = {
    "context_length": None, "chunked_prefill_size": None, "embedding_context_length": None,
    "embedding_chunked_prefill_size": None, "enable_metrics": False,
}  # fmt: skip


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS says is free on `host` now (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class SimProcess:
    """One simulated SGLang server in a child process."""

    def __init__(
        self,
        *,
        model_path: str = "sim/test-model",
        served_model_name: str | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        embedding: bool = False,
        api_key: str | None = None,
        args: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model_path = model_path
        self.served_model_name = served_model_name
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._port_chosen = port is None  # a free port we picked: another may take it before the sim binds it
        self.embedding = embedding
        self.api_key = api_key
        self.args = tuple(args)
        self._tmpdir: str | None = None
        self._log_given = log_path is not None
        self.log_path = Path(log_path) if log_path is not None else None
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._saved_log = ""

    # --- identity ---

    @property
    def url(self) -> str:
        return server_url(self.host, self.port)

    @property
    def base_url(self) -> str:
        return server_url(self.host, self.port, "/v1")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_path

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def __repr__(self) -> str:
        state = "running" if self.is_alive() else ("exited" if self.process else "not started")
        return f"SimProcess({self.url}, model={self.model_name!r}, {state})"

    # --- life cycle ---

    def command(self, config_path: str | None = None) -> list[str]:
        """The argv, as the launch pipeline builds it for a server of kind sim (``config_path``: the key's YAML)."""
        try:
            spec = ServerSpec(
                name=f"sim-{self.port}", group="sim", host=self.host, port=self.port, model=self.model_path,
                kind=ServerKind.embedding if self.embedding else ServerKind.completion,
                served_model_name=self.served_model_name, args=self.args,
            )  # fmt: skip
            policy = LaunchPolicy(engine="sim", bind_host=self.host, **_SIM_DEFAULTS)
        except ValidationError as err:
            raise SimError(f"{self!r}: these settings make no simulated server: {err}") from err
        return list(build_command(spec, policy, DEFAULT_MEM_FRACTION, key_file=config_path).argv)

    def start(self, ready_timeout_s: float = 30.0, *, wait: bool = True) -> SimProcess:
        """Spawn the server; with `wait` (default), poll /health until 200 (SimError with the log tail).

        A port this object chose itself may be taken by another process between the choice and the
        sim's bind (tests start many servers at once): then it starts again on another free port.
        """
        if self.process is not None:
            raise SimError(f"{self!r} was already started; create a new SimProcess")
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                return self._start_once(ready_timeout_s, wait)
            except SimError as err:
                if not (wait and self._port_chosen and attempt < PORT_ATTEMPTS and PORT_TAKEN in str(err)):
                    raise
                log.info("port %d was taken before the sim could bind it; starting on another", self.port)
                self.process, self._saved_log = None, ""
                if not self._log_given:
                    self.log_path = None
                self.port = free_port(self.host)
        raise AssertionError("unreachable")  # pragma: no cover

    def _start_once(self, ready_timeout_s: float, wait: bool) -> SimProcess:
        self._tmpdir = tempfile.mkdtemp(prefix="model-server-sim-")
        config_path = None
        if self.api_key is not None:
            config_path = os.path.join(self._tmpdir, "sim.yaml")
            # a JSON string is a YAML string
            atomic_write_text(config_path, f"api-key: {json.dumps(self.api_key)}\n", mode=0o600)
        if self.log_path is None:
            self.log_path = Path(self._tmpdir) / "sim.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", MODEL_SERVER_SIM_EXIT_WITH_PARENT="1")
        try:
            self.process = subprocess.Popen(
                self.command(config_path),
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except BaseException:
            self.stop()  # no temp dir or open log left behind
            raise
        if wait:
            try:
                self.wait_ready(ready_timeout_s)
            except BaseException:
                self.stop()
                raise
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Poll /health until it answers 200; SimError (with the log tail) on exit or deadline.

        Like SGLang, the sim refuses connections while it "loads" (--startup-delay-s) and answers
        503 while it warms up: both are "not yet", not errors.
        """
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=1.0) as client:
            while True:
                if not self.is_alive():
                    code = self.process.poll() if self.process else None
                    raise SimError(f"{self!r} exited with status {code} before it was ready:\n{self.log_tail()}")
                try:
                    if client.get(server_url(self.host, self.port, "/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SimError(f"{self!r} not ready after {timeout_s:g} s:\n{self.log_tail()}")
                time.sleep(_POLL_S)

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        """Everything the server wrote so far (also after stop())."""
        if self.log_path is not None and self.log_path.exists():
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        return self._saved_log

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` non-empty lines it wrote, for error messages."""
        return tail_lines(self.log_text(), lines) or "(no log)"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.is_alive():
            self.process.send_signal(sig)

    def suspend(self) -> None:
        self.kill(signal.SIGSTOP)

    def resume(self) -> None:
        self.kill(signal.SIGCONT)

    def wait_exit(self, timeout_s: float = 10.0) -> int | None:
        """The exit status once the process has exited, or None if it is still running at the deadline."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, SIGKILL after `grace_s`, wait; remove the temp dir. Safe to call twice."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            end_processes([proc.pid], (), grace_s, reap=[proc])  # its own group: start_new_session
        if proc is not None and proc.poll() is None:  # pragma: no cover - last resort
            proc.kill()
            proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmpdir is not None:
            if self.log_path is not None and str(self.log_path).startswith(self._tmpdir):
                self._saved_log = self.log_text()  # keep it readable after the temp dir is gone
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> SimProcess:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- run-time control ---

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        url = server_url(self.host, self.port, path)
        response = httpx.request(method, url, json=body, headers=bearer_headers(self.api_key), timeout=_HTTP_TIMEOUT_S)
        response.raise_for_status()
        return response.json()

    def set_faults(self, **faults: Any) -> dict:
        """Switch faults on or off at run time (names as in model_server.sim.faults.Faults)."""
        return self._call("POST", "/sim/faults", faults)

    def reset_faults(self) -> dict:
        return self._call("POST", "/sim/reset")

    def faults(self) -> dict:
        return self._call("GET", "/sim/faults")

    def stats(self) -> dict:
        return self._call("GET", "/sim/stats")
