"""The status file: what the pipeline runs, written atomically, read by ``model-server status``.

JSON, replaced as a whole (write to a temp file, then ``os.replace``), so a
reader never sees half a file. It names every engine's pid (also its process
group), its start time, its workers' pids and start times, and its engine tag,
which lets a new pipeline recognise the engines of an earlier run that died
without stopping them (:func:`cleanup_stale`), without ever killing an
unrelated process that reused a pid.

Ownership is a lock, not the file: a pipeline holds ``<status file>.lock``
(``fcntl.flock``) for its whole life (:class:`StatusLock`), so a second
pipeline of the same status file is refused even if the file was deleted, and
a pipeline that died (even by SIGKILL) lets go of it.

Reading is typed (:func:`load_status`): every field of every entry is checked,
and what is wrong is named (``servers['x'].pid is '123'``), never a traceback.
The pipeline refuses a damaged file; ``model-server status`` shows its live
probes anyway and says what is wrong with the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import reprlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from model_server.common.atomic import atomic_write_text
from model_server.common.processes import identified_process
from model_server.errors import LaunchError
from model_server.launcher.lifecycle import ServerState

__all__ = [
    "ServerStatus",
    "StatusBoard",
    "StatusFile",
    "StatusLock",
    "Worker",
    "cleanup_stale",
    "load_status",
    "owner_tag",
    "read_status",
]

log = logging.getLogger(__name__)
FORMAT_VERSION = 2


@dataclass(frozen=True)
class Worker:
    """One process an engine started (a scheduler, a TP rank), by pid and start time."""

    pid: int
    create_time: float

    @classmethod
    def from_json(cls, value: Any) -> Worker | None:
        """The worker an entry of the file names ({pid, create_time}), or None if it names none."""
        if isinstance(value, dict) and _is_pid(value.get("pid")) and _is_time(value.get("create_time")):
            return cls(value["pid"], float(value["create_time"]))
        return None


@dataclass(frozen=True)
class ServerStatus:
    """One server's line of the status file."""

    name: str
    group: str
    host: str
    port: int
    state: str = ServerState.WAITING_GPU.value
    pid: int | None = None  # the engine's pid
    create_time: float | None = None  # psutil's start time of that pid
    pgid: int | None = None  # its process group (the pid: each engine leads its own)
    workers: tuple[Worker, ...] = ()  # its descendants, by pid and start time
    tag: str | None = None  # MODEL_SERVER_ENGINE of its processes (launcher/processes.py)
    restarts: int = 0
    last_error: str = ""
    since: float = field(default_factory=time.time)  # wall clock, for people

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def owner_tag(status_path: str | os.PathLike[str]) -> str:
    """The first part of every engine tag of the pipelines that use this status file."""
    return hashlib.sha256(str(Path(status_path).absolute()).encode()).hexdigest()[:12]


# ---- reading, typed ----------------------------------------------------------------------------------

_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 40, 40, 2, 3, 3
_STATES = {s.value for s in ServerState}


def _is_pid(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 31


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_FIELDS: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    # field: (check, what it must be, may be null)
    "group": (lambda v: isinstance(v, str), "a string", False),
    "host": (lambda v: isinstance(v, str), "a string", False),
    "port": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536, "a port number", False),
    "state": (lambda v: v in _STATES, f"one of {', '.join(sorted(_STATES))}", False),
    "pid": (_is_pid, "a process id (a positive integer or null)", True),
    "create_time": (_is_time, "a start time (seconds since the epoch, or null)", True),
    "pgid": (_is_pid, "a process group id (a positive integer or null)", True),
    "tag": (lambda v: isinstance(v, str), "an engine tag (a string or null)", True),
    "restarts": (_is_count, "a count (an integer >= 0)", False),
    "last_error": (lambda v: isinstance(v, str), "a string", False),
    "since": (_is_time, "a time (seconds since the epoch)", False),
}


def _short(value: Any) -> str:
    return _SHORT.repr(value)


def _parse_entry(name: str, entry: Any, problems: list[str]) -> ServerStatus | None:
    where = f"servers[{name!r}]"
    if not isinstance(entry, dict):
        problems.append(f"{where} is {_short(entry)}, not an object of fields")
        return None
    values: dict[str, Any] = {}
    ok = True
    for key, (check, what, nullable) in _FIELDS.items():
        if key not in entry:
            continue
        value = entry[key]
        if (value is None and nullable) or (value is not None and check(value)):
            values[key] = value
        else:
            problems.append(f"{where}.{key} is {_short(value)}, not {what}")
            ok = False
    workers: list[Worker] = []
    raw = entry.get("workers", [])
    if not isinstance(raw, list):
        problems.append(f"{where}.workers is {_short(raw)}, not a list of {{pid, create_time}}")
        ok = False
    else:
        for i, w in enumerate(raw):
            worker = Worker.from_json(w)
            if worker is not None:
                workers.append(worker)
            else:
                problems.append(f"{where}.workers[{i}] is {_short(w)}, not {{pid, create_time}}")
                ok = False
    if not ok:
        return None
    return ServerStatus(
        name=name, group=values.get("group", ""), host=values.get("host", ""), port=values.get("port", 1),
        state=values.get("state", ServerState.WAITING_GPU.value), pid=values.get("pid"),
        create_time=values.get("create_time"), pgid=values.get("pgid"), workers=tuple(workers), tag=values.get("tag"),
        restarts=values.get("restarts", 0), last_error=values.get("last_error", ""), since=values.get("since", 0.0),
    )  # fmt: skip


@dataclass(frozen=True)
class StatusFile:
    """A status file as read: the valid entries, the pipeline's fields, and what was wrong (named)."""

    path: Path
    exists: bool = False
    pipeline: dict[str, Any] = field(default_factory=dict)
    servers: dict[str, ServerStatus] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    def refusal(self) -> str:
        """The pipeline's one paragraph for a damaged file."""
        return (
            f"{self.path}: the status file is damaged: {'; '.join(self.problems)}. It is the pipeline's record of the "
            f"engines it started, so the pipeline will not guess which are still running. Stop any engine of an "
            f"earlier run that is still up (`model-server status` shows which servers answer), then remove "
            f"{self.path} and start again."
        )


def load_status(path: str | os.PathLike[str]) -> StatusFile:
    """Read and check a status file; never raises for its content (see ``problems``)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return StatusFile(file)
    except (OSError, UnicodeDecodeError) as err:
        return StatusFile(file, True, problems=(f"it cannot be read ({getattr(err, 'strerror', None) or err})",))
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:
        return StatusFile(file, True, problems=(f"it is not JSON ({_short(str(err))})",))
    if not isinstance(data, dict) or not isinstance(data.get("servers"), dict):
        return StatusFile(file, True, problems=('it is not a model-server status file (no "servers" object)',))
    problems: list[str] = []
    meta = data.get("pipeline") if isinstance(data.get("pipeline"), dict) else {}
    if "pipeline" in data and not isinstance(data["pipeline"], dict):
        problems.append(f"pipeline is {_short(data['pipeline'])}, not an object")
    for key, check in (("pid", _is_pid), ("create_time", _is_time)):
        if meta.get(key) is not None and not check(meta[key]):
            problems.append(
                f"pipeline.{key} is {_short(meta[key])}, not a {'process id' if key == 'pid' else 'start time'}"
            )
    servers = {}
    for name, entry in data["servers"].items():
        parsed = _parse_entry(name, entry, problems)
        if parsed is not None:
            servers[name] = parsed
    return StatusFile(file, True, dict(meta), servers, tuple(problems))


def read_status(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The status file as a plain dict (``pipeline``, ``servers`` by name), or None if there is none.

    Only the JSON shape is checked; use :func:`load_status` for typed entries.
    """
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as err:
        raise LaunchError(
            f"{file}: the status file cannot be read ({_short(str(err))}). Remove it; the pipeline rewrites it."
        ) from err
    if not isinstance(data, dict) or not isinstance(data.get("servers"), dict):
        raise LaunchError(f"{file}: not a model-server status file. Remove it; the pipeline rewrites it.")
    return data


def _atomic_write(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


# ---- ownership ----------------------------------------------------------------------------------------


class StatusLock:
    """``<status file>.lock``, held with ``fcntl.flock`` by the one pipeline that owns the status file.

    The kernel drops the lock when its holder dies, however it dies; the file
    itself stays (removing it would let two pipelines lock two files). It holds
    the owner's pid, for the refusal message.
    """

    def __init__(self, status_path: str | os.PathLike[str]) -> None:
        self.status_path = Path(status_path)
        self.path = self.status_path.with_name(self.status_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> StatusLock:
        import fcntl  # noqa: PLC0415 - POSIX only, like the pipeline

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise LaunchError(
                f"{self.path}: cannot create the pipeline's lock file ({err.strerror or err}). Make the directory of "
                f"launch.status_file ({self.path.parent}) writable, or point launch.status_file elsewhere."
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = ""
            try:
                owner = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            except OSError:
                pass
            os.close(fd)
            who = f"pid {owner}" if owner.isdigit() else "pid unknown"
            stop = f"kill -TERM {owner}" if owner.isdigit() else "find it with `fuser " + str(self.path) + "`"
            raise LaunchError(
                f"{self.status_path}: another pipeline ({who}) is running with this status file (it holds the lock "
                f"{self.path}). Stop it first (Ctrl-C in its terminal, or {stop}), or give this one its own "
                f"launch.status_file."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # the lock goes with the descriptor

    def __enter__(self) -> StatusLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---- the pipeline's board -------------------------------------------------------------------------------


class StatusBoard:
    """The pipeline's view of its servers; every update rewrites the file (thread-safe).

    ``redact`` is applied to every text written (a log tail in ``last_error``
    must not carry a key).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        servers: list[ServerStatus],
        meta: dict[str, Any],
        redact: Callable[[str], str] = lambda text: text,
    ) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._redact = redact
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
            if isinstance(changes.get("last_error"), str):
                changes["last_error"] = self._redact(changes["last_error"])
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


# ---- an earlier run's leftovers ---------------------------------------------------------------------------


def cleanup_stale(
    status: StatusFile,
    grace_s: float,
    kill: Callable[..., Any],
    tagged: Callable[[Callable[[str], bool]], list[Any]],
    owner: str,
    run_prefix: str,
) -> list[str]:
    """Stop every process an earlier pipeline of this status file left running; return their server names.

    Call it holding the :class:`StatusLock` (no live pipeline owns them then).
    A process counts as left over when it is a recorded engine or worker alive
    with its recorded start time (never an unrelated process that reused the
    pid), or when its engine tag says an earlier run of this status file
    started it (``owner/<run>/<server>``, any run but ``run_prefix``'s): a
    worker that left its group, or one started after the file was last
    written. ``kill(pgids, grace_s, processes=...)`` ends them (processes.kill_groups).
    """
    victims: dict[int, tuple[str, Any]] = {}
    groups: list[int] = []
    for name, entry in status.servers.items():
        leader = identified_process(entry.pid, entry.create_time)
        if leader is not None:
            victims[leader.pid] = (name, leader)
            groups.append(entry.pgid or entry.pid)
        for w in entry.workers:
            proc = identified_process(w.pid, w.create_time)
            if proc is not None:
                victims[proc.pid] = (name, proc)
    by_tag = {entry.tag: name for name, entry in status.servers.items() if entry.tag}
    prefix = owner + "/"

    def earlier_run(tag: str) -> bool:
        return tag.startswith(prefix) and not tag.startswith(run_prefix)

    for proc in tagged(earlier_run):
        try:
            tag = proc.environ().get("MODEL_SERVER_ENGINE", "")
        except Exception:  # noqa: BLE001 - it may have ended since
            tag = ""
        victims.setdefault(proc.pid, (by_tag.get(tag, tag.rsplit("/", 1)[-1] or "?"), proc))
    if not victims:
        return []
    names = sorted({name for name, _ in victims.values()})
    for name in names:
        pids = sorted(pid for pid, (n, _) in victims.items() if n == name)
        log.warning(
            "server %s: %d process(es) of an earlier run still alive (pid %s); stopping them",
            name,
            len(pids),
            ", ".join(map(str, pids)),
        )
    kill(groups, grace_s, processes=[proc for _, proc in victims.values()])
    return names
