"""The status file: what the pipeline runs, written atomically, read by ``model-server status``.

JSON, replaced as a whole (write to a temp file, then ``os.replace``), so a
reader never sees half a file. It also names every engine's pid and start
time, which lets a new pipeline recognise the engines of an earlier run that
died without stopping them (:func:`cleanup_stale`), without ever killing an
unrelated process that reused a pid.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from model_server.atomic import atomic_write_text
from model_server.errors import LaunchError
from model_server.server_state import ServerState

__all__ = ["ServerStatus", "StatusBoard", "cleanup_stale", "read_status", "same_process"]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ServerStatus:
    """One server's line of the status file."""

    name: str
    group: str
    host: str
    port: int
    state: str = ServerState.WAITING_GPU.value
    pid: int | None = None  # the engine's pid, also its process group id
    create_time: float | None = None  # psutil's start time of that pid
    restarts: int = 0
    last_error: str = ""
    since: float = field(default_factory=time.time)  # wall clock, for people

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def same_process(pid: int | None, create_time: float | None) -> bool:
    """Whether ``pid`` is alive and is the very process started at ``create_time``."""
    import psutil  # noqa: PLC0415

    if not pid or create_time is None:
        return False
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - create_time) < 0.05 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _atomic_write(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def read_status(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The status file as a dict (``pipeline``, ``servers`` by name), or None if there is none."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise LaunchError(f"{file}: the status file cannot be read ({err}). Remove it; the pipeline rewrites it.") from err
    if not isinstance(data, dict) or not isinstance(data.get("servers"), dict):
        raise LaunchError(f"{file}: not a model-server status file. Remove it; the pipeline rewrites it.")
    return data


class StatusBoard:
    """The pipeline's view of its servers; every update rewrites the file (thread-safe)."""

    def __init__(self, path: str | os.PathLike[str], servers: list[ServerStatus], meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._servers = {s.name: s for s in servers}
        self._meta = dict(meta)
        self._write()

    def get(self, name: str) -> ServerStatus:
        with self._lock:
            return self._servers[name]

    def update(self, name: str, **changes: Any) -> ServerStatus:
        with self._lock:
            if "state" in changes and changes["state"] != self._servers[name].state:
                changes.setdefault("since", time.time())
            new = replace(self._servers[name], **changes)
            self._servers[name] = new
            self._write()
            return new

    def set_meta(self, **changes: Any) -> None:
        with self._lock:
            self._meta.update(changes)
            self._write()

    def _write(self) -> None:
        data = {
            "version": FORMAT_VERSION,
            "pipeline": {**self._meta, "updated": time.time()},
            "servers": {n: asdict(s) for n, s in self._servers.items()},
        }
        try:
            _atomic_write(self.path, data)
        except OSError as err:
            log.error("cannot write the status file %s: %s", self.path, err)


def cleanup_stale(path: str | os.PathLike[str], grace_s: float, kill_group: Any) -> list[str]:
    """Stop the engines an earlier pipeline left running; return their server names.

    An engine counts as left over only when its pid is alive with the recorded
    start time. A pipeline of that file that is itself still alive is an error:
    two pipelines must not manage the same servers.
    """
    data = read_status(path)
    if data is None:
        return []
    meta = data.get("pipeline") or {}
    owner_pid, owner_time = meta.get("pid"), meta.get("create_time")
    if owner_pid != os.getpid() and same_process(owner_pid, owner_time):
        raise LaunchError(
            f"{path}: another pipeline (pid {owner_pid}) is running with this status file. Stop it first "
            f"(Ctrl-C or kill -TERM {owner_pid}), or give this one its own launch.status_file."
        )
    stopped = []
    for name, entry in data["servers"].items():
        pid, create_time = entry.get("pid"), entry.get("create_time")
        if same_process(pid, create_time):
            log.warning("server %s: engine pid %s of an earlier run is still alive; stopping its process group", name, pid)
            kill_group(pid, grace_s)
            stopped.append(name)
    return stopped
