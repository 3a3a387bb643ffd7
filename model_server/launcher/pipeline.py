"""The launch pipeline of one host: plan, clean up an earlier run, supervise, stop.

``model-server serve`` / ``serve_llm_pipeline.py`` call :func:`plan` then
either :func:`dry_run_commands` (which reads the GPUs, as a real run would,
for the memory fraction, and starts nothing) or :class:`Pipeline`. One supervisor thread
per server (a ThreadPoolExecutor); the main thread waits for a stop signal,
then stops every engine (SIGTERM, grace, SIGKILL: its process group and every
process tagged as its own) and returns the exit status: 0 when every server
was READY until the stop (or in the state an operator asked for through the control
API: drained, stopped, restarting), else 1.

Stop signals: SIGINT (Ctrl-C), SIGTERM, and SIGHUP and SIGQUIT, which a closed
ssh session or terminal sends: all four stop gracefully.

Before it starts anything, a run checks that its log and status directories
can be written, takes the status file's lock (one pipeline per status file),
refuses a damaged status file, stops whatever an earlier run left alive and
removes the key files it left. Its own log records, the engines' logs and the
status file all go through one :class:`~model_server.launcher.redact.Redactor`.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model_server.common.hosts import select_local_servers
from model_server.common.stop_signals import STOP_SIGNALS, StopFlag
from model_server.common.threads import finish_all
from model_server.config import Fleet, ServerSpec, load_fleet
from model_server.errors import ConfigError, LaunchError
from model_server.launcher import processes as procs
from model_server.launcher import rundir
from model_server.launcher.command import LaunchCommand, build_command
from model_server.launcher.events_file import EVENTS_FILE_NAME, EventLog
from model_server.launcher.fleet_control import FleetControl
from model_server.launcher.gpu import GpuInventory, make_inventory
from model_server.launcher.gpu_memory import GpuReading, decide_gpus
from model_server.launcher.lifecycle import ServerState
from model_server.launcher.metrics import PipelineMetrics
from model_server.launcher.redact import RedactingFilter, Redactor, Secret
from model_server.launcher.status_file import (
    ServerStatus,
    StatusBoard,
    StatusLock,
    cleanup_stale,
    load_status,
    owner_tag,
)
from model_server.launcher.supervisor import LOG_DRAIN_S, Deps, ServerSupervisor

if TYPE_CHECKING:
    from model_server.launcher.control_server import ControlServer

__all__ = ["STOP_SIGNALS", "DryRunCommand", "Pipeline", "Plan", "dry_run_commands", "fleet_redactor", "plan"]

log = logging.getLogger(__name__)
POLL_S = 0.2


@dataclass(frozen=True)
class Plan:
    """The fleet and the servers this host runs."""

    fleet: Fleet
    servers: tuple[ServerSpec, ...]


def _only(fleet: Fleet, servers: tuple[ServerSpec, ...], only: Sequence[str]) -> tuple[ServerSpec, ...]:
    if not only:
        return servers
    names = [s.name for s in fleet.servers]
    mine = {s.name for s in servers}
    for name in only:
        if name not in names:
            raise ConfigError(
                f"{fleet.source}: --only {name}: no server of the table has that name. The servers are: "
                f"{', '.join(names)}."
            )
        if name not in mine:
            raise ConfigError(
                f"{fleet.source}: --only {name}: that server runs on host {fleet.server(name).host}, not on this "
                f"machine (this machine runs: {', '.join(sorted(mine))}). Run it there, or pass --host-ip."
            )
    return tuple(s for s in servers if s.name in set(only))


def plan(config: str | os.PathLike[str] | None, host_ip: Sequence[str] = (), only: Sequence[str] = ()) -> Plan:
    """Load the table and pick this host's servers (LaunchError/ConfigError when none or unknown)."""
    fleet = load_fleet(config)
    servers = _only(fleet, select_local_servers(fleet, host_ip), only)
    if fleet.launch.engine == "sglang":
        for i, s in enumerate(fleet.servers):
            if s in servers and not s.gpus:
                raise ConfigError(
                    f"{fleet.source}: server '{s.name}' (servers[{i}]): field 'gpus' is empty, and launch.engine is "
                    f"'sglang', so the engine would see every GPU of this host and use GPU 0. List the GPU indices "
                    f"it runs on, as nvidia-smi shows them."
                )
    return Plan(fleet, servers)


@dataclass(frozen=True)
class DryRunCommand:
    """One server of a dry run: the command a real run would start now, or None where it would refuse.

    ``basis`` says why.

    ``basis`` says where its ``--mem-fraction-static`` comes from: the GPUs'
    memory now, or idle GPUs when they are busy (a real run waits) or cannot be
    read here (no NVML).
    """

    server: str
    command: LaunchCommand | None
    mem_fraction: float | None
    basis: str


def _idle(readings: Sequence[GpuReading]) -> list[GpuReading]:
    return [GpuReading(r.index, 0, r.total_mib) for r in readings]


def _dry_run_one(p: Plan, spec: ServerSpec, inventory: GpuInventory | None, key_file: str | None) -> DryRunCommand:
    policy = p.fleet.launch
    if inventory is None:
        readings, basis = [GpuReading(i, 0, 1) for i in spec.gpus], "GPU memory cannot be read here: as for idle GPUs"
    else:
        try:
            readings = inventory.read(spec.gpus)
        except LaunchError as err:  # a real run fails this server the same way
            return DryRunCommand(spec.name, None, None, str(err))
        basis = "; ".join(r.describe() for r in readings) or "no GPUs listed"
    decision = decide_gpus(policy, spec.name, readings)
    if decision.busy:
        basis = f"its GPUs are busy now ({decision.busy}), so a real run waits for them; this is for idle GPUs"
        decision = decide_gpus(policy, spec.name, _idle(readings))
    if decision.mem_fraction is None:
        return DryRunCommand(spec.name, None, None, decision.refusal)
    command = build_command(spec, policy, decision.mem_fraction, key_file)
    return DryRunCommand(spec.name, command, decision.mem_fraction, basis)


def dry_run_commands(p: Plan, inventory: GpuInventory | None = None) -> list[DryRunCommand]:
    """The commands a real run would start now, with the memory fraction it would choose from the GPUs' memory.

    The fraction comes from :func:`~model_server.launcher.gpu_memory.decide_gpus`,
    as in the supervisor. ``inventory`` defaults to the table's; one that
    cannot be opened (no NVML on this machine) counts as idle GPUs.
    """
    fleet = p.fleet
    key = fleet.api_key(required=True)
    if inventory is None:
        try:
            inventory = make_inventory(fleet.gpu_inventory)
        except LaunchError as err:
            log.warning("dry run: %s", err)
    return [
        _dry_run_one(p, s, inventory, str(rundir.key_file_path(fleet.launch, s.name)) if key else None)
        for s in p.servers
    ]


def fleet_redactor(fleet: Fleet, key: str | None, control_key: str | None = None) -> Redactor:
    """The API key, the control API's key and the values of ``launch.secret_env`` (those set), as one Redactor."""
    values = [k for k in (key, control_key) if k]
    for name in fleet.launch.secret_env:
        value = os.environ.get(name)
        if value:
            values.append(value)
        else:
            log.warning("launch.secret_env names %s, which is not set here: nothing to redact for it", name)
    short = [v for v in values if len(v) < 8]
    if short:
        log.warning(
            "%d secret(s) are shorter than 8 characters: every occurrence of them in the engine logs is redacted",
            len(short),
        )
    return Redactor(values)


def _install_filter(redactor: Redactor) -> tuple[list[logging.Handler], RedactingFilter]:
    """Redact every record the pipeline's own loggers emit, at the handlers of the root logger."""
    filt = RedactingFilter(redactor)
    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(filt)
    return handlers, filt


def _report_gpu_holders(deps: Deps, servers: Sequence[ServerSpec], owner: str, when: str) -> None:
    """Log the engine processes of this status file that NVML still lists on our GPUs (where it can tell)."""
    gpus = sorted({g for s in servers for g in s.gpus})
    if not gpus:
        return
    for holder in deps.gpu_processes(deps.inventory, gpus):
        tag = deps.engine_tag(holder.pid)
        if tag is not None and tag.startswith(owner + "/"):
            log.error(
                "%s, %s: %s. It did not end after SIGKILL (a process stuck in the GPU driver): see nvidia-smi; "
                "the GPU may need a reset before an engine can start on it",
                when, holder.describe(), deps.describe_pid(holder.pid, owner),
            )  # fmt: skip


class Pipeline:
    """Runs the plan until SIGINT/SIGTERM (or until every server has FAILED)."""

    def __init__(self, p: Plan, deps: Deps | None = None) -> None:
        self.plan = p
        self.policy = p.fleet.launch
        self._deps = deps
        self._stop = StopFlag()
        self._control_key: Secret | None = None

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop as on ``signum`` (from another thread, or a test)."""
        self._stop.request(signum)

    @property
    def _signal(self) -> int | None:
        return self._stop.signum

    def run(self, install_signals: bool = True) -> int:
        with self._stop.handling(install_signals):
            return self._run()

    def _run(self) -> int:
        fleet = self.plan.fleet
        raw_key = fleet.api_key(required=True)
        key = Secret(raw_key) if raw_key else None
        try:
            raw_control_key = self.policy.control_key() if self.policy.control_port is not None else None
        except ConfigError as err:
            raise ConfigError(f"{fleet.source}: {err}") from err
        self._control_key = Secret(raw_control_key) if raw_control_key else None
        redactor = fleet_redactor(fleet, raw_key, raw_control_key)
        del raw_key, raw_control_key
        handlers, filt = _install_filter(redactor)
        try:
            return self._run_redacted(key, redactor)
        finally:
            for h in handlers:
                h.removeFilter(filt)

    def _run_redacted(self, key: Secret | None, redactor: Redactor) -> int:
        policy = self.policy
        deps = self._deps = self._deps or Deps(inventory=make_inventory(self.plan.fleet.gpu_inventory))
        status_file = rundir.status_path(policy)
        rundir.check_writable(policy)
        lock = StatusLock(status_file).acquire()
        try:
            return self._run_locked(key, redactor, deps, status_file)
        finally:
            lock.release()

    def _run_locked(self, key: Secret | None, redactor: Redactor, deps: Deps, status_file: Path) -> int:
        fleet, policy = self.plan.fleet, self.policy
        previous = load_status(status_file)
        if previous.problems:
            raise LaunchError(previous.refusal())
        owner = owner_tag(status_file)
        run_prefix = f"{owner}/{secrets.token_hex(4)}/"
        stale = cleanup_stale(
            previous, policy.stop_grace_s, deps.kill_groups, procs.tagged_processes, owner, run_prefix
        )
        if stale:
            log.warning("stopped the processes an earlier run left alive, of server(s): %s", ", ".join(stale))
            _report_gpu_holders(deps, self.plan.servers, owner, "after stopping an earlier run")
        for path in rundir.remove_stale_key_files(policy):
            log.warning("removed the API-key file %s an earlier run left behind", path)
        board = StatusBoard(
            status_file,
            [ServerStatus(s.name, s.group, s.host, s.port) for s in self.plan.servers],
            meta={"pid": os.getpid(), "create_time": deps.create_time(os.getpid()), "config": fleet.source},
            redact=redactor.redact,
        )
        at_stop: dict[str, ServerStatus] = {}
        drop = tuple(n for n in (fleet.api_key_env,) if n)
        events = EventLog(status_file.parent / EVENTS_FILE_NAME, redact=redactor.redact)
        executor = ThreadPoolExecutor(max_workers=len(self.plan.servers), thread_name_prefix="supervise")

        def supervise(s: ServerSpec) -> ServerSupervisor:
            return ServerSupervisor(
                s, policy, board, deps, rundir.log_path(policy, s.name),
                rundir.key_file_path(policy, s.name) if key else None, drop,
                key=key, redactor=redactor, tag=run_prefix + rundir.safe_name(s.name), events=events, metrics=metrics,
            )  # fmt: skip

        control = FleetControl(self.plan.servers, board, deps.inventory, executor, supervise, policy)
        metrics = PipelineMetrics(control.statuses, control.read_gpus)
        events.listen(metrics.on_transition)
        events.listen(lambda t: control.on_transition(t.server, t.new))
        server = self._control_server(control, events, metrics)
        try:
            if server is not None:
                server.start()
            control.start_all()
            log.info(
                "serving %d server(s) from %s: %s; status in %s, events in %s",
                len(self.plan.servers), fleet.source, ", ".join(s.name for s in self.plan.servers), status_file,
                events.path,
            )  # fmt: skip
            while self._signal is None and not control.ended():
                time.sleep(POLL_S)
            control.close()
            supervisors = control.supervisors()
            at_stop = {sup.spec.name: board.get(sup.spec.name) for sup in supervisors}
            if self._signal is not None:
                log.info("signal %s: stopping %d server(s)", signal.Signals(self._signal).name, len(supervisors))
            else:
                log.error("no server is left running (all FAILED): stopping")
            self._stop_all(supervisors, run_prefix)
            deadline = time.monotonic() + policy.stop_grace_s + policy.health_timeout_s + 15.0
            finish_all(control.futures(), deadline, "a supervisor thread")
            if not control.join_rollouts(max(0.0, deadline - time.monotonic())):
                log.warning("a rollout thread did not end in time (it is a daemon: the exit ends it)")
        finally:
            control.close()
            self._stop_all(control.supervisors(), run_prefix)  # again: a no-op unless an error skipped the stop above
            if server is not None:
                server.stop()
            executor.shutdown(wait=False, cancel_futures=True)
            for sup in control.supervisors():
                if sup.key_file is not None:
                    rundir.remove_key_file(sup.key_file)
            board.set_meta(stopped=time.time())
        _report_gpu_holders(deps, self.plan.servers, owner, "after the stop")
        return self._verdict(at_stop, control.operator_asked)

    def _control_server(
        self, control: FleetControl, events: EventLog, metrics: PipelineMetrics
    ) -> ControlServer | None:
        """The control API on this host's servers' address, if launch.control_port is set."""
        if self.policy.control_port is None:
            return None
        from model_server.launcher.control_api import build_app  # noqa: PLC0415  (the web stack only when asked for)
        from model_server.launcher.control_server import ControlServer  # noqa: PLC0415

        if self._control_key is None:
            log.warning(
                "the control API's write routes (drain, restart, rollout, ...) are off: the variable %s is unset. "
                "Export it (a long random key) before starting the pipeline to turn them on",
                self.policy.control_key_env,
            )
        app = build_app(control, events, metrics, self._control_key, self.plan.fleet)
        return ControlServer(app, self.plan.servers[0].host, self.policy.control_port)

    def _stop_all(self, supervisors: list[ServerSupervisor], run_prefix: str) -> None:
        """Every engine of this run: its process group and every process tagged with this run (workers that left)."""
        running = [p for p in (sup.request_stop() for sup in supervisors) if p is not None]
        kill = self._deps.kill_groups if self._deps else procs.kill_groups
        hard = kill(
            [p.pid for p in running],
            self.policy.stop_grace_s,
            reap=running,
            tags=lambda tag: tag.startswith(run_prefix),
        )
        for proc in running:  # their last lines (how they shut down) reach their logs before we exit
            pump = getattr(proc, "log_pump", None)
            if pump is not None:
                pump.join(LOG_DRAIN_S)
        if hard:
            log.warning(
                "SIGKILLed %d process(es) or group(s) still alive after %g s: %s",
                len(hard),
                self.policy.stop_grace_s,
                hard,
            )

    def _verdict(self, at_stop: dict[str, ServerStatus], operator_asked: Callable[[str], bool]) -> int:
        """0 when every server was READY at the stop, or in the state an operator put it in (not FAILED)."""
        bad = {
            n: s
            for n, s in at_stop.items()
            if s.state != ServerState.READY.value and (s.state == ServerState.FAILED.value or not operator_asked(n))
        }
        if not bad and self._signal is not None:
            asked = [n for n, s in at_stop.items() if s.state != ServerState.READY.value]
            log.info(
                "all %d server(s) were READY until the stop%s",
                len(at_stop),
                f", but for {', '.join(asked)} (as an operator asked)" if asked else "",
            )
            return 0
        for name, s in bad.items():
            log.error("server %s was %s at the stop%s", name, s.state, f": {s.last_error}" if s.last_error else "")
        return 1
