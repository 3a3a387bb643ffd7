"""Engine processes: spawn in a new process group, find every process of an engine, kill them, check ports.

Parent death. Linux can send a child a signal when its parent dies
(``prctl(PR_SET_PDEATHSIG)``). Setting it in ``preexec_fn`` is unsafe in a
threaded program (the pipeline spawns from worker threads; the child of a
fork may deadlock before exec), so each engine starts through a tiny
trampoline instead: ``python -I -S -c <10 lines> PARENT_PID argv...`` sets the
signal, exits at once if the pipeline is already gone, and ``execv``\\ s the
engine, which keeps the same pid. The signal fires when the *thread* that
spawned the engine ends; each server's supervisor thread lives as long as its
engine, so in practice that is when the pipeline dies. Elsewhere than Linux
the trampoline just execs, and the stale-run cleanup is the safety net.

Workers. SGLang's engine starts worker processes (scheduler, detokenizer, one
per TP rank). They are in the engine's process group unless they leave it,
and they arm their own parent-death signal unless they do not. So an engine is
found three ways: its process group, the (pid, start time) of its descendants
recorded in the status file, and a tag in the environment that every process
of the engine inherits (``MODEL_SERVER_ENGINE=<pipeline>/<run>/<server>``,
see :func:`tagged_processes`); :func:`kill_groups` ends all of them.

Output. An engine writes to a pipe read by a :class:`~model_server.launcher.engine_log.LogPump`
that redacts secrets into its log file (see enginelog.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import psutil

from model_server.common.processes import end_processes, listening_pid, signal_process, wait_gone
from model_server.errors import LaunchError
from model_server.launcher.command import LaunchCommand
from model_server.launcher.engine_log import LogPump, open_log, write_redacted
from model_server.launcher.redact import Redactor

__all__ = [
    "ENGINE_TAG_ENV",
    "descendants",
    "describe_pid",
    "engine_tag",
    "kill_groups",
    "port_holder",
    "port_in_use",
    "spawn_engine",
    "tagged_processes",
]

ENGINE_TAG_ENV = "MODEL_SERVER_ENGINE"

_TRAMPOLINE = """
import os, sys
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    os._exit(70)  # the pipeline died before the signal was armed
os.execv(sys.argv[2], sys.argv[2:])
"""


def spawn_engine(
    command: LaunchCommand,
    log_file: Path,
    drop_env: Iterable[str] = (),
    *,
    redactor: Redactor | None = None,
    tag: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``command`` in a new session (its own process group), its output appended to ``log_file`` redacted.

    ``drop_env`` names variables not to pass on (the API-key variable: the
    engine reads the key from its 0600 file). ``tag`` goes into the engine's
    environment as ``MODEL_SERVER_ENGINE``. The returned Popen has a
    ``log_pump`` attribute: the thread that copies its output (joined by the
    caller once the engine is gone). A log file that cannot be written is a
    LaunchError naming it.
    """
    drop = set(drop_env)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(command.env)
    if tag is not None:
        env[ENGINE_TAG_ENV] = tag
    try:
        log_fd = open_log(log_file)
    except OSError as err:
        raise LaunchError(
            f"server '{command.server}': cannot write its log file {log_file} ({err.strerror or err}). "
            f"Make launch.log_dir ({log_file.parent}) a directory this user can write, or point it elsewhere"
        ) from err
    redactor = redactor or Redactor()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    write_redacted(log_fd, redactor, f"\n=== model-server {stamp}: starting {command.server}: {command.render()}\n")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(os.getpid()), *command.argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    except BaseException:
        os.close(log_fd)
        raise
    pump = LogPump(proc.stdout, log_fd, redactor, name=command.server)
    pump.start()
    proc.log_pump = pump  # type: ignore[attr-defined]
    return proc


def tagged_processes(match: Callable[[str], bool]) -> list:
    """Live processes (psutil.Process) whose ``MODEL_SERVER_ENGINE`` tag satisfies ``match``.

    Reads each process's environment (this user's processes, or all as root);
    one that cannot be read is skipped. Never this process.
    """
    found = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            tag = proc.environ().get(ENGINE_TAG_ENV)
            if tag is not None and match(tag) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def descendants(pid: int) -> list[tuple[int, float]]:
    """(pid, start time) of every live descendant of ``pid`` (an engine's workers); empty if it is gone."""
    out = []
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    for child in children:
        try:
            out.append((child.pid, child.create_time()))
        except psutil.Error:
            continue
    return sorted(out)


def kill_groups(
    pgids: Iterable[int],
    grace_s: float,
    reap: Iterable[subprocess.Popen[bytes]] = (),
    tags: Callable[[str], bool] | None = None,
    processes: Sequence = (),
) -> list[int]:
    """End engines: SIGTERM, wait up to ``grace_s``, SIGKILL what is left; return the pids and groups killed hard.

    What is ended: every process group of ``pgids``; every process whose engine
    tag satisfies ``tags`` (workers that left their group); and ``processes``
    (psutil.Process objects, which refuse to signal a reused pid). ``reap`` are
    our own children among them, waited for so they leave no zombie. Bounded
    (see :func:`model_server.common.processes.end_processes`), then one more
    look for workers forked meanwhile.
    """
    singles = list(processes) + (tagged_processes(tags) if tags is not None else [])
    remaining, left = end_processes(pgids, singles, grace_s, reap)
    hard = remaining + [p.pid for p in left]
    if tags is not None:  # a worker forked while we waited
        late = tagged_processes(tags)
        for p in late:
            signal_process(p, signal.SIGKILL)
        wait_gone([], late, [], 5.0)
        hard += [p.pid for p in late]
    return hard


def engine_tag(pid: int) -> str | None:
    """The ``MODEL_SERVER_ENGINE`` tag of process ``pid``, None if it has none or cannot be read."""
    try:
        return psutil.Process(pid).environ().get(ENGINE_TAG_ENV)
    except (psutil.Error, OSError):
        return None


def describe_pid(pid: int, owner: str | None = None) -> str:
    """ "pid N (command line)", saying so when its engine tag names a run of this pipeline's status file (``owner``)."""
    try:
        line = " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):
        return f"pid {pid}"
    line = line if len(line) <= 100 else line[:97] + "..."
    tag = engine_tag(pid) if owner else None
    ours = "; an engine process of this pipeline's status file" if tag and tag.startswith(owner + "/") else ""
    return f"pid {pid}" + (f" ({line}{ours})" if line or ours else "")


def port_holder(host: str, port: int) -> str:
    """Who listens on ``port``: "pid N (command line)", or "" if this user cannot see it."""
    pid = listening_pid(port)
    return describe_pid(pid) if pid else ""


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (a bind test, like the engine's own)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False
