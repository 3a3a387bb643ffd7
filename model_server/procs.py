"""Engine processes: spawn in a new process group, kill whole groups, check ports.

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
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

from model_server.launch import LaunchCommand

__all__ = ["group_alive", "kill_groups", "log_tail", "port_in_use", "spawn_engine"]

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


def spawn_engine(command: LaunchCommand, log_file: Path, drop_env: Iterable[str] = ()) -> subprocess.Popen[bytes]:
    """Start ``command`` in a new session (its own process group), output appended to ``log_file``.

    ``drop_env`` names variables not to pass on (the API-key variable: the
    engine reads the key from its 0600 file).
    """
    env = {k: v for k, v in os.environ.items() if k not in set(drop_env)}
    env.update(command.env)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"\n=== model-server {stamp}: starting {command.server}: {command.render()}\n".encode())
        out.flush()
        return subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(os.getpid()), *command.argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is alive (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    import psutil  # noqa: PLC0415

    try:  # the common case: the leader itself is still running
        if psutil.Process(pgid).status() != psutil.STATUS_ZOMBIE and os.getpgid(pgid) == pgid:
            return True
    except (psutil.Error, ProcessLookupError):
        pass
    for proc in psutil.process_iter(["status"]):  # leader gone or a zombie: look for its group's others
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_groups(pgids: Iterable[int], grace_s: float, reap: Iterable[subprocess.Popen[bytes]] = ()) -> list[int]:
    """SIGTERM every group, wait up to ``grace_s``, SIGKILL what is left; return the groups killed hard.

    ``reap`` are our own children among them, waited for so they leave no zombie.
    Bounded: after SIGKILL it waits at most 10 s more.
    """
    groups = [g for g in set(pgids) if g and g > 1]
    children = list(reap)
    for g in groups:
        _signal_group(g, signal.SIGTERM)
        _signal_group(g, signal.SIGCONT)  # a stopped (hung) process must run to handle SIGTERM
    remaining = _wait_groups(groups, children, grace_s)
    for g in remaining:
        _signal_group(g, signal.SIGKILL)
    _wait_groups(remaining, children, 10.0)
    for child in children:
        try:
            child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
    return remaining


def _wait_groups(groups: list[int], children: list[subprocess.Popen[bytes]], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    alive = list(groups)
    while True:
        for child in children:
            child.poll()  # reap, so the leader is not a zombie that keeps the group "alive"
        alive = [g for g in alive if group_alive(g)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


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


def log_tail(path: Path, max_chars: int = 300) -> str:
    """The last non-empty line of a log file (for error messages), shortened."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][-max_chars:] if lines else ""
