"""One server's supervision: the thin loop that performs what the pure step decides.

A :class:`ServerSupervisor` runs in its own thread (one per server, see
pipeline.py). Every decision (wait for GPUs, the port, readiness, hang,
restart with backoff, FAILED) is made by :func:`model_server.launcher.steps.step`;
this loop only reads events (a GPU reading, a port check, a probe's answer,
the engine's exit, the timer, a stop), calls the step, and performs its
actions (:mod:`model_server.launcher.events`). Every OS call goes through
:class:`Deps`, the clock and the wait included, so a test can replace the
spawner, the prober, the GPU inventory and time itself.

Stopping is done from outside: :meth:`ServerSupervisor.request_stop` hands the
running engine over and the pipeline kills it, so a probe waiting for its
timeout never delays Ctrl-C; every wait here is on the stop event
(``threading.Event.wait``), so a stop is seen at once.

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
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_server.common.http_failure import describe_http_failure
from model_server.common.processes import create_time, log_tail
from model_server.config import LaunchPolicy, ServerSpec
from model_server.errors import LaunchError
from model_server.launcher import events as ev
from model_server.launcher import processes as procs
from model_server.launcher import rundir
from model_server.launcher.engine_metrics import read_running_requests
from model_server.launcher.events_file import EventLog
from model_server.launcher.gpu import GpuInventory, gpu_processes
from model_server.launcher.gpu_memory import GpuProcess, busy_gpus
from model_server.launcher.lifecycle import ServerState
from model_server.launcher.metrics import PipelineMetrics
from model_server.launcher.redact import Redactor, Secret
from model_server.launcher.status_file import StatusBoard, Worker
from model_server.launcher.steps import PORT_SETTLE_S, Settings, Supervision, step

__all__ = ["Deps", "ServerSupervisor", "probe_health"]

log = logging.getLogger(__name__)
S = ServerState
LOG_DRAIN_S = 1.0  # after an engine exits, how long its log pump may take to write its last lines
LOG_TAIL_CHARS = 300  # of the engine's last log line, in the reason of a restart
WAIT_SLICE_S = 0.2  # while waiting: how often the engine's exit is looked for (a stop is seen at once)


def probe_health(url: str, timeout_s: float) -> tuple[bool, str]:
    """GET /health_generate: (True, "") on 200, else (False, why).

    A refused connection is what an engine does while it loads its weights
    (SGLang listens only once loaded), and a 503 what it does while it warms
    up; both are "not ready", never a crash (the caller watches the process).
    """
    import httpx  # noqa: PLC0415

    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as err:
        return False, describe_http_failure(err, timeout_s)
    if response.status_code == 200:
        return True, ""
    if response.status_code == 503:
        return False, "status 503 (loading or warming up)"
    return False, f"status {response.status_code}"


@dataclass
class Deps:
    """The supervisor's seams: every OS call, the clock and the wait (``wait(stop_event, timeout_s) -> stopped``)."""

    inventory: GpuInventory
    probe: Callable[[str, float], tuple[bool, str]] = probe_health
    read_running: Callable[[str, float, str | None], tuple[int | None, str]] = read_running_requests
    spawn: Callable[..., Any] = procs.spawn_engine
    kill_groups: Callable[..., Any] = procs.kill_groups
    port_in_use: Callable[[str, int], bool] = procs.port_in_use
    port_holder: Callable[[str, int], str] = procs.port_holder
    descendants: Callable[[int], list[tuple[int, float]]] = procs.descendants
    gpu_processes: Callable[[object, Sequence[int]], list[GpuProcess]] = gpu_processes
    describe_pid: Callable[..., str] = procs.describe_pid
    engine_tag: Callable[[int], str | None] = procs.engine_tag
    clock: Callable[[], float] = time.monotonic
    wait: Callable[[threading.Event, float], bool] = threading.Event.wait
    rand: Callable[[], float] = random.random
    create_time: Callable[[int], float | None] = create_time
    write_key_file: Callable[[Path, str], Any] = rundir.write_key_file
    remove_key_file: Callable[[Path], None] = rundir.remove_key_file


class ServerSupervisor:
    """Keeps one server up until stopped or FAILED; :meth:`run` returns the final state.

    ``key`` is the API key (a :class:`Secret`), written to ``key_file`` just
    before each spawn and removed once the engine answers or exits. ``tag``
    marks every process of this server's engines (processes.py); ``redactor``
    cleans its log and every message it writes. ``events`` records its
    transitions (the log, and the pipeline's events file); ``metrics`` times
    its probes. The control API hands it commands with :meth:`submit`.
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
        events: EventLog | None = None,
        metrics: PipelineMetrics | None = None,
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
        self.events = events or EventLog(redact=self.redactor.redact)
        self.metrics = metrics
        self._commands: deque[ev.Command] = deque()  # from the control API's threads; taken at a Wait
        self.state = S.WAITING_GPU
        self.port_settle_s = PORT_SETTLE_S
        self._stop = threading.Event()
        self._lock = threading.Lock()  # spawn vs. stop
        self._proc: subprocess.Popen[bytes] | None = None  # the engine to kill (handed over on a stop)
        self._watched: subprocess.Popen[bytes] | None = None  # the engine whose exit is an event
        self._workers: tuple[Worker, ...] = ()
        self._perform: dict[Any, Callable[[Any], ev.Event | None]] = {
            ev.ReadGpus: self._read_gpus, ev.CheckPort: self._check_port, ev.Spawn: self._spawn, ev.Probe: self._probe,
            ev.ReadRunning: self._read_running,
            ev.Wait: self._wait, ev.Publish: self._publish, ev.Note: self._note,
            ev.BareAction.KILL_ENGINE: lambda _a: self._kill(),
            ev.BareAction.REMOVE_KEY_FILE: lambda _a: self._remove_key_file(),
            ev.BareAction.RECORD_WORKERS: lambda _a: self._record_workers(),
        }  # fmt: skip

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

    def submit(self, command: ev.Command) -> None:
        """Hand the step a command (drain, restart, ...); it arrives at the next Wait, within WAIT_SLICE_S."""
        self._commands.append(command)

    def owns_tag(self, tag: str) -> bool:
        return self.tag is not None and tag == self.tag

    # ---- the loop ----------------------------------------------------------------------

    def settings(self) -> Settings:
        return Settings(
            self.spec, self.policy, str(self.log_file), self.deps.rand,
            key_file=str(self.key_file) if self.key_file is not None else None, tag=self.tag,
            port_settle_s=self.port_settle_s,
        )  # fmt: skip

    def run(self) -> ServerState:
        state = Supervision(self.settings())
        event: ev.Event | None = ev.BareEvent.TICK
        try:
            while not state.done:
                if event is None:
                    raise RuntimeError(f"no event to step on in {state.phase}")
                state, actions = step(state, event, self.deps.clock())
                event = self._perform_all(actions)
        except Exception as err:  # a bug must not leave an engine behind or kill other servers
            log.exception("server %s: supervisor error", self.spec.name)
            self._kill()
            self._fail(f"supervisor error: {type(err).__name__}: {err}")
        finally:
            self._remove_key_file()
        return self.state

    def _perform_all(self, actions: Sequence[ev.Action]) -> ev.Event | None:
        """Perform in order; the answer of the last asking action is the next event (a LaunchError: Refused)."""
        event = None
        for action in actions:
            try:
                perform = self._perform[action if isinstance(action, ev.BareAction) else type(action)]
                event = perform(action) or event
            except LaunchError as err:
                return ev.Refused(str(err))
        return event

    def _interrupt(self) -> ev.Event | None:
        """What overrides any answer: a stop, then the engine's exit."""
        if self._stop.is_set():
            return ev.BareEvent.STOP_REQUESTED
        proc = self._watched
        if proc is not None and proc.poll() is not None:
            self._drain_log(proc)  # its last lines say why
            tail = log_tail(self.log_file)[-LOG_TAIL_CHARS:]
            return ev.EngineExited(proc.returncode, self.redactor.redact(tail))
        return None

    # ---- the actions --------------------------------------------------------------------

    def _read_gpus(self, action: ev.ReadGpus) -> ev.Event:
        readings = tuple(self.deps.inventory.read(list(action.indices)))
        busy = busy_gpus(readings, action.free_below_mib)
        holders: tuple[tuple[GpuProcess, str], ...] = ()
        if busy:  # who holds them, where NVML can tell
            owner = self.tag.split("/", 1)[0] if self.tag else None
            found = self.deps.gpu_processes(self.deps.inventory, [r.index for r in busy])
            holders = tuple((h, self.redactor.redact(self.deps.describe_pid(h.pid, owner))) for h in found)
        return self._interrupt() or ev.GpusRead(readings, holders)

    def _check_port(self, action: ev.CheckPort) -> ev.Event:
        in_use = self.deps.port_in_use(action.host, action.port)
        holder = None
        if in_use and action.name_holder:
            holder = self.redactor.redact(self.deps.port_holder(action.host, action.port))
        return self._interrupt() or ev.PortChecked(in_use, holder)

    def _spawn(self, action: ev.Spawn) -> ev.Event:
        with self._lock:
            if self._stop.is_set():
                return ev.BareEvent.STOP_REQUESTED
            if self.key_file is not None and self.key is not None:
                self.deps.write_key_file(self.key_file, self.key.value)
            try:
                proc = self.deps.spawn(
                    action.command, self.log_file, self.drop_env, redactor=self.redactor, tag=self.tag
                )
            except OSError as err:
                self._remove_key_file()
                return ev.Refused(f"server '{self.spec.name}': cannot start {action.command.argv[0]}: {err}")
            except BaseException:
                self._remove_key_file()
                raise
            self._proc = self._watched = proc
        self._workers = ()
        return ev.Spawned(proc.pid, self.deps.create_time(proc.pid))

    def _probe(self, action: ev.Probe) -> ev.Event:
        began_s = self.deps.clock()
        ok, why = self.deps.probe(action.url, action.timeout_s)
        if self.metrics is not None and self.state is S.READY:
            self.metrics.observe_probe(self.spec.name, self.deps.clock() - began_s, ok)
        return self._interrupt() or ev.Probed(ok, why)

    def _read_running(self, action: ev.ReadRunning) -> ev.Event:
        key = self.key.value if self.key is not None else None
        running, why = self.deps.read_running(action.url, action.timeout_s, key)
        return self._interrupt() or ev.RunningRead(running, self.redactor.redact(why))

    def _wait(self, action: ev.Wait) -> ev.Event:
        while True:
            event = self._interrupt()
            if event is not None:
                return event
            if self._commands:
                return self._commands.popleft()
            remaining_s = action.until_s - self.deps.clock()
            if remaining_s <= 0:
                return ev.BareEvent.TICK
            self.deps.wait(self._stop, min(WAIT_SLICE_S, remaining_s))

    def _publish(self, action: ev.Publish) -> None:
        if action.new is not action.old:
            self.state = action.new
        self.board.update(self.spec.name, **action.fields)
        if action.new is not action.old:  # after the status file, so whoever reads the event finds the state there
            self.events.record(self.spec.name, action.old, action.new, action.detail)

    def _note(self, action: ev.Note) -> None:
        level = logging.WARNING if action.level == "warning" else logging.INFO
        log.log(level, "server %s: %s", self.spec.name, self.redactor.redact(action.message))

    def _record_workers(self) -> None:
        """Put the engine's descendants (pid, start time) in the status file when they changed."""
        proc = self._watched
        if proc is None:
            return
        workers = tuple(Worker(pid, t) for pid, t in self.deps.descendants(proc.pid))
        if {w.pid for w in workers} != {w.pid for w in self._workers}:
            self._workers = workers
            self.board.update(self.spec.name, workers=workers)

    def _drain_log(self, proc: subprocess.Popen[bytes]) -> None:
        pump = getattr(proc, "log_pump", None)
        if pump is not None:
            pump.join(LOG_DRAIN_S)

    def _remove_key_file(self) -> None:
        if self.key_file is not None:
            self.deps.remove_key_file(self.key_file)

    def _kill(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        self._watched = None
        if proc is not None:
            tags = self.owns_tag if self.tag is not None else None
            self.deps.kill_groups([proc.pid], self.policy.stop_grace_s, reap=[proc], tags=tags)
            self._drain_log(proc)
        self._remove_key_file()

    def _fail(self, reason: str) -> None:
        """FAILED outside the step: only when the loop itself broke (a bug), after the engine was killed."""
        reason = self.redactor.redact(reason)
        if self.state not in (S.FAILED, S.STOPPED):
            old, self.state = self.state, S.FAILED
            gone = {"pid": None, "create_time": None, "pgid": None, "workers": ()}
            self.board.update(self.spec.name, state=S.FAILED.value, last_error=reason, **gone)
            self.events.record(self.spec.name, old, S.FAILED, reason)
