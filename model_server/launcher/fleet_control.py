"""The pipeline's servers as the control API sees them: their status, and the commands handed to them.

One :class:`FleetControl` per pipeline holds each server's current supervisor
and the future of its thread. A command goes to the supervisor (which hands it
to the pure step at its next wait) once :func:`~model_server.launcher.steps.command_refusal`
says the server's state allows it; ``start`` begins a new supervision of a
server whose last one ended (STOPPED through the API, or FAILED).

``rollout`` restarts the servers of one group on this host one at a time, in a
thread of its own (one per running rollout, a daemon: it holds no engine and
no file); what to do at each moment is the pure
:func:`~model_server.launcher.rollout.advance`. :meth:`FleetControl.close`
(the pipeline is stopping) cancels every running rollout at once. The last
rollout of each group is shown by :meth:`FleetControl.status` under
``rollouts``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from model_server.config import LaunchPolicy, ServerSpec
from model_server.errors import LaunchError
from model_server.launcher import events as ev
from model_server.launcher import rollout as ro
from model_server.launcher.gpu import GpuInventory
from model_server.launcher.gpu_memory import GpuReading
from model_server.launcher.lifecycle import ServerState
from model_server.launcher.status_file import ServerStatus, StatusBoard
from model_server.launcher.steps import command_refusal
from model_server.launcher.supervisor import ServerSupervisor

__all__ = ["CommandRefused", "FleetControl"]

log = logging.getLogger(__name__)
S = ServerState
ROLLOUT_POLL_S = 0.1  # how often a rollout looks at its current server


class CommandRefused(Exception):
    """A command the control API must refuse: ``status`` (404 unknown server, 409 wrong state) and what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class FleetControl:
    """Thread-safe: the control API's threads call it while the supervisors run."""

    def __init__(
        self,
        specs: Sequence[ServerSpec],
        board: StatusBoard,
        inventory: GpuInventory,
        executor: ThreadPoolExecutor,
        make_supervisor: Callable[[ServerSpec], ServerSupervisor],
        policy: LaunchPolicy,
    ) -> None:
        self.specs = {s.name: s for s in specs}
        self.board = board
        self.inventory = inventory
        self._executor = executor
        self._make = make_supervisor
        self.policy = policy  # the pipeline's launch policy: a rollout's bound per server
        self._lock = threading.Lock()
        self._closed = False
        self._started_wall_s = time.time()
        self._running: dict[str, tuple[ServerSupervisor, Future[ServerState]]] = {}
        self._rollouts: dict[str, ro.Rollout] = {}  # the last rollout of each group
        self._rollout_threads: dict[str, threading.Thread] = {}
        self._stopping = threading.Event()  # set by close(): running rollouts end
        self._rollout_ids = itertools.count(1)
        # Servers an operator commanded since they were last READY, with their crash-restart count then: their
        # state at a stop is on purpose, unless they crashed since (restarts grew).
        self._asked: dict[str, int] = {}

    def start_all(self) -> None:
        for name in self.specs:
            self._begin(name)

    def _begin(self, name: str) -> None:
        sup = self._make(self.specs[name])
        self._running[name] = (sup, self._executor.submit(sup.run))

    # ---- what the pipeline asks ----------------------------------------------------------------

    def supervisors(self) -> list[ServerSupervisor]:
        with self._lock:
            return [sup for sup, _f in self._running.values()]

    def futures(self) -> list[Future[ServerState]]:
        with self._lock:
            return [f for _s, f in self._running.values()]

    def ended(self) -> bool:
        """Every supervision ended, and none STOPPED through the API (an operator may still start that one)."""
        with self._lock:
            runs = list(self._running.values())
        return all(f.done() for _s, f in runs) and not any(sup.state is S.STOPPED for sup, _f in runs)

    def close(self) -> None:
        """The pipeline is stopping: no more starts, no more rollouts, and the running ones cancelled."""
        now = time.monotonic()
        with self._lock:
            self._closed = True
            self._stopping.set()
            for group, r in self._rollouts.items():
                if r.state is ro.RolloutState.RUNNING:
                    self._rollouts[group] = ro.cancel(r, "the pipeline is stopping", now)
                    log.warning("rollout of group %s cancelled: the pipeline is stopping", group)

    def join_rollouts(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s`` in all) for the rollout threads to end; whether they all did."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            threads = list(self._rollout_threads.values())
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    # ---- what the control API asks -------------------------------------------------------------

    def _known(self, name: str) -> ServerSupervisor:
        with self._lock:
            run = self._running.get(name)
        if run is None:
            raise CommandRefused(
                404, f"no server named {name!r} on this host. The servers here are: {', '.join(self.specs)}"
            )
        return run[0]

    def command(self, name: str, verb: ev.Verb, then: ev.AfterDrain = "stop") -> ServerState:
        """Hand ``verb`` to ``name``'s supervisor; its state now (the change follows within a moment)."""
        sup = self._known(name)
        refusal = command_refusal(sup.state, verb)
        if refusal is None and self._closed:
            refusal = "the pipeline is stopping"
        if refusal is not None:
            raise CommandRefused(409, f"cannot {verb} server {name!r}: {refusal}")
        sup.submit(ev.Command(verb, then))
        with self._lock:
            self._asked[name] = self.board.get(name).restarts
        return sup.state

    def on_transition(self, server: str, new_state: str) -> None:
        """Every transition (EventLog listener): a server READY again is no longer in an operator's hands."""
        if new_state == S.READY.value:
            with self._lock:
                self._asked.pop(server, None)

    def operator_asked(self, name: str) -> bool:
        """Whether ``name``'s state now is an operator's doing: commanded since it was last READY, no crash since.

        Such a state (drained, stopped, restarting) at the stop is no failure; a crash-loop after the command is.
        """
        with self._lock:
            asked = self._asked.get(name)
        return asked is not None and self.board.get(name).restarts == asked

    def start(self, name: str) -> ServerState:
        """A new supervision of a server whose last one ended (STOPPED or FAILED)."""
        sup = self._known(name)
        with self._lock:
            _previous, future = self._running[name]
            if self._closed:
                raise CommandRefused(409, f"cannot start server {name!r}: the pipeline is stopping")
            if not future.done():
                raise CommandRefused(
                    409, f"cannot start server {name!r}: it is {sup.state.value}, its supervision still runs. "
                    f"Restart it with POST /servers/{name}/restart, or stop it first",
                )  # fmt: skip
            self.board.update(name, state=S.WAITING_GPU.value)  # before the new run can publish its own states
            self._begin(name)
            self._asked[name] = self.board.get(name).restarts
        return S.WAITING_GPU

    # ---- rollouts ------------------------------------------------------------------------------

    def host_groups(self) -> dict[str, list[str]]:
        """Each group of this host and its servers here, in table order."""
        groups: dict[str, list[str]] = {}
        for name, spec in self.specs.items():
            groups.setdefault(spec.group, []).append(name)
        return groups

    def rollout(self, group: str) -> dict[str, Any]:
        """Begin a rolling restart of ``group``'s servers here (CommandRefused: 404, 409); its plan as JSON."""
        now = time.monotonic()
        with self._lock:
            groups = self.host_groups()
            states = {n: self.board.get(n).state for n in groups.get(group, ())}
            refusal = ro.rollout_refusal(group, groups, states, self._rollouts.get(group), self._closed)
            if refusal is not None:
                raise CommandRefused(*refusal)
            rollout_id = f"{group}-{next(self._rollout_ids)}"
            r = ro.begin(rollout_id, group, groups[group], ro.per_server_bound_s(self.policy), now, time.time())
            self._rollouts[group] = r
            thread = threading.Thread(target=self._roll, args=(group, rollout_id), name=f"rollout-{group}", daemon=True)
            self._rollout_threads[group] = thread
            thread.start()
        log.info(
            "rollout %s of group %s: %d server(s), one at a time: %s (each may take %g s)",
            rollout_id, group, len(r.servers), ", ".join(r.servers), r.bound_s,
        )  # fmt: skip
        return r.as_json(now)

    def _store(self, group: str, rollout_id: str, r: ro.Rollout) -> bool:
        """Keep ``r`` as the group's rollout unless that one was ended meanwhile (cancelled); whether it was kept."""
        with self._lock:
            current = self._rollouts.get(group)
            if current is None or current.id != rollout_id or current.state is not ro.RolloutState.RUNNING:
                return False
            self._rollouts[group] = r
            return True

    def _roll(self, group: str, rollout_id: str) -> None:
        """The rollout's thread: look at the current server, ask :func:`ro.advance`, act; until it ends."""
        try:
            while True:
                with self._lock:
                    r = self._rollouts[group]
                if r.id != rollout_id or r.state is not ro.RolloutState.RUNNING:
                    return
                name = r.current
                assert name is not None
                s = self.board.get(name)
                now = time.monotonic()
                new, action = ro.advance(r, ro.Seen(s.state, s.pid), now)
                if not self._store(group, rollout_id, new):
                    return
                self._log_progress(r, new)
                if isinstance(action, ro.AskRestart):
                    try:
                        self.command(action.server, "restart")
                    except CommandRefused as err:
                        self._store(group, rollout_id, ro.refused(new, err.message, time.monotonic()))
                        log.error("rollout %s of group %s failed: %s", rollout_id, group, err.message)
                        return
                elif isinstance(action, ro.Finished):
                    return
                elif self._stopping.wait(ROLLOUT_POLL_S):
                    return  # close() has cancelled it
        except Exception as err:  # a bug must not leave the rollout shown as running forever
            log.exception("rollout %s of group %s: unexpected error", rollout_id, group)
            with self._lock:
                r = self._rollouts[group]
            why = f"internal error ({type(err).__name__}); see the pipeline's log"
            self._store(group, rollout_id, ro.refused(r, why, time.monotonic()))

    @staticmethod
    def _log_progress(old: ro.Rollout, new: ro.Rollout) -> None:
        if new.phase == "restarting" and old.phase == "waiting":
            log.info(
                "rollout %s: restarting server %s (%d/%d)", new.id, new.current, len(new.done) + 1, len(new.servers)
            )
        if len(new.restarted) > len(old.restarted):
            r = new.restarted[-1]
            log.info("rollout %s: server %s READY again, pid %s -> %s (%.1f s)", new.id, r.server, r.old_pid,
                     r.new_pid, r.took_s)  # fmt: skip
        if new.state is ro.RolloutState.DONE:
            log.info("rollout %s of group %s done: %d server(s) restarted", new.id, new.group, len(new.restarted))
        elif new.state is ro.RolloutState.FAILED:
            log.error("rollout %s of group %s failed: %s", new.id, new.group, new.why)

    def rollouts(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            return {group: r.as_json(now) for group, r in self._rollouts.items()}

    def read_gpus(self) -> list[GpuReading]:
        gpus = sorted({g for s in self.specs.values() for g in s.gpus})
        return self.inventory.read(gpus) if gpus else []

    def statuses(self) -> list[ServerStatus]:
        return [self.board.get(name) for name in self.specs]

    def status(self) -> dict[str, Any]:
        """GET /status: every server of this host with its state, pid, restarts, since, last error and GPUs."""
        try:
            readings: dict[int, dict[str, Any]] = {r.index: asdict(r) for r in self.read_gpus()}
            gpu_error = ""
        except LaunchError as err:
            readings, gpu_error = {}, str(err)
        servers = []
        for name, spec in self.specs.items():
            s = self.board.get(name)
            servers.append({
                "name": name, "group": s.group, "host": s.host, "port": s.port, "state": s.state, "pid": s.pid,
                "restarts": s.restarts, "since": s.since, "last_error": s.last_error,
                "gpus": [readings.get(g, {"index": g}) for g in spec.gpus],
            })  # fmt: skip
        answer: dict[str, Any] = {"started": self._started_wall_s, "servers": servers, "rollouts": self.rollouts()}
        if gpu_error:
            answer["gpu_error"] = gpu_error
        return answer
