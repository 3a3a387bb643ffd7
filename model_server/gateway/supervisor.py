"""Gateway processes, supervised as the pipeline supervises engines: spawn, liveness, restart with backoff, stop.

A :class:`GatewaySupervisor` keeps one gateway up in its own thread, with the
launcher's state machine (:mod:`model_server.launcher.lifecycle`)::

    STARTING -> READY -> (exit, or liveness_failures_to_restart failed GET /liveness in a row)
        -> RESTARTING (backoff) -> STARTING ...   more than max_restarts in restart_window_s -> FAILED
    any state -- stop --> STOPPED

One start: check that its port and metrics port are free (taken at the first
start: refused at once, naming the holder); spawn the launcher process
(:mod:`model_server.gateway.launcher`) through the engines' trampoline, so it
gets its own process group, the parent-death signal, the ``MODEL_SERVER_ENGINE``
tag and a redacting log pump into ``<log_dir>/gateway-<group>.log``; wait for
``/liveness`` (200 once it listens); when its workers are not on its command
line (its key differs from the engines'), register them through the worker
API (:mod:`model_server.gateway.membership`); then watch. While it is READY,
and when the table has ``[launch] control_port``, a
:class:`~model_server.gateway.sync_loop.SyncLoop` keeps its worker list to
the READY replicas: at each start, the supervisor registers only the replicas
the control APIs call READY (or do not describe), and the sync's first round
removes those that are not READY among the workers on the gateway's command
line, so a restarted gateway gets the READY set again.

:class:`GatewayRunner` runs the supervisors of ``model-server gateway`` until
SIGINT, SIGTERM, SIGHUP or SIGQUIT, then stops every gateway (SIGTERM, which
the gateway answers with a graceful shutdown, then SIGKILL after its
``stop_grace_s`` and a margin, to its process group and every process with its
tag), and returns 0 if every gateway stayed READY until the stop, else 1.

Every OS call goes through :class:`GatewayDeps`, so a test can replace them.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_server.common.control_status import ControlAnswer, get_control_status
from model_server.common.processes import log_tail
from model_server.common.stop_signals import StopFlag
from model_server.common.threads import finish_all
from model_server.common.urls import server_url
from model_server.config import Fleet
from model_server.errors import ConfigError, LaunchError
from model_server.gateway.command import build_command
from model_server.gateway.membership import Membership
from model_server.gateway.settings import PINNED_VERSION, GatewaySettings
from model_server.gateway.sync_loop import SyncLoop
from model_server.launcher import processes as procs
from model_server.launcher.lifecycle import RestartHistory, ServerState, decide_after_failure, transition
from model_server.launcher.redact import RedactingFilter, Redactor, Secret

__all__ = [
    "GatewayDeps",
    "GatewayKeys",
    "GatewayRunner",
    "GatewaySupervisor",
    "probe_liveness",
    "read_keys",
    "router_installed",
]

log = logging.getLogger(__name__)
S = ServerState
STOP_MARGIN_S = 5.0  # beyond the gateway's own shutdown grace, before SIGKILL
READY_POLL_S = 0.1
WATCH_POLL_S = 0.2
LOG_DRAIN_S = 1.0
REGISTER_TIMEOUT_S = 5.0  # one call of the worker API while registering
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the gateway colours its log lines


def probe_liveness(url: str, timeout_s: float) -> tuple[bool, str]:
    """GET ``url`` (the gateway's /liveness): (True, "") on 200, else (False, why)."""
    import httpx  # noqa: PLC0415

    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.TimeoutException:
        return False, f"no answer within {timeout_s:g} s"
    except httpx.HTTPError as err:
        return False, f"{type(err).__name__}: {err}"
    return (True, "") if response.status_code == 200 else (False, f"status {response.status_code}")


def router_installed() -> bool:
    """Whether sglang_router can be imported here (without importing it)."""
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec("sglang_router") is not None


@dataclass(frozen=True)
class GatewayKeys:
    """The engines' key and the gateway's own key, read once from the variables the table names."""

    worker: Secret | None = None
    gateway: Secret | None = None
    control: Secret | None = None  # the pipelines' control key, sent to their control APIs (needed off-host)

    def values(self) -> list[str]:
        return [k.value for k in (self.worker, self.gateway, self.control) if k is not None]


def read_keys(fleet: Fleet, settings: Sequence[GatewaySettings]) -> dict[str, GatewayKeys]:
    """Each gateway's keys, by gateway name; ConfigError naming the variable when one is unset or empty."""
    raw = fleet.api_key(required=True)
    worker = Secret(raw) if raw else None
    control_raw = fleet.launch.control_key(required=False) if any(st.control for st in settings) else None
    control = Secret(control_raw) if control_raw else None
    out: dict[str, GatewayKeys] = {}
    for st in settings:
        env = st.gateway_key_env
        value = os.environ.get(env, "") if env else ""
        if env and not value:
            raise ConfigError(
                f"{fleet.source}: gateway '{st.name}' takes its key from the variable {env}, which is unset or empty. "
                f"Fix: export {env}=<key> before `model-server gateway` (never put the key in the file)"
            )
        out[st.name] = GatewayKeys(worker, Secret(value) if value else None, control if st.control else None)
    return out


@dataclass
class GatewayDeps:
    """The supervisor's seams: every OS call, the clock and the random source."""

    spawn: Callable[..., Any] = procs.spawn_engine
    kill_groups: Callable[..., Any] = procs.kill_groups
    probe: Callable[[str, float], tuple[bool, str]] = probe_liveness
    port_in_use: Callable[[str, int], bool] = procs.port_in_use
    port_holder: Callable[[str, int], str] = procs.port_holder
    membership: Callable[..., Membership] = Membership
    read_control: Callable[..., ControlAnswer] = get_control_status
    clock: Callable[[], float] = time.monotonic
    rand: Callable[[], float] = random.random


def last_words(text: str) -> str:
    """The last line of a gateway's log that is not one of its per-request lines, without colours."""
    lines = [_ANSI.sub("", ln).strip() for ln in text.splitlines()]
    useful = [ln for ln in lines if ln and "http_request{" not in ln]
    return (useful or [ln for ln in lines if ln] or [""])[-1][-300:]


class _Stopped(Exception):
    """The runner is stopping this gateway."""


class GatewaySupervisor:
    """Keeps one gateway up until stopped or FAILED; :meth:`run` returns the final state."""

    def __init__(
        self,
        settings: GatewaySettings,
        keys: GatewayKeys = GatewayKeys(),
        deps: GatewayDeps | None = None,
        *,
        redactor: Redactor | None = None,
        tag: str | None = None,
    ) -> None:
        """``keys``: none by default (a table that names no key variable); ``redactor``: by default one that knows
        ``keys`` (the runner's also knows the other gateways' keys and launch.secret_env); ``tag``: the engine tag
        of the gateway's processes (``MODEL_SERVER_ENGINE``), by which a stop also finds those outside its group."""
        self.settings = settings
        self.keys = keys
        self.deps = deps or GatewayDeps()
        self.redactor = redactor or Redactor(keys.values())
        self.tag = tag
        self.state: ServerState | None = None
        self.pid: int | None = None
        self.restarts = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._lock = threading.Lock()  # spawn vs. stop
        self._proc: subprocess.Popen[bytes] | None = None
        self._history = RestartHistory()
        self._liveness_url = server_url(settings.probe_host, settings.port, "/liveness")
        # The launcher needs only the gateway's key; the engines' key, when another variable holds it, stays here.
        self._drop_env = tuple(e for e in (settings.worker_key_env,) if e and e != settings.gateway_key_env)

    def __repr__(self) -> str:
        return f"GatewaySupervisor({self.settings.name!r}, {self.state.value if self.state else 'new'})"

    def status(self) -> dict[str, Any]:
        """What the CLI reports: no secret (last_error is redacted)."""
        return {
            "name": self.settings.name, "group": self.settings.group, "state": self.state.value if self.state else None,
            "pid": self.pid, "restarts": self.restarts, "last_error": self.last_error, "url": self.settings.base_url,
            "metrics": self.settings.metrics_url,
        }  # fmt: skip

    # ---- from other threads ----------------------------------------------------------------------------

    def request_stop(self) -> subprocess.Popen[bytes] | None:
        """Stop restarting; hand over the running gateway (the caller ends it: one SIGTERM, not two)."""
        with self._lock:
            self._stop.set()
            proc, self._proc = self._proc, None
            return proc

    def owns_tag(self, tag: str) -> bool:
        return self.tag is not None and tag == self.tag

    # ---- the loop ----------------------------------------------------------------------------------------

    def _set(self, new: ServerState, detail: str = "") -> None:
        old = self.state
        if new is old:
            return
        self.state = transition(old, new)
        level = logging.ERROR if new is S.FAILED else logging.INFO
        log.log(
            level,
            "gateway %s: %s -> %s%s",
            self.settings.name,
            old.value if old else "new",
            new.value,
            f" ({detail})" if detail else "",
        )

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(max(0.0, seconds)):
            raise _Stopped

    def run(self) -> ServerState:
        try:
            self._loop()
        except _Stopped:
            self._kill()
            if self.state is not S.FAILED:
                self.pid = None
                self._set(S.STOPPED)
        except LaunchError as err:
            self._kill()
            self._fail(str(err))
        except Exception as err:  # a bug must not leave a gateway behind
            log.exception("gateway %s: supervisor error", self.settings.name)
            self._kill()
            self._fail(f"supervisor error: {type(err).__name__}: {err}")
        return self.state  # type: ignore[return-value]

    def _fail(self, reason: str) -> None:
        reason = self.redactor.redact(reason)
        if self.state not in (S.FAILED, S.STOPPED):
            self.last_error, self.pid = reason, None
            self._set(S.FAILED, reason)

    def _loop(self) -> None:
        first = True
        while True:
            self._check_ports(first)
            proc = self._spawn()
            follower = self._follower()
            try:
                cause = self._wait_live(proc)
                given: tuple[str, ...] = ()
                if cause is None:
                    cause, given = self._register(follower)
                if cause is None:
                    st = self.settings
                    self._set(S.READY, f"pid {proc.pid}, {st.base_url}, metrics {st.metrics_url}")
                    if follower is not None:
                        follower.start(given)
                    cause = self._watch(proc)
            finally:
                if follower is not None:
                    follower.stop()
            if self._stop.is_set():
                raise _Stopped
            self._kill()
            decision = decide_after_failure(
                self._history,
                self.deps.clock(),
                cause=cause,
                max_restarts=self.settings.max_restarts,
                window_s=self.settings.restart_window_s,
                backoff_initial_s=self.settings.restart_backoff_initial_s,
                backoff_max_s=self.settings.restart_backoff_max_s,
                rand=self.deps.rand,
                fix="Read its log, fix the cause, start `model-server gateway` again",
            )
            if not decision.restart:
                raise LaunchError(
                    f"gateway '{self.settings.name}': {decision.reason.replace('launch.max_restarts', 'max_restarts')}"
                )
            self._history = decision.history
            self.restarts = self._history.total
            self.last_error, self.pid = self.redactor.redact(cause), None
            self._set(S.RESTARTING, f"{self.last_error}; restart {decision.attempt} in {decision.delay_s:.1f} s")
            self._sleep(decision.delay_s)
            first = False

    def _check_ports(self, first: bool) -> None:
        st = self.settings
        for what, host, port in (
            ("port", st.host, st.port),
            ("prometheus_port", st.router["prometheus_host"], st.router["prometheus_port"]),
        ):
            if not self.deps.port_in_use(host, port):
                continue
            holder = self.deps.port_holder(host, port)
            by = f" ({holder})" if holder else ""
            if first:
                raise LaunchError(
                    f"gateway '{st.name}': its {what} {port} on {host} is already in use by another "
                    f"process{by}. Stop that "
                    f"process (see `ss -ltnp 'sport = :{port}'`) or set another {what} in its [[gateways]] entry"
                )
            log.warning(
                "gateway %s: its %s %d is in use%s; starting anyway (a failed start counts as a restart)",
                st.name,
                what,
                port,
                by,
            )

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = build_command(self.settings)
        with self._lock:
            if self._stop.is_set():
                raise _Stopped
            try:
                self._proc = self.deps.spawn(
                    command, Path(self.settings.log_file), self._drop_env, redactor=self.redactor, tag=self.tag
                )
            except OSError as err:
                raise LaunchError(f"gateway '{self.settings.name}': cannot start {command.argv[0]}: {err}") from err
            proc = self._proc
        self.pid = proc.pid
        self._set(S.STARTING, f"pid {proc.pid}, log {self.settings.log_file}")
        return proc

    def _exit_cause(self, proc: subprocess.Popen[bytes]) -> str:
        code = proc.returncode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        pump = getattr(proc, "log_pump", None)
        if pump is not None:
            pump.join(LOG_DRAIN_S)
        tail = last_words(log_tail(self.settings.log_file, lines=40, max_bytes=16384))
        return self.redactor.redact(f"the gateway exited ({how})" + (f"; log: {tail}" if tail else ""))

    def _wait_live(self, proc: subprocess.Popen[bytes]) -> str | None:
        """None once /liveness answers 200; else why not (exit or startup timeout)."""
        deadline = self.deps.clock() + self.settings.startup_timeout_s
        while True:
            if proc.poll() is not None:
                return self._exit_cause(proc)
            now = self.deps.clock()
            if now >= deadline:
                return (
                    f"no 200 from {self._liveness_url} within startup_timeout_s ({self.settings.startup_timeout_s:g} s)"
                )
            ok, _why = self.deps.probe(
                self._liveness_url, max(0.1, min(self.settings.liveness_timeout_s, deadline - now))
            )
            if ok:
                return None
            self._sleep(READY_POLL_S)

    def _register(self, follower: SyncLoop | None) -> tuple[str | None, tuple[str, ...]]:
        """Register the group's workers through the worker API when they are not on the command line: those the
        control APIs call READY, and those they do not describe (all of them without a control API to follow).

        (why it failed, or None; the workers the gateway was given at its start)."""
        st = self.settings
        if st.workers_on_command_line or not st.workers:
            return None, st.workers
        workers, left_out = st.workers, ()
        if follower is not None:
            want = follower.hear()
            workers = tuple(u for u in st.workers if want.get(u, (True, ""))[0])
            left_out = tuple(want[u][1] for u in st.workers if u not in workers)
        try:
            membership = self.deps.membership(
                st.url, self.keys.gateway, timeout_s=REGISTER_TIMEOUT_S, key_env=st.gateway_key_env
            )
            with membership as members:
                queued = members.ensure(workers, worker_api_key=self.keys.worker, health=st.worker_health)
        except LaunchError as err:
            return self.redactor.redact(f"registering its workers failed: {err}"), ()
        if queued or left_out:
            log.info(
                "gateway %s: registered %d worker(s) through POST /workers: %s%s", st.name, len(queued),
                ", ".join(queued) or "none", f" (not: {', '.join(left_out)})" if left_out else "",
            )  # fmt: skip
        return None, queued

    def _follower(self) -> SyncLoop | None:
        """The worker-list sync of this start of the gateway, not started yet (None without a control API)."""
        if self.settings.control is None:
            return None
        return SyncLoop(
            self.settings, gateway_key=self.keys.gateway, worker_key=self.keys.worker, control_key=self.keys.control,
            membership=self.deps.membership, read_control=self.deps.read_control, clock=self.deps.clock,
        )  # fmt: skip

    def _watch(self, proc: subprocess.Popen[bytes]) -> str:
        """Why the gateway must restart: it exited, or too many failed liveness probes in a row."""
        st = self.settings
        failures = 0
        next_probe = self.deps.clock() + st.liveness_interval_s
        while True:
            if self._stop.is_set():
                raise _Stopped
            if proc.poll() is not None:
                return self._exit_cause(proc)
            if self.deps.clock() < next_probe:
                self._sleep(min(WATCH_POLL_S, next_probe - self.deps.clock()))
                continue
            ok, why = self.deps.probe(self._liveness_url, st.liveness_timeout_s)
            next_probe = self.deps.clock() + st.liveness_interval_s
            if proc.poll() is not None:
                return self._exit_cause(proc)
            if ok:
                failures = 0
                continue
            failures += 1
            log.warning(
                "gateway %s: liveness probe %d/%d failed: %s", st.name, failures, st.liveness_failures_to_restart, why
            )
            if failures >= st.liveness_failures_to_restart:
                return f"hung: {failures} liveness probes failed in a row (last: {why})"

    def _kill(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            tags = self.owns_tag if self.tag is not None else None
            self.deps.kill_groups([proc.pid], self.settings.stop_grace_s + STOP_MARGIN_S, reap=[proc], tags=tags)
            pump = getattr(proc, "log_pump", None)
            if pump is not None:
                pump.join(LOG_DRAIN_S)


class GatewayRunner:
    """``model-server gateway``: the selected gateways until a stop signal (or until all have FAILED)."""

    def __init__(self, fleet: Fleet, settings: Sequence[GatewaySettings], deps: GatewayDeps | None = None) -> None:
        self.fleet = fleet
        self.settings = tuple(settings)
        self.deps = deps or GatewayDeps()
        self.supervisors: list[GatewaySupervisor] = []
        self._stop_flag = StopFlag()

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        self._stop_flag.request(signum)

    def run(self, install_signals: bool = True) -> int:
        if not router_installed():
            raise LaunchError(
                f"sglang-router is not installed in this Python ({sys.executable}): pip install "
                "'model-server[gateway]' "
                f"(sglang-router=={PINNED_VERSION}), then start the gateway again"
            )
        keys = read_keys(self.fleet, self.settings)
        values = [v for k in keys.values() for v in k.values()]
        redactor = Redactor([*values, *(os.environ.get(n, "") for n in self.fleet.launch.secret_env)])
        filt = RedactingFilter(redactor)
        handlers = list(logging.getLogger().handlers)
        for h in handlers:
            h.addFilter(filt)
        try:
            with self._stop_flag.handling(install_signals):
                return self._run(keys, redactor)
        finally:
            for h in handlers:
                h.removeFilter(filt)

    def _run(self, keys: dict[str, GatewayKeys], redactor: Redactor) -> int:
        run = f"gateway/{os.getpid()}/{secrets.token_hex(4)}/"
        self.supervisors = [
            GatewaySupervisor(st, keys[st.name], self.deps, redactor=redactor, tag=run + st.name)
            for st in self.settings
        ]
        log.info(
            "gateway(s) %s for %s; stop with Ctrl-C or SIGTERM",
            ", ".join(f"{st.name} (group {st.group}) on {st.base_url}" for st in self.settings), self.fleet.source,
        )  # fmt: skip
        executor = ThreadPoolExecutor(max_workers=len(self.supervisors), thread_name_prefix="gateway")
        at_stop: dict[str, ServerState | None] = {}
        try:
            futures = [executor.submit(sup.run) for sup in self.supervisors]
            while self._stop_flag.signum is None and not all(f.done() for f in futures):
                time.sleep(0.05)
            at_stop = {sup.settings.name: sup.state for sup in self.supervisors}
            signum = self._stop_flag.signum
            if signum is not None:
                log.info("signal %s: stopping %d gateway(s)", signal.Signals(signum).name, len(self.supervisors))
            else:
                log.error("no gateway is left running (all FAILED): stopping")
            self._stop_all(run)
            deadline = time.monotonic() + max(st.stop_grace_s for st in self.settings) + STOP_MARGIN_S + 15.0
            finish_all(futures, deadline, "a gateway supervisor thread")
        finally:
            self._stop_all(run)  # a no-op unless an error skipped the stop above
            executor.shutdown(wait=False, cancel_futures=True)
        return self._verdict(at_stop)

    def _stop_all(self, run: str) -> None:
        running = [p for p in (sup.request_stop() for sup in self.supervisors) if p is not None]
        if not running:
            return
        grace = max(st.stop_grace_s for st in self.settings) + STOP_MARGIN_S
        hard = self.deps.kill_groups(
            [p.pid for p in running], grace, reap=running, tags=lambda tag: tag.startswith(run)
        )
        for proc in running:
            pump = getattr(proc, "log_pump", None)
            if pump is not None:
                pump.join(LOG_DRAIN_S)
        if hard:
            log.warning("SIGKILLed %d gateway process(es) still alive after %g s: %s", len(hard), grace, hard)

    def _verdict(self, at_stop: dict[str, ServerState | None]) -> int:
        bad = {n: s for n, s in at_stop.items() if s is not S.READY}
        if not bad and self._stop_flag.signum is not None:
            log.info("all %d gateway(s) were READY until the stop", len(at_stop))
            return 0
        for sup in self.supervisors:
            if sup.settings.name in bad:
                state = bad[sup.settings.name]
                log.error(
                    "gateway %s was %s at the stop%s", sup.settings.name, state.value if state else "not started",
                    f": {sup.last_error}" if sup.last_error else "",
                )  # fmt: skip
        return 1
