"""The pipeline's servers as the control API sees them: their status, and the commands handed to them.

One :class:`FleetControl` per pipeline holds each server's current supervisor
and the future of its thread. A command goes to the supervisor (which hands it
to the pure step at its next wait) once :func:`~model_server.launcher.steps.command_refusal`
says the server's state allows it; ``start`` begins a new supervision of a
server whose last one ended (STOPPED through the API, or FAILED).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from model_server.config import ServerSpec
from model_server.errors import LaunchError
from model_server.launcher import events as ev
from model_server.launcher.gpu import GpuInventory
from model_server.launcher.gpu_memory import GpuReading
from model_server.launcher.lifecycle import ServerState
from model_server.launcher.status_file import ServerStatus, StatusBoard
from model_server.launcher.steps import command_refusal
from model_server.launcher.supervisor import ServerSupervisor

__all__ = ["CommandRefused", "FleetControl"]

S = ServerState


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
    ) -> None:
        self.specs = {s.name: s for s in specs}
        self.board = board
        self.inventory = inventory
        self._executor = executor
        self._make = make_supervisor
        self._lock = threading.Lock()
        self._closed = False
        self._started_wall_s = time.time()
        self._running: dict[str, tuple[ServerSupervisor, Future[ServerState]]] = {}

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
        """The pipeline is stopping: no more starts."""
        with self._lock:
            self._closed = True

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
        if refusal is not None:
            raise CommandRefused(409, f"cannot {verb} server {name!r}: {refusal}")
        sup.submit(ev.Command(verb, then))
        return sup.state

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
        return S.WAITING_GPU

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
        answer: dict[str, Any] = {"started": self._started_wall_s, "servers": servers}
        if gpu_error:
            answer["gpu_error"] = gpu_error
        return answer
