"""Applies a fault schedule during a run: signals to processes, or the simulator's control route.

Each server a fault can name is a :class:`FaultTarget`: its control URL (the
simulator's ``POST /sim/faults``) and a way to find its pid *at the moment of
the fault* (the launch pipeline restarts a killed server under a new pid).
Pids come from the launch pipeline's status file, from the process listening
on the server's port, or from the caller (a benchmark's own ``SimProcess``).
What happened to every event, and when, is returned for the result file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from model_server.bench.faults import FaultEvent
from model_server.common.processes import listening_pid, same_process
from model_server.errors import LaunchError
from model_server.launcher.status_file import read_status

__all__ = ["AppliedFault", "FaultInjector", "FaultTarget", "StalePid", "pid_from_status_file", "pid_listening_on"]

log = logging.getLogger(__name__)


class StalePid(RuntimeError):
    """The status file's pid is no longer the process it names (its create time differs)."""


def pid_from_status_file(path: str | Path, server: str) -> int | None:
    """The pid the launch pipeline's status file gives ``server`` (None if absent or unreadable).

    When the entry has a ``create_time``, the pid must still be that process
    (a reused pid must never get a signal): raises :class:`StalePid` otherwise.
    """
    try:
        data = read_status(path)
    except LaunchError:
        return None
    entry = (data or {}).get("servers", {}).get(server)
    pid = entry.get("pid") if isinstance(entry, dict) else None
    if not (isinstance(pid, int) and pid > 0):
        return None
    create_time = entry.get("create_time")
    if isinstance(create_time, (int, float)) and not same_process(pid, float(create_time)):
        raise StalePid(f"pid {pid} of {server} in {path} is not that process any more (it ended or the pid was reused)")
    return pid


def pid_listening_on(host: str, port: int) -> int | None:
    """The pid of a process of this user listening on host:port (or on a wildcard address)."""
    return listening_pid(port, (host, "0.0.0.0", "::"))


@dataclass(frozen=True)
class FaultTarget:
    """A server faults can act on."""

    name: str
    control_url: str | None  # "http://host:port" of a simulator, for sim-route faults
    pid: Callable[[], int | None]  # looked up when the fault happens
    api_key: str | None = None
    lookup_in_thread: bool = True  # the lookup may block (psutil.net_connections): off the event loop


@dataclass(frozen=True)
class AppliedFault:
    event: FaultEvent
    applied_s: float | None  # seconds from the run start when it was applied
    ok: bool
    detail: str

    def as_dict(self) -> dict:
        return {
            **self.event.as_dict(),
            "spec": self.event.describe(),
            "undo": self.event.undo,
            "applied_s": self.applied_s,
            "ok": self.ok,
            "detail": self.detail,
        }


class FaultInjector:
    """Applies events at their times; never raises for a fault that cannot be applied (it is recorded)."""

    def __init__(
        self,
        events: Sequence[FaultEvent],
        targets: Mapping[str, FaultTarget],
        *,
        timeout_s: float = 3.0,
        send_signal: Callable[[int, int], None] = os.kill,
    ) -> None:
        self.events = tuple(sorted(events, key=lambda e: e.at_s))
        self.targets = dict(targets)
        self.timeout_s = timeout_s
        self._send_signal = send_signal
        self._http: httpx.AsyncClient | None = None
        self.applied: list[AppliedFault] = []

    async def _control(self, target: FaultTarget, body: dict) -> str:
        if not target.control_url:
            raise RuntimeError(f"server {target.name} has no simulator control URL")
        headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        http = self._http_client()
        if body:
            response = await http.post(f"{target.control_url}/sim/faults", json=body, headers=headers)
        else:
            response = await http.post(f"{target.control_url}/sim/reset", headers=headers)
        response.raise_for_status()
        return f"sim faults now {response.text[:200]}"

    async def apply(self, event: FaultEvent, now_s: float | Callable[[], float]) -> AppliedFault:
        """Apply one event now; the outcome (never an exception) says whether it took effect.

        ``now_s`` is the time to record, or a function giving it, called once the
        fault has taken effect (so a slow pid lookup or control call is not hidden).
        """
        target = self.targets.get(event.server)
        try:
            if target is None:
                raise RuntimeError(f"no server named {event.server}")
            if event.signal is not None:
                pid = await asyncio.to_thread(target.pid) if target.lookup_in_thread else target.pid()
                if pid is None:
                    raise RuntimeError(f"no pid known for {event.server}")
                self._send_signal(pid, event.signal)
                detail = f"signal {event.signal} to pid {pid}"
            else:
                body = event.sim_faults()
                assert body is not None
                detail = await self._control(target, body)
            ok = True
        except (OSError, RuntimeError, httpx.HTTPError) as err:
            ok, detail = False, f"{type(err).__name__}: {err}"
        at_s = now_s() if callable(now_s) else now_s
        outcome = AppliedFault(event, at_s, ok, detail)
        detail = (
            outcome.detail if len(outcome.detail) <= 120 else outcome.detail[:117] + "..."
        )  # the result file has it all
        log.info("fault %s at %.2fs: %s", event.describe(), at_s, detail)
        self.applied.append(outcome)
        return outcome

    def _http_client(self) -> httpx.AsyncClient:
        # Made once, before the first fault is due: building a client (its TLS
        # context) takes tens of milliseconds, which would make faults late.
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.timeout_s)
        return self._http

    async def run(
        self,
        start: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> list[AppliedFault]:
        """Apply every event at ``start + at_s``; cancel it to end the run.

        On cancel, the faults not yet due are dropped, but every pending undo
        (resume, unhang, a rate back to 0, slow back to 1) is applied at once and
        recorded at that time: a run never leaves a server stopped or faulted.
        """
        if any(e.sim_faults() is not None for e in self.events):
            self._http_client()
        since_start = lambda: clock() - start  # noqa: E731
        try:
            for event in self.events:
                delay = start + event.at_s - clock()
                if delay > 0:
                    await sleep(delay)
                await self.apply(event, since_start)
        finally:
            pending_undos = [e for e in self.not_applied() if e.undo]
            if pending_undos:
                await self._undo_all(pending_undos, since_start)
            if self._http is not None:
                await asyncio.shield(self._http.aclose())
                self._http = None
        return self.applied

    async def _undo_all(self, events: list[FaultEvent], since_start: Callable[[], float]) -> None:
        for event in events:
            await self.apply(event, since_start)  # each bounded by timeout_s; failures are recorded

    def not_applied(self) -> list[FaultEvent]:
        done = {id(a.event) for a in self.applied}
        return [e for e in self.events if id(e) not in done]
