"""One server's supervision: wait for its GPUs, spawn, readiness, watch, restart, stop.

A :class:`ServerSupervisor` runs in its own thread (one per server, see
pipeline.py). Its decisions come from :mod:`model_server.server_state`; every
OS call goes through :class:`Deps`, so a test can replace the spawner, the
prober, the GPU inventory and the clock. Stopping is done from outside:
:meth:`ServerSupervisor.request_stop` returns the running engine and the
pipeline kills its process group, so a probe waiting for its timeout never
delays Ctrl-C.

The launcher's errors (see errors.py) are all one class, each message naming
the server and the fix::

    LaunchError   no server for this host, NVML missing, GPU wait timed out,
                  GPU memory short, port in use, crash loop, key file unwritable
    ConfigError   the table itself, or --only naming no server of it
"""

from __future__ import annotations

import logging
import random
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from model_server import procs
from model_server.config import LaunchPolicy, ServerSpec
from model_server.errors import LaunchError
from model_server.gpu import GpuInventory, GpuReading, busy_gpus, choose_mem_fraction
from model_server.launch import build_command
from model_server.server_state import RestartHistory, ServerState, decide_after_failure, transition
from model_server.status import StatusBoard

__all__ = ["Deps", "ServerSupervisor", "health_url", "probe_health"]

log = logging.getLogger(__name__)
S = ServerState
PROGRESS_EVERY_S = 10.0


def health_url(host: str, port: int) -> str:
    """The readiness URL; a wildcard bind address is probed on loopback."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/health_generate"


def probe_health(url: str, timeout_s: float) -> tuple[bool, str]:
    """GET /health_generate: (True, "") on 200, else (False, why)."""
    import httpx  # noqa: PLC0415

    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.TimeoutException:
        return False, f"no answer within {timeout_s:g} s"
    except httpx.HTTPError as err:
        return False, f"{type(err).__name__}: {err}"
    if response.status_code == 200:
        return True, ""
    return False, f"status {response.status_code}"


@dataclass
class Deps:
    """The supervisor's seams: every OS call and the clock."""

    inventory: GpuInventory
    probe: Callable[[str, float], tuple[bool, str]] = probe_health
    spawn: Callable[..., Any] = procs.spawn_engine
    kill_groups: Callable[..., Any] = procs.kill_groups
    port_in_use: Callable[[str, int], bool] = procs.port_in_use
    clock: Callable[[], float] = time.monotonic
    rand: Callable[[], float] = random.random
    create_time: Callable[[int], float | None] = field(default=lambda pid: process_create_time(pid))


def process_create_time(pid: int) -> float | None:
    """psutil's start time of ``pid`` (with the pid, it names one process for the stale-run cleanup)."""
    import psutil  # noqa: PLC0415

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class _Stopped(Exception):
    """The pipeline is stopping: leave the loop."""


class ServerSupervisor:
    """Keeps one server up until stopped or FAILED; :meth:`run` returns the final state."""

    def __init__(
        self,
        spec: ServerSpec,
        policy: LaunchPolicy,
        board: StatusBoard,
        deps: Deps,
        log_file: Path,
        key_file: Path | None = None,
        drop_env: Sequence[str] = (),
    ) -> None:
        self.spec = spec
        self.policy = policy
        self.board = board
        self.deps = deps
        self.log_file = log_file
        self.key_file = key_file
        self.drop_env = tuple(drop_env)
        self.state = S.WAITING_GPU
        self._stop = threading.Event()
        self._lock = threading.Lock()  # spawn vs. stop
        self._proc: subprocess.Popen[bytes] | None = None
        self._history = RestartHistory()
        self._url = health_url(policy.bind_host, spec.port)

    # ---- called from other threads -------------------------------------------------

    def request_stop(self) -> subprocess.Popen[bytes] | None:
        """Stop spawning; return the running engine (the caller kills its group)."""
        with self._lock:
            self._stop.set()
            return self._proc

    # ---- the loop ----------------------------------------------------------------------

    def _set(self, new: ServerState, detail: str = "", **fields: Any) -> None:
        old = self.state
        if new is not old:
            self.state = transition(old, new)
            level = logging.ERROR if new is S.FAILED else logging.INFO
            log.log(level, "server %s: %s -> %s%s", self.spec.name, old.value, new.value, f" ({detail})" if detail else "")
        self.board.update(self.spec.name, state=new.value, **fields)

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(max(0.0, seconds)):
            raise _Stopped

    def run(self) -> ServerState:
        try:
            self._loop()
        except _Stopped:
            self._kill()
            if self.state is not S.FAILED:
                self._set(S.STOPPED, pid=None, create_time=None)
        except LaunchError as err:
            self._kill()
            self._fail(str(err))
        except Exception as err:  # a bug must not leave an engine behind or kill other servers
            log.exception("server %s: supervisor error", self.spec.name)
            self._kill()
            self._fail(f"supervisor error: {type(err).__name__}: {err}")
        return self.state

    def _fail(self, reason: str) -> None:
        if self.state is not S.FAILED and self.state is not S.STOPPED:
            self._set(S.FAILED, reason, last_error=reason, pid=None, create_time=None)

    def _loop(self) -> None:
        first = True
        while True:
            readings = self._wait_for_gpus()
            mem_fraction = choose_mem_fraction(self.policy.mem_fraction_policy, readings, self.spec.name)
            self._wait_port(first)
            proc = self._spawn(mem_fraction)
            cause = self._wait_ready(proc)
            if cause is None:
                self._set(S.READY, f"pid {proc.pid}")
                cause = self._watch(proc)
            if self._stop.is_set():
                raise _Stopped  # the engine died because the pipeline is stopping it
            self._kill()
            decision = decide_after_failure(
                self._history,
                self.deps.clock(),
                cause=cause,
                max_restarts=self.policy.max_restarts,
                window_s=self.policy.restart_window_s,
                backoff_initial_s=self.policy.restart_backoff_initial_s,
                backoff_max_s=self.policy.restart_backoff_max_s,
                rand=self.deps.rand,
            )
            if not decision.restart:
                raise LaunchError(f"server '{self.spec.name}': {decision.reason}")
            self._history = decision.history
            self._set(
                S.RESTARTING,
                f"{cause}; restart {decision.attempt} in {decision.delay_s:.1f} s",
                restarts=self._history.total,
                last_error=cause,
                pid=None,
                create_time=None,
            )
            self._sleep(decision.delay_s)
            first = False

    def _wait_for_gpus(self) -> list[GpuReading]:
        """Readings of the server's GPUs once all are free; LaunchError at the deadline."""
        started = self.deps.clock()
        timeout = self.policy.gpu_wait_timeout_s
        while True:
            readings = self.deps.inventory.read(self.spec.gpus)
            busy = busy_gpus(readings, self.policy.gpu_free_threshold_mib)
            if not busy:
                return readings
            waited = self.deps.clock() - started
            what = "; ".join(r.describe() for r in busy)
            if timeout is not None and waited >= timeout:
                raise LaunchError(
                    f"server '{self.spec.name}': its GPUs stayed busy for {waited:.0f} s ({what}; a GPU is free below "
                    f"{self.policy.gpu_free_threshold_mib} MiB used) and launch.gpu_wait_timeout_s is {timeout:g}. "
                    f"Free the GPUs or raise the timeout"
                )
            if self.state is not S.WAITING_GPU:
                self._set(S.WAITING_GPU, what)
            log.info("server %s: waiting for GPUs (%s), %.0f s so far", self.spec.name, what, waited)
            self._sleep(self.policy.gpu_poll_interval_s)

    def _wait_port(self, first: bool) -> None:
        host, port = self.policy.bind_host, self.spec.port
        deadline = self.deps.clock() + (0 if first else max(5.0, self.policy.stop_grace_s))
        while self.deps.port_in_use(host, port):
            if self.deps.clock() >= deadline:
                raise LaunchError(
                    f"server '{self.spec.name}': port {port} on {host} is already in use by another process. "
                    f"Stop that process (see `ss -ltnp 'sport = :{port}'`) or give this server another port"
                )
            self._sleep(0.2)

    def _spawn(self, mem_fraction: float) -> subprocess.Popen[bytes]:
        key = str(self.key_file) if self.key_file is not None else None
        command = build_command(self.spec, self.policy, mem_fraction, key_file=key)
        with self._lock:
            if self._stop.is_set():
                raise _Stopped
            try:
                self._proc = self.deps.spawn(command, self.log_file, self.drop_env)
            except OSError as err:
                raise LaunchError(f"server '{self.spec.name}': cannot start {command.argv[0]}: {err}") from err
        pid = self._proc.pid
        self._set(S.STARTING, f"pid {pid}, log {self.log_file}", pid=pid, create_time=self.deps.create_time(pid))
        return self._proc

    def _exit_cause(self, proc: subprocess.Popen[bytes]) -> str:
        code = proc.returncode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        tail = procs.log_tail(self.log_file)
        return f"the engine exited ({how})" + (f"; log: {tail}" if tail else "")

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> str | None:
        """None once /health_generate answers 200; else why not (exit or startup timeout)."""
        started = self.deps.clock()
        deadline = started + self.policy.startup_timeout_s
        next_progress = started + PROGRESS_EVERY_S
        interval = min(1.0, self.policy.health_interval_s)
        while True:
            if proc.poll() is not None:
                return self._exit_cause(proc)
            now = self.deps.clock()
            if now >= deadline:
                return f"no 200 from {self._url} within the startup timeout of {self.policy.startup_timeout_s:g} s"
            ok, why = self.deps.probe(self._url, max(0.1, min(self.policy.health_timeout_s, deadline - now)))
            if ok:
                return None
            now = self.deps.clock()
            if now >= next_progress:
                log.info("server %s: not ready yet (%s), %.0f s of %g s", self.spec.name, why, now - started, self.policy.startup_timeout_s)
                next_progress = now + PROGRESS_EVERY_S
            self._sleep(interval)

    def _watch(self, proc: subprocess.Popen[bytes]) -> str:
        """Return why the server must restart: exit, or too many failed probes in a row."""
        failures = 0
        next_probe = self.deps.clock() + self.policy.health_interval_s
        while True:
            if proc.poll() is not None:
                return self._exit_cause(proc)
            if self.deps.clock() < next_probe:
                self._sleep(min(0.2, next_probe - self.deps.clock()))
                continue
            ok, why = self.deps.probe(self._url, self.policy.health_timeout_s)
            next_probe = self.deps.clock() + self.policy.health_interval_s
            if proc.poll() is not None:
                return self._exit_cause(proc)
            if ok:
                failures = 0
                continue
            failures += 1
            log.warning("server %s: health probe %d/%d failed: %s", self.spec.name, failures, self.policy.health_failures_to_restart, why)
            if failures >= self.policy.health_failures_to_restart:
                return f"hung: {failures} health probes failed in a row (last: {why})"

    def _kill(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            self.deps.kill_groups([proc.pid], self.policy.stop_grace_s, reap=[proc])
