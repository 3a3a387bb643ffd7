"""One server's supervision: wait for its GPUs, spawn, readiness, watch, restart, stop.

A :class:`ServerSupervisor` runs in its own thread (one per server, see
pipeline.py). Its decisions come from :mod:`model_server.launcher.lifecycle`; every
OS call goes through :class:`Deps`, so a test can replace the spawner, the
prober, the GPU inventory and the clock. Stopping is done from outside:
:meth:`ServerSupervisor.request_stop` hands the running engine over and the
pipeline kills it, so a probe waiting for its timeout never delays Ctrl-C.

One start, in order: wait until the GPUs are free (naming who holds them, where
NVML can tell); check the port (taken at the first start: refused at once; at
a restart: one failed attempt of the restart budget, with its backoff); write
the 0600 key file; spawn (output through a redacting log pump, every process
tagged with ``MODEL_SERVER_ENGINE``); wait for ``/health_generate`` (a refused
connection or a 503 is "still loading"); remove the key file and record the
engine's workers; watch. A crash, a hang (``health_failures_to_restart``
failed probes in a row, see :func:`hang_bounds_s`) or a startup timeout kills
the engine's process group and tagged processes and restarts it with backoff,
until ``max_restarts`` in ``restart_window_s``: then FAILED.

The launcher's errors (see errors.py) are all one class, each message naming
the server and the fix::

    LaunchError   no server for this host, NVML missing, GPU wait timed out,
                  GPU memory short, port in use, crash loop, key file or log
                  unwritable, another pipeline owns the status file, a
                  damaged status file
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

from model_server.launcher import processes as procs, rundir
from model_server.config import LaunchPolicy, ServerSpec
from model_server.errors import LaunchError
from model_server.launcher.gpu import GpuInventory, GpuProcess, GpuReading, busy_gpus, choose_mem_fraction, gpu_processes
from model_server.launcher.command import build_command
from model_server.launcher.redact import Redactor, Secret
from model_server.launcher.lifecycle import RestartHistory, ServerState, decide_after_failure, transition
from model_server.launcher.status_file import StatusBoard, Worker

__all__ = ["Deps", "ServerSupervisor", "hang_bounds_s", "health_url", "probe_health"]

log = logging.getLogger(__name__)
S = ServerState
PROGRESS_EVERY_S = 10.0
PORT_SETTLE_S = 1.0  # a restart looks at a busy port this long before counting it as a failed attempt
READY_POLL_S = 0.25  # while an engine starts: a refused connection or a 503 costs nothing, so look often
RECORD_WORKERS_EVERY_S = 5.0  # while an engine loads, how often its workers are looked up for the status file
LOG_DRAIN_S = 1.0  # after an engine exits, how long its log pump may take to write its last lines


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
    """GET /health_generate: (True, "") on 200, else (False, why).

    A refused connection is what an engine does while it loads its weights
    (SGLang listens only once loaded), and a 503 what it does while it warms
    up; both are "not ready", never a crash (the caller watches the process).
    """
    import httpx  # noqa: PLC0415

    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.TimeoutException:
        return False, f"no answer within {timeout_s:g} s"
    except httpx.ConnectError as err:
        if "refused" in str(err).lower():
            return False, "connection refused: nothing listens there"
        return False, f"ConnectError: {err}"
    except httpx.HTTPError as err:
        return False, f"{type(err).__name__}: {err}"
    if response.status_code == 200:
        return True, ""
    if response.status_code == 503:
        return False, "status 503 (loading or warming up)"
    return False, f"status {response.status_code}"


def hang_bounds_s(policy: LaunchPolicy) -> tuple[float, float]:
    """How long after an engine stops answering it is declared hung: (soonest, latest), in seconds.

    Probes run ``health_interval_s`` apart (from the end of one to the start
    of the next) and a probe of a hung engine takes ``health_timeout_s``;
    ``health_failures_to_restart`` failures in a row mean hung. Soonest: the
    engine stopped while a probe was waiting for its answer, just before that
    probe's timeout; latest: a probe had just succeeded.
    """
    n, t, i = policy.health_failures_to_restart, policy.health_timeout_s, policy.health_interval_s
    return (n - 1) * (t + i), n * (t + i)


@dataclass
class Deps:
    """The supervisor's seams: every OS call and the clock."""

    inventory: GpuInventory
    probe: Callable[[str, float], tuple[bool, str]] = probe_health
    spawn: Callable[..., Any] = procs.spawn_engine
    kill_groups: Callable[..., Any] = procs.kill_groups
    port_in_use: Callable[[str, int], bool] = procs.port_in_use
    port_holder: Callable[[str, int], str] = procs.port_holder
    descendants: Callable[[int], list[tuple[int, float]]] = procs.descendants
    gpu_processes: Callable[[object, Sequence[int]], list[GpuProcess]] = gpu_processes
    describe_pid: Callable[..., str] = procs.describe_pid
    engine_tag: Callable[[int], str | None] = procs.engine_tag
    clock: Callable[[], float] = time.monotonic
    rand: Callable[[], float] = random.random
    create_time: Callable[[int], float | None] = field(default=lambda pid: process_create_time(pid))
    write_key_file: Callable[[Path, str], Any] = rundir.write_key_file
    remove_key_file: Callable[[Path], None] = rundir.remove_key_file


def process_create_time(pid: int) -> float | None:
    """psutil's start time of ``pid`` (with the pid, it names one process for the stale-run cleanup)."""
    import psutil  # noqa: PLC0415

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class _Stopped(Exception):
    """The pipeline is stopping: leave the loop."""


class _PortBusy(Exception):
    """The server's port is taken by another process (the message says by whom)."""


class ServerSupervisor:
    """Keeps one server up until stopped or FAILED; :meth:`run` returns the final state.

    ``key`` is the API key (a :class:`Secret`), written to ``key_file`` just
    before each spawn and removed once the engine answers or exits. ``tag``
    marks every process of this server's engines (procs.py); ``redactor``
    cleans its log.
    """

    def __init__(
        self,
        spec: ServerSpec,
        policy: LaunchPolicy,
        board: StatusBoard,
        deps: Deps,
        log_file: Path,
        key_file: Path | None = None,
        drop_env: Sequence[str] = (),
        *,
        key: Secret | None = None,
        redactor: Redactor | None = None,
        tag: str | None = None,
    ) -> None:
        self.spec = spec
        self.policy = policy
        self.board = board
        self.deps = deps
        self.log_file = log_file
        self.key_file = key_file if key is not None else None
        self.key = key
        self.drop_env = tuple(drop_env)
        self.redactor = redactor or Redactor([key] if key else [])
        self.tag = tag
        self.state = S.WAITING_GPU
        self._stop = threading.Event()
        self._lock = threading.Lock()  # spawn vs. stop
        self._proc: subprocess.Popen[bytes] | None = None
        self._workers: tuple[Worker, ...] = ()
        self._history = RestartHistory()
        self._url = health_url(policy.bind_host, spec.port)
        self.port_settle_s = PORT_SETTLE_S

    def __repr__(self) -> str:
        return f"ServerSupervisor({self.spec.name!r}, {self.state.value})"

    # ---- called from other threads -------------------------------------------------

    def request_stop(self) -> subprocess.Popen[bytes] | None:
        """Stop spawning; hand over the running engine: the caller kills it (one SIGTERM, not two).

        A second SIGTERM would make some servers (uvicorn's) skip their graceful shutdown.
        """
        with self._lock:
            self._stop.set()
            proc, self._proc = self._proc, None
            return proc

    def owns_tag(self, tag: str) -> bool:
        return self.tag is not None and tag == self.tag

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
                self._set(S.STOPPED, pid=None, create_time=None, pgid=None, workers=())
        except LaunchError as err:
            self._kill()
            self._fail(str(err))
        except Exception as err:  # a bug must not leave an engine behind or kill other servers
            log.exception("server %s: supervisor error", self.spec.name)
            self._kill()
            self._fail(f"supervisor error: {type(err).__name__}: {err}")
        finally:
            self._remove_key_file()
        return self.state

    def _fail(self, reason: str) -> None:
        reason = self.redactor.redact(reason)  # a holder's command line, a log tail: never a secret
        if self.state is not S.FAILED and self.state is not S.STOPPED:
            self._set(S.FAILED, reason, last_error=reason, pid=None, create_time=None, pgid=None, workers=())

    def _loop(self) -> None:
        first = True
        while True:
            readings = self._wait_for_gpus()
            mem_fraction = choose_mem_fraction(self.policy.mem_fraction_policy, readings, self.spec.name)
            port_busy = False
            try:
                self._check_port(first)
                proc = self._spawn(mem_fraction)
                cause = self._wait_ready(proc)
                if cause is None:
                    self._remove_key_file()  # the engine has read it: it answers
                    self._record_workers(proc)
                    self._set(S.READY, f"pid {proc.pid}")
                    cause = self._watch(proc)
                if self._stop.is_set():
                    raise _Stopped  # the engine died because the pipeline is stopping it
                self._kill()
            except _PortBusy as busy:
                port_busy, cause = True, str(busy)
            decision = decide_after_failure(
                self._history,
                self.deps.clock(),
                cause=cause,
                max_restarts=self.policy.max_restarts,
                window_s=self.policy.restart_window_s,
                backoff_initial_s=self.policy.restart_backoff_initial_s,
                backoff_max_s=self.policy.restart_backoff_max_s,
                rand=self.deps.rand,
                **(
                    {"label": "gave up", "fix": f"Stop that process or give this server another port, then start the pipeline again"}
                    if port_busy
                    else {}
                ),
            )  # fmt: skip
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
                pgid=None,
                workers=(),
            )
            self._sleep(decision.delay_s)
            first = False

    def _describe_busy(self, busy: list[GpuReading]) -> str:
        """'GPU 1: 30000 of 81920 MiB used (pid 12 holds 29000 MiB of GPU 1: python ...)' where NVML says who."""
        holders = self.deps.gpu_processes(self.deps.inventory, [r.index for r in busy])
        owner = self.tag.split("/", 1)[0] if self.tag else None
        parts = []
        for r in busy:
            mine = [h for h in holders if h.index == r.index]
            who = "; ".join(f"{h.describe()}: {self.deps.describe_pid(h.pid, owner)}" for h in mine[:3])
            parts.append(r.describe() + (f" ({who})" if who else ""))
        return self.redactor.redact("; ".join(parts))

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
            what = self._describe_busy(busy)
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

    def _check_port(self, first: bool) -> None:
        """Refuse at once on the first start (a port of another program is a table mistake); on a restart
        give it PORT_SETTLE_S, then raise _PortBusy: one failed attempt of the restart budget."""
        host, port = self.policy.bind_host, self.spec.port
        deadline = self.deps.clock() + (0.0 if first else self.port_settle_s)
        while self.deps.port_in_use(host, port):
            if self.deps.clock() >= deadline:
                holder = self.deps.port_holder(host, port)
                by = f" ({holder})" if holder else ""
                if first:
                    raise LaunchError(
                        f"server '{self.spec.name}': port {port} on {host} is already in use by another process{by}. "
                        f"Stop that process (see `ss -ltnp 'sport = :{port}'`) or give this server another port"
                    )
                raise _PortBusy(self.redactor.redact(f"port {port} on {host} is in use by another process{by}"))
            self._sleep(0.1)

    def _spawn(self, mem_fraction: float) -> subprocess.Popen[bytes]:
        key_file = str(self.key_file) if self.key_file is not None else None
        command = build_command(self.spec, self.policy, mem_fraction, key_file=key_file)
        with self._lock:
            if self._stop.is_set():
                raise _Stopped
            if self.key_file is not None and self.key is not None:
                self.deps.write_key_file(self.key_file, self.key.value)
            try:
                self._proc = self.deps.spawn(command, self.log_file, self.drop_env, redactor=self.redactor, tag=self.tag)
            except OSError as err:
                self._remove_key_file()
                raise LaunchError(f"server '{self.spec.name}': cannot start {command.argv[0]}: {err}") from err
            except BaseException:
                self._remove_key_file()
                raise
        pid = self._proc.pid
        self._workers = ()
        self._set(
            S.STARTING, f"pid {pid}, log {self.log_file}", pid=pid, create_time=self.deps.create_time(pid), pgid=pid,
            tag=self.tag, workers=(),
        )  # fmt: skip
        return self._proc

    def _record_workers(self, proc: subprocess.Popen[bytes]) -> None:
        """Put the engine's descendants (pid, start time) in the status file when they changed."""
        workers = tuple(Worker(pid, t) for pid, t in self.deps.descendants(proc.pid))
        if {w.pid for w in workers} != {w.pid for w in self._workers}:
            self._workers = workers
            self.board.update(self.spec.name, workers=workers)

    def _drain_log(self, proc: subprocess.Popen[bytes]) -> None:
        pump = getattr(proc, "log_pump", None)
        if pump is not None:
            pump.join(LOG_DRAIN_S)

    def _exit_cause(self, proc: subprocess.Popen[bytes]) -> str:
        code = proc.returncode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        self._drain_log(proc)  # its last lines say why
        tail = procs.log_tail(self.log_file)
        return self.redactor.redact(f"the engine exited ({how})" + (f"; log: {tail}" if tail else ""))

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> str | None:
        """None once /health_generate answers 200; else why not (exit or startup timeout).

        Connection refused (still loading) and 503 (warming up) mean "poll
        again"; only the process's exit or the startup timeout end the wait.
        """
        started = self.deps.clock()
        deadline = started + self.policy.startup_timeout_s
        next_progress = started + PROGRESS_EVERY_S
        next_record = started + RECORD_WORKERS_EVERY_S
        interval = min(READY_POLL_S, self.policy.health_interval_s)
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
                normal = " (normal while it loads)" if "refused" in why or "503" in why else ""
                log.info(
                    "server %s: not ready yet: %s%s; %.0f s of %g s", self.spec.name, why, normal, now - started,
                    self.policy.startup_timeout_s,
                )  # fmt: skip
                next_progress = now + PROGRESS_EVERY_S
            if now >= next_record:  # SGLang starts its workers while it loads, which may take minutes
                self._record_workers(proc)
                next_record = now + RECORD_WORKERS_EVERY_S
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
                self._record_workers(proc)
                continue
            failures += 1
            log.warning("server %s: health probe %d/%d failed: %s", self.spec.name, failures, self.policy.health_failures_to_restart, why)
            if failures >= self.policy.health_failures_to_restart:
                return f"hung: {failures} health probes failed in a row (last: {why})"

    def _remove_key_file(self) -> None:
        if self.key_file is not None:
            self.deps.remove_key_file(self.key_file)

    def _kill(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            tags = self.owns_tag if self.tag is not None else None
            self.deps.kill_groups([proc.pid], self.policy.stop_grace_s, reap=[proc], tags=tags)
            self._drain_log(proc)
        self._remove_key_file()
