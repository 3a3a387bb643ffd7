"""The launch pipeline of one host: plan, clean up an earlier run, supervise, stop.

``model-server serve`` / ``serve_llm_pipeline.py`` call :func:`plan` then
either :func:`dry_run_commands` or :class:`Pipeline`. One supervisor thread
per server (a ThreadPoolExecutor); the main thread waits for SIGINT/SIGTERM,
then stops every engine's process group (SIGTERM, grace, SIGKILL) and returns
the exit status: 0 when every server was READY until the stop, else 1.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from model_server import procs, rundir
from model_server.config import Fleet, ServerSpec, load_fleet
from model_server.errors import ConfigError
from model_server.gpu import make_inventory
from model_server.hosts import select_local_servers
from model_server.launch import LaunchCommand, build_command
from model_server.server_state import ServerState
from model_server.status import ServerStatus, StatusBoard, cleanup_stale
from model_server.supervisor import Deps, ServerSupervisor

__all__ = ["Pipeline", "Plan", "dry_run_commands", "plan"]

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


def dry_run_commands(p: Plan) -> list[LaunchCommand]:
    """The commands a real run would start, assuming idle GPUs (the first memory rule)."""
    fleet = p.fleet
    key = fleet.api_key(required=True)
    mem_fraction = fleet.launch.mem_fraction_policy[0].mem_fraction_static
    return [
        build_command(s, fleet.launch, mem_fraction, str(rundir.key_file_path(fleet.launch, s.name)) if key else None)
        for s in p.servers
    ]


def _kill_one(pid: int, grace_s: float) -> None:
    procs.kill_groups([pid], grace_s)


class Pipeline:
    """Runs the plan until SIGINT/SIGTERM (or until every server has FAILED)."""

    def __init__(self, p: Plan, deps: Deps | None = None) -> None:
        self.plan = p
        self.policy = p.fleet.launch
        self._deps = deps
        self._signal: int | None = None  # set by the handler: no locks there

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        self._signal = signum

    def _handler(self, signum: int, _frame: object) -> None:
        self._signal = signum

    def run(self, install_signals: bool = True) -> int:
        previous = self._install() if install_signals else {}
        try:
            return self._run()
        finally:
            self._restore(previous)

    def _run(self) -> int:
        fleet, policy = self.plan.fleet, self.policy
        key = fleet.api_key(required=True)
        deps = self._deps = self._deps or Deps(inventory=make_inventory(fleet.gpu_inventory))
        status_file = rundir.status_path(policy)
        stale = cleanup_stale(status_file, policy.stop_grace_s, _kill_one)
        if stale:
            log.warning("stopped %d engine(s) of an earlier run: %s", len(stale), ", ".join(stale))
        board = StatusBoard(
            status_file,
            [ServerStatus(s.name, s.group, s.host, s.port) for s in self.plan.servers],
            meta={"pid": os.getpid(), "create_time": deps.create_time(os.getpid()), "config": fleet.source},
        )
        key_files: list[Path] = []
        supervisors: list[ServerSupervisor] = []
        at_stop: dict[str, ServerStatus] = {}
        executor = ThreadPoolExecutor(max_workers=len(self.plan.servers), thread_name_prefix="supervise")
        try:
            for s in self.plan.servers:
                key_file = None
                if key:
                    key_file = rundir.write_key_file(rundir.key_file_path(policy, s.name), key)
                    key_files.append(key_file)
                drop = (fleet.api_key_env,) if fleet.api_key_env else ()
                supervisors.append(ServerSupervisor(s, policy, board, deps, rundir.log_path(policy, s.name), key_file, drop))
            log.info(
                "serving %d server(s) from %s: %s; status in %s",
                len(supervisors), fleet.source, ", ".join(s.name for s in self.plan.servers), status_file,
            )  # fmt: skip
            futures = [executor.submit(sup.run) for sup in supervisors]
            while self._signal is None and not all(f.done() for f in futures):
                time.sleep(POLL_S)
            at_stop = {sup.spec.name: board.get(sup.spec.name) for sup in supervisors}
            if self._signal is not None:
                log.info("signal %s: stopping %d server(s)", signal.Signals(self._signal).name, len(supervisors))
            else:
                log.error("no server is left running (all FAILED): stopping")
            self._stop_all(supervisors)
            deadline = time.monotonic() + policy.stop_grace_s + policy.health_timeout_s + 15.0
            for f in futures:
                try:
                    f.result(timeout=max(0.1, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - run() catches its own errors; this is the timeout
                    log.error("a supervisor thread did not finish in time")
        finally:
            self._stop_all(supervisors)  # again: a no-op unless an error skipped the stop above
            executor.shutdown(wait=False, cancel_futures=True)
            for path in key_files:
                rundir.remove_key_file(path)
            board.set_meta(stopped=time.time())
        return self._verdict(at_stop)

    def _stop_all(self, supervisors: list[ServerSupervisor]) -> None:
        running = [p for p in (sup.request_stop() for sup in supervisors) if p is not None]
        if running:
            kill = self._deps.kill_groups if self._deps else procs.kill_groups
            hard = kill([p.pid for p in running], self.policy.stop_grace_s, reap=running)
            if hard:
                log.warning("SIGKILLed %d process group(s) still alive after %g s: %s", len(hard), self.policy.stop_grace_s, hard)

    def _verdict(self, at_stop: dict[str, ServerStatus]) -> int:
        bad = {n: s for n, s in at_stop.items() if s.state != ServerState.READY.value}
        if not bad and self._signal is not None:
            log.info("all %d server(s) were READY until the stop", len(at_stop))
            return 0
        for name, s in bad.items():
            log.error("server %s was %s at the stop%s", name, s.state, f": {s.last_error}" if s.last_error else "")
        return 1

    def _install(self) -> dict[int, object]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, self._handler)
        return previous

    def _restore(self, previous: dict[int, object]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
