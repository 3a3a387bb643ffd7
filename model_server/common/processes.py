"""Processes by identity, process groups ended with a deadline, log tails: one home for the launcher, sim and bench.

A pid alone names no process for long: the OS reuses it. Every record that
must find a process again (the status file, a fault schedule, a stale run)
keeps the pid *and* its start time (psutil's ``create_time``), and
:func:`same_process` checks both, so a signal never reaches an unrelated
process that inherited the pid.

Ending a group (:func:`end_processes`) is SIGTERM and SIGCONT (a stopped,
"hung" process must run to handle SIGTERM), a grace period, SIGKILL, and a
bounded wait: never an unbounded one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "create_time",
    "end_processes",
    "group_alive",
    "identified_process",
    "is_running",
    "listening_pid",
    "log_tail",
    "same_process",
    "signal_group",
    "signal_process",
    "tail_lines",
    "wait_gone",
]

SAME_START_S = 0.05  # two start times closer than this are the same process (psutil rounds them)
KILL_WAIT_S = 10.0  # after SIGKILL, how long to wait for the kernel to remove them
POLL_S = 0.05


# ---- identity ----------------------------------------------------------------------------------------


def _is_pid(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 31


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def create_time(pid: int) -> float | None:
    """psutil's start time of ``pid`` (with the pid, it names one process), None if it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def identified_process(pid: Any, started: Any) -> psutil.Process | None:
    """The live process ``pid`` if it started at ``started`` (not a zombie), else None; bad values give None."""
    if not _is_pid(pid) or not _is_time(started):
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - started) < SAME_START_S and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except psutil.Error:
        pass
    return None


def same_process(pid: Any, started: Any) -> bool:
    """Whether ``pid`` is alive and is the very process started at ``started``."""
    return identified_process(pid, started) is not None


def is_running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (psutil refuses a pid reused since ``proc`` was made)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def listening_pid(port: int, hosts: Sequence[str] | None = None) -> int | None:
    """The pid listening on TCP ``port`` (on one of ``hosts``, or any address), None if none this user can see."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    for c in connections:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            if hosts is None or c.laddr.ip in hosts:
                return c.pid
    return None


# ---- signals and groups -------------------------------------------------------------------------------


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pgid``; a group that is gone (or not ours) is not an error."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_process(proc: psutil.Process, sig: int) -> None:
    """Send ``sig`` to ``proc`` (psutil refuses a reused pid); a process that is gone is not an error."""
    try:
        proc.send_signal(sig)
    except (psutil.Error, OSError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is alive (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
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


def wait_gone(
    groups: Sequence[int],
    singles: Sequence[psutil.Process],
    children: Sequence[subprocess.Popen[bytes]],
    timeout_s: float,
) -> tuple[list[int], list[psutil.Process]]:
    """Wait up to ``timeout_s`` for the groups and processes to end; return those still alive.

    ``children`` (our own) are polled meanwhile, so a leader that exited is
    reaped and does not keep its group "alive" as a zombie.
    """
    deadline = time.monotonic() + timeout_s
    alive, running = list(groups), list(singles)
    while True:
        for child in children:
            child.poll()
        alive = [g for g in alive if group_alive(g)]
        running = [p for p in running if is_running(p)]
        if (not alive and not running) or time.monotonic() >= deadline:
            return alive, running
        time.sleep(POLL_S)


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def end_processes(
    groups: Iterable[int],
    processes: Iterable[psutil.Process],
    grace_s: float,
    reap: Iterable[subprocess.Popen[bytes]] = (),
) -> tuple[list[int], list[psutil.Process]]:
    """SIGTERM (and SIGCONT) every group and process, SIGKILL what is left after ``grace_s``; bounded.

    A process inside one of ``groups`` gets its group's signal only, never a
    second one. ``reap`` are our own children among them, waited for so they
    leave no zombie. Returns the groups and processes that needed SIGKILL.
    """
    pgids = [g for g in set(groups) if g and g > 1]
    children = list(reap)
    singles = [p for p in {p.pid: p for p in processes}.values() if _group_of(p.pid) not in pgids]
    for g in pgids:
        signal_group(g, signal.SIGTERM)
        signal_group(g, signal.SIGCONT)
    for p in singles:
        signal_process(p, signal.SIGTERM)
        signal_process(p, signal.SIGCONT)
    remaining, left = wait_gone(pgids, singles, children, grace_s)
    for g in remaining:
        signal_group(g, signal.SIGKILL)
    for p in left:
        signal_process(p, signal.SIGKILL)
    wait_gone(remaining, left, children, KILL_WAIT_S)
    for child in children:
        try:
            child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
    return remaining, left


# ---- log tails ----------------------------------------------------------------------------------------


def tail_lines(text: str, lines: int = 1) -> str:
    """The last ``lines`` non-empty lines of ``text``, joined by newlines ("" if none)."""
    kept = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(kept[-lines:]) if kept and lines > 0 else ""


def log_tail(path: str | os.PathLike[str], lines: int = 1, max_bytes: int = 4096) -> str:
    """The last ``lines`` non-empty lines among the last ``max_bytes`` of a log file ("" if unreadable).

    For error messages: why an engine or a simulator exited is in its last lines.
    """
    try:
        with open(Path(path), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return tail_lines(text, lines)
