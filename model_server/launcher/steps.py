"""One server's supervision as a pure step: ``step(state, event, now) -> (state, actions)``.

Every decision of the supervisor and its deadline arithmetic live here, as
functions of (state, event, now): no clock, no sleep, no process, so each is
tested in microseconds with a fake clock (tests/test_supervisor_steps.py).
The loop in supervisor.py reads the events and performs the actions
(:mod:`model_server.launcher.events`). Its phases, each with its own deadlines::

    Pending -> GpuWait --free--> PortWait --free--> Spawning --> Starting --200--> Watching
                 |  busy: read again every gpu_poll_interval_s     | exit, or no 200      | exit, or
                 |  busy past gpu_wait_timeout_s: FAILED           | by startup_timeout_s | N failed probes
                 |  memory short: FAILED                           v                      v
                 +<--------------------------------------- Backoff <-------- a failure ---+
    PortWait: taken at the first start: FAILED at once; at a restart: looked at again for
              port_settle_s, then one failed attempt of the restart budget (as a crash is)
    a failure: more than max_restarts in restart_window_s: FAILED (lifecycle.decide_after_failure)
    a stop, in any phase: Finished, STOPPED (FAILED stays FAILED)
    Watching --drain/restart (control API)--> Draining --0 running, or drain_timeout_s--> Finished STOPPED,
                                                 |  (read from drain_notice_s on)   or GpuWait (RESTARTING)
                                                 +--undrain--> Watching (READY)
    a command arrives in place of a Wait's tick; :func:`command_refusal` says which state takes which

The public state (:class:`~model_server.launcher.lifecycle.ServerState`, in the
status file) changes only through :func:`~model_server.launcher.lifecycle.transition`,
so an illegal change is a bug that raises, never a silent state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from model_server.common.urls import reachable_host, server_url
from model_server.config import LaunchPolicy, ServerSpec
from model_server.launcher import events as ev
from model_server.launcher.command import build_command
from model_server.launcher.gpu_memory import decide_gpus
from model_server.launcher.lifecycle import RestartHistory, ServerState, decide_after_failure, transition

__all__ = [
    "Settings",
    "Supervision",
    "command_refusal",
    "exit_cause",
    "hang_bounds_s",
    "health_url",
    "step",
]

S = ServerState
PROGRESS_EVERY_S = 10.0  # while an engine loads: how often "not ready yet" is logged
PORT_SETTLE_S = 1.0  # a restart looks at a busy port this long before counting it as a failed attempt
PORT_POLL_S = 0.1
READY_POLL_S = 0.25  # while an engine starts: a refused connection or a 503 costs nothing, so look often
RECORD_WORKERS_EVERY_S = 5.0  # while an engine loads, how often its workers are looked up for the status file
MIN_PROBE_TIMEOUT_S = 0.1
DRAIN_POLL_S = 0.5  # while draining: how often the engine's running requests are read

Steps = tuple["Supervision", tuple[ev.Action, ...]]
TICK, KILL, RECORD = ev.BareEvent.TICK, ev.BareAction.KILL_ENGINE, ev.BareAction.RECORD_WORKERS


def health_url(host: str, port: int, path: str = "/health_generate") -> str:
    """The readiness URL (or another ``path`` of the engine); a wildcard bind address is probed on loopback."""
    return server_url(reachable_host(host), port, path)


def hang_bounds_s(policy: LaunchPolicy) -> tuple[float, float]:
    """How long after an engine stops answering it is declared hung: (soonest, latest), in seconds.

    Probes run ``health_interval_s`` apart (from the end of one to the start
    of the next) and a probe of a hung engine takes ``health_timeout_s``;
    ``health_failures_to_restart`` failures in a row mean hung. Soonest: the
    engine stopped while a probe was waiting for its answer, just before that
    probe's timeout; latest: a probe had just succeeded.
    """
    n, t, i = policy.health_failures_to_restart, policy.health_timeout_s, policy.health_interval_s
    return (n - 1) * (t + i), n * (t + i)


@dataclass(frozen=True, slots=True)
class Settings:
    """What one supervision needs to know: the server, the policy, its files, and the random source for backoff."""

    spec: ServerSpec
    policy: LaunchPolicy
    log_file: str
    rand: Callable[[], float]
    key_file: str | None = None
    tag: str | None = None
    port_settle_s: float = PORT_SETTLE_S

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def url(self) -> str:
        return health_url(self.policy.bind_host, self.spec.port)

    @property
    def metrics_url(self) -> str:
        return health_url(self.policy.bind_host, self.spec.port, "/metrics")


# ---- phases: where the supervision is, with its deadlines --------------------------------------------


@dataclass(frozen=True, slots=True)
class Pending:
    """Not begun: the first tick starts the GPU wait."""


@dataclass(frozen=True, slots=True)
class GpuWait:
    """Reading the GPUs until they are free; the GPU wait timeout counts from ``since_s``."""

    since_s: float


@dataclass(frozen=True, slots=True)
class PortWait:
    """GPUs free, memory fraction chosen: the port must be free by ``deadline_s``.

    At the first start that is now (a taken port is a mistake in the table); at a restart, ``port_settle_s`` later.
    """

    mem_fraction: float
    deadline_s: float


@dataclass(frozen=True, slots=True)
class Spawning:
    """The spawn was asked for: waiting for its pid (or a refusal)."""


@dataclass(frozen=True, slots=True)
class Starting:
    """Spawned as ``pid``: waiting for the first 200 until ``deadline_s`` (the startup timeout).

    Progress is logged at ``next_progress_s``; the workers are recorded at ``next_record_s``.
    """

    pid: int
    since_s: float
    deadline_s: float
    next_progress_s: float
    next_record_s: float


@dataclass(frozen=True, slots=True)
class Watching:
    """READY: the next health probe is due at ``next_probe_s``; ``failures`` failed in a row so far."""

    pid: int
    next_probe_s: float
    failures: int = 0


@dataclass(frozen=True, slots=True)
class Draining:
    """DRAINING: the engine ``pid`` finishes its requests; at none left or at ``deadline_s``, ``then`` is done.

    ``told_no_metrics``: the log already says the engine has no metrics (so the drain lasts its whole timeout).
    """

    pid: int
    then: ev.AfterDrain
    deadline_s: float
    notice_until_s: float = 0.0  # no read of the running requests before (clients hear of the drain first)
    told_no_metrics: bool = False


@dataclass(frozen=True, slots=True)
class Backoff:
    """After a failure: the next start may begin at ``until_s``."""

    until_s: float


@dataclass(frozen=True, slots=True)
class Finished:
    """FAILED or STOPPED: no event changes anything any more."""


Phase = Pending | GpuWait | PortWait | Spawning | Starting | Watching | Draining | Backoff | Finished


@dataclass(frozen=True, slots=True)
class Supervision:
    """The whole state of one server's supervision (never mutated: :func:`step` returns a new one)."""

    settings: Settings
    phase: Phase = field(default_factory=Pending)
    server: ServerState = S.WAITING_GPU  # the public state, as the status file shows it
    history: RestartHistory = field(default_factory=RestartHistory)
    first_start: bool = True

    @property
    def done(self) -> bool:
        return isinstance(self.phase, Finished)


# ---- the decisions, each with its own arithmetic -----------------------------------------------------


def exit_cause(returncode: int | None, log_tail: str) -> str:
    """Why an engine ended, as the status file says it: how it exited and its last log line."""
    signalled = returncode is not None and returncode < 0
    how = f"killed by signal {-returncode}" if signalled else f"exit status {returncode}"
    return f"the engine exited ({how})" + (f"; log: {log_tail}" if log_tail else "")


def _publish(state: Supervision, new: ServerState, detail: str = "", **fields: Any) -> tuple[Supervision, ev.Publish]:
    old = state.server
    if new is not old:
        transition(old, new)  # ValueError: a bug in this module
    return replace(state, server=new), ev.Publish(old, new, detail, {"state": new.value, **fields})


_GONE = {"pid": None, "create_time": None, "pgid": None, "workers": ()}


def _finish(state: Supervision, new: ServerState, reason: str = "") -> Steps:
    """Kill whatever runs and end in ``new`` (FAILED with ``reason``, or STOPPED); FAILED stays FAILED."""
    actions: list[ev.Action] = [KILL]
    done = replace(state, phase=Finished())
    if state.server not in (S.FAILED, S.STOPPED):
        fields = {"last_error": reason, **_GONE} if new is S.FAILED else dict(_GONE)
        done, publish = _publish(done, new, reason, **fields)
        actions.append(publish)
    return done, tuple(actions)


def _after_failure(state: Supervision, cause: str, now: float, *, port_taken: bool = False) -> Steps:
    """The engine crashed, hung, never answered or found its port taken: restart after a backoff, or FAILED."""
    s, policy = state.settings, state.settings.policy
    give_up = (
        {"label": "gave up", "fix": "Stop that process or give this server another port, then start the pipeline again"}
        if port_taken
        else {}
    )
    decision = decide_after_failure(
        state.history, now, cause=cause, max_restarts=policy.max_restarts, window_s=policy.restart_window_s,
        backoff_initial_s=policy.restart_backoff_initial_s, backoff_max_s=policy.restart_backoff_max_s, rand=s.rand,
        **give_up,
    )  # fmt: skip
    if not decision.restart:
        return _finish(state, S.FAILED, f"server '{s.name}': {decision.reason}")
    killed: tuple[ev.Action, ...] = () if port_taken else (KILL,)  # no engine runs while its port is taken
    until = now + decision.delay_s
    waiting = replace(state, history=decision.history, first_start=False, phase=Backoff(until))
    waiting, publish = _publish(
        waiting, S.RESTARTING, f"{cause}; restart {decision.attempt} in {decision.delay_s:.1f} s",
        restarts=decision.history.total, last_error=cause, **_GONE,
    )  # fmt: skip
    return waiting, (*killed, publish, ev.Wait(until))


# ---- the step, phase by phase ------------------------------------------------------------------------


def _read_gpus(state: Supervision) -> ev.ReadGpus:
    return ev.ReadGpus(tuple(state.settings.spec.gpus), state.settings.policy.gpu_free_threshold_mib)


def _begin_gpu_wait(state: Supervision, now: float) -> Steps:
    return replace(state, phase=GpuWait(since_s=now)), (_read_gpus(state),)


def _on_gpu_wait(state: Supervision, phase: GpuWait, event: ev.Event, now: float) -> Steps:
    if event is TICK:
        return state, (_read_gpus(state),)
    if not isinstance(event, ev.GpusRead):
        raise _unexpected(state, event)
    s = state.settings
    waited_s = now - phase.since_s
    decision = decide_gpus(s.policy, s.name, event.readings, event.holders, waited_s)
    if decision.refusal:
        return _finish(state, S.FAILED, decision.refusal)
    if decision.mem_fraction is not None:
        deadline_s = now if state.first_start else now + s.port_settle_s
        check = ev.CheckPort(s.policy.bind_host, s.spec.port, name_holder=now >= deadline_s)
        return replace(state, phase=PortWait(decision.mem_fraction, deadline_s)), (check,)
    actions: list[ev.Action] = []
    if state.server is not S.WAITING_GPU:
        state, publish = _publish(state, S.WAITING_GPU, decision.busy)
        actions.append(publish)
    actions.append(ev.Note("info", f"waiting for GPUs ({decision.busy}), {waited_s:.0f} s so far"))
    actions.append(ev.Wait(now + s.policy.gpu_poll_interval_s))
    return state, tuple(actions)


def _on_port_wait(state: Supervision, phase: PortWait, event: ev.Event, now: float) -> Steps:
    s = state.settings
    host, port = s.policy.bind_host, s.spec.port
    if event is TICK:
        return state, (ev.CheckPort(host, port, name_holder=now >= phase.deadline_s),)
    if not isinstance(event, ev.PortChecked):
        raise _unexpected(state, event)
    if not event.in_use:
        command = build_command(s.spec, s.policy, phase.mem_fraction, key_file=s.key_file)
        return replace(state, phase=Spawning()), (ev.Spawn(command),)
    if now < phase.deadline_s:
        return state, (ev.Wait(min(now + PORT_POLL_S, phase.deadline_s)),)
    if event.holder is None:
        return state, (ev.CheckPort(host, port, name_holder=True),)
    by = f" ({event.holder})" if event.holder else ""
    if state.first_start:  # a port of another program at the first start is a mistake in the table
        return _finish(
            state, S.FAILED,
            f"server '{s.name}': port {port} on {host} is already in use by another process{by}. "
            f"Stop that process (see `ss -ltnp 'sport = :{port}'`) or give this server another port",
        )  # fmt: skip
    return _after_failure(state, f"port {port} on {host} is in use by another process{by}", now, port_taken=True)


def _on_spawning(state: Supervision, phase: Spawning, event: ev.Event, now: float) -> Steps:
    s = state.settings
    if not isinstance(event, ev.Spawned):
        raise _unexpected(state, event)
    starting = Starting(
        pid=event.pid, since_s=now, deadline_s=now + s.policy.startup_timeout_s,
        next_progress_s=now + PROGRESS_EVERY_S, next_record_s=now + RECORD_WORKERS_EVERY_S,
    )  # fmt: skip
    state, publish = _publish(
        replace(state, phase=starting), S.STARTING, f"pid {event.pid}, log {s.log_file}",
        pid=event.pid, create_time=event.create_time, pgid=event.pid, tag=s.tag, workers=(),
    )  # fmt: skip
    return state, (publish, _startup_probe(s, starting, now))


def _startup_probe(s: Settings, phase: Starting, now: float) -> ev.Probe:
    return ev.Probe(s.url, max(MIN_PROBE_TIMEOUT_S, min(s.policy.health_timeout_s, phase.deadline_s - now)))


def _on_starting(state: Supervision, phase: Starting, event: ev.Event, now: float) -> Steps:
    """Wait for the first 200: a refused connection (loading) or a 503 (warming up) means "look again"."""
    s = state.settings
    if isinstance(event, ev.EngineExited):
        return _after_failure(state, exit_cause(event.returncode, event.log_tail), now)
    if event is TICK:
        if now >= phase.deadline_s:
            cause = f"no 200 from {s.url} within the startup timeout of {s.policy.startup_timeout_s:g} s"
            return _after_failure(state, cause, now)
        return state, (_startup_probe(s, phase, now),)
    if not isinstance(event, ev.Probed):
        raise _unexpected(state, event)
    if event.ok:
        next_probe_s = now + s.policy.health_interval_s
        state, publish = _publish(replace(state, phase=Watching(phase.pid, next_probe_s)), S.READY, f"pid {phase.pid}")
        return state, (ev.BareAction.REMOVE_KEY_FILE, RECORD, publish, ev.Wait(next_probe_s))
    actions: list[ev.Action] = []
    if now >= phase.next_progress_s:
        normal = " (normal while it loads)" if "refused" in event.why or "503" in event.why else ""
        waited = f"{now - phase.since_s:.0f} s of {s.policy.startup_timeout_s:g} s"
        actions.append(ev.Note("info", f"not ready yet: {event.why}{normal}; {waited}"))
        phase = replace(phase, next_progress_s=now + PROGRESS_EVERY_S)
    if now >= phase.next_record_s:  # SGLang starts its workers while it loads, which may take minutes
        actions.append(RECORD)
        phase = replace(phase, next_record_s=now + RECORD_WORKERS_EVERY_S)
    actions.append(ev.Wait(now + min(READY_POLL_S, s.policy.health_interval_s)))
    return replace(state, phase=phase), tuple(actions)


def _on_watching(state: Supervision, phase: Watching, event: ev.Event, now: float) -> Steps:
    """Probe every health_interval_s; ``health_failures_to_restart`` failures in a row mean hung."""
    policy = state.settings.policy
    if isinstance(event, ev.EngineExited):
        return _after_failure(state, exit_cause(event.returncode, event.log_tail), now)
    if event is TICK:
        if now < phase.next_probe_s:
            return state, (ev.Wait(phase.next_probe_s),)
        return state, (ev.Probe(state.settings.url, policy.health_timeout_s),)
    if not isinstance(event, ev.Probed):
        raise _unexpected(state, event)
    next_probe_s = now + policy.health_interval_s  # from the end of one probe to the start of the next
    if event.ok:
        return replace(state, phase=Watching(phase.pid, next_probe_s)), (RECORD, ev.Wait(next_probe_s))
    failures, needed = phase.failures + 1, policy.health_failures_to_restart
    note = ev.Note("warning", f"health probe {failures}/{needed} failed: {event.why}")
    if failures >= needed:
        cause = f"hung: {failures} health probes failed in a row (last: {event.why})"
        state, actions = _after_failure(state, cause, now)
        return state, (note, *actions)
    return replace(state, phase=Watching(phase.pid, next_probe_s, failures)), (note, ev.Wait(next_probe_s))


# ---- the operator's commands, and a drain --------------------------------------------------------------

_RUNNING = (S.WAITING_GPU, S.STARTING, S.RESTARTING)


def command_refusal(server: ServerState, verb: str) -> str | None:
    """Why ``verb`` cannot be done to a server in state ``server`` now (None: it can), with what to do instead.

    The control API asks this before it hands a command over (409 with this
    text), and the step again when the command arrives (the state may have moved).
    """
    if server in (S.FAILED, S.STOPPED) and verb != "stop":
        return f"it is {server.value}, so no engine runs to {verb}. Start it with POST /servers/<name>/start"
    if verb == "stop":
        return f"it is already {server.value}" if server in (S.FAILED, S.STOPPED) else None
    if verb == "undrain":
        return None if server is S.DRAINING else f"it is {server.value}, not DRAINING: there is no drain to undo"
    if verb == "drain" and server is S.DRAINING:
        return "it is already DRAINING. Undo that with POST /servers/<name>/undrain"
    if server in _RUNNING:
        return f"it is {server.value}: wait until it is READY, or stop it with POST /servers/<name>/stop"
    return None


def _on_command(state: Supervision, command: ev.Command, now: float) -> Steps:
    """Do what the operator asked, where the state still allows it; else say why in the log and go on."""
    refusal = command_refusal(state.server, command.verb)
    if refusal is not None:
        return state, (ev.Note("warning", f"{command.verb} ignored: {refusal}"), ev.Wait(now))
    if command.verb == "stop":
        return _finish(state, S.STOPPED, "stopped through the control API")
    phase = state.phase
    if command.verb == "undrain":
        if not isinstance(phase, Draining):
            raise _unexpected(state, command)
        state, publish = _publish(replace(state, phase=Watching(phase.pid, now)), S.READY, "undrained")
        return state, (publish, ev.Wait(now))
    then: ev.AfterDrain = "restart" if command.verb == "restart" else command.then
    if isinstance(phase, Draining):  # a restart of a server already draining: restart when it is drained
        return replace(state, phase=replace(phase, then=then)), (ev.Note("info", f"once drained: {then}"), ev.Wait(now))
    if not isinstance(phase, Watching):
        raise _unexpected(state, command)
    policy = state.settings.policy
    draining = Draining(phase.pid, then, now + policy.drain_timeout_s, now + policy.drain_notice_s)
    state, publish = _publish(
        replace(state, phase=draining),
        S.DRAINING,
        f"then {then}, within {policy.drain_timeout_s:g} s (launch.drain_timeout_s)",
    )
    # Clients hear of the drain at their next read of the control API: until then the engine still gets
    # requests (and serves them), so its running requests are read only once the notice has passed.
    return state, (publish, ev.Wait(min(draining.notice_until_s, draining.deadline_s)))


def _read_running(state: Supervision, phase: Draining, now: float) -> ev.ReadRunning:
    timeout_s = max(MIN_PROBE_TIMEOUT_S, min(state.settings.policy.health_timeout_s, phase.deadline_s - now))
    return ev.ReadRunning(state.settings.metrics_url, timeout_s)


def _end_drain(state: Supervision, phase: Draining, why: str, now: float) -> Steps:
    """Stop, or restart without counting against the crash budget (the operator asked for it)."""
    if phase.then == "stop":
        return _finish(state, S.STOPPED, f"drained ({why}); stopped through the control API")
    state = replace(state, first_start=False)
    state, publish = _publish(state, S.RESTARTING, f"drained ({why}); restart asked through the control API", **_GONE)
    state, actions = _begin_gpu_wait(state, now)
    return state, (KILL, publish, *actions)


def _on_draining(state: Supervision, phase: Draining, event: ev.Event, now: float) -> Steps:
    """Read the engine's running requests every DRAIN_POLL_S until none is left or the drain timeout passes."""
    if isinstance(event, ev.EngineExited):
        return _after_failure(state, exit_cause(event.returncode, event.log_tail), now)
    timeout_s = state.settings.policy.drain_timeout_s
    if event is TICK:
        if now >= phase.deadline_s:
            return _end_drain(state, phase, f"the drain timeout of {timeout_s:g} s passed", now)
        if now < phase.notice_until_s:  # woken early (another command meanwhile): the notice still runs
            return state, (ev.Wait(min(phase.notice_until_s, phase.deadline_s)),)
        return state, (_read_running(state, phase, now),)
    if not isinstance(event, ev.RunningRead):
        raise _unexpected(state, event)
    if event.running == 0:
        return _end_drain(state, phase, "no request running", now)
    if now >= phase.deadline_s:
        return _end_drain(state, phase, f"the drain timeout of {timeout_s:g} s passed", now)
    actions: list[ev.Action] = []
    if event.running is None and not phase.told_no_metrics:
        note = f"cannot read its running requests ({event.why}): draining for the whole {timeout_s:g} s"
        actions.append(ev.Note("warning", note))
        phase = replace(phase, told_no_metrics=True)
    actions.append(ev.Wait(min(now + DRAIN_POLL_S, phase.deadline_s)))
    return replace(state, phase=phase), tuple(actions)


def _on_backoff(state: Supervision, phase: Backoff, event: ev.Event, now: float) -> Steps:
    if event is not TICK:
        raise _unexpected(state, event)
    if now < phase.until_s:
        return state, (ev.Wait(phase.until_s),)
    return _begin_gpu_wait(state, now)


def _on_pending(state: Supervision, _phase: Pending, event: ev.Event, now: float) -> Steps:
    if event is not TICK:
        raise _unexpected(state, event)
    return _begin_gpu_wait(state, now)


def _unexpected(state: Supervision, event: ev.Event) -> ValueError:
    what = event.name if isinstance(event, ev.BareEvent) else type(event).__name__
    return ValueError(f"server '{state.settings.name}': {what} is not expected in {state.phase}")


_PHASES: dict[type, Callable[..., Steps]] = {
    Pending: _on_pending,
    GpuWait: _on_gpu_wait,
    PortWait: _on_port_wait,
    Spawning: _on_spawning,
    Starting: _on_starting,
    Watching: _on_watching,
    Draining: _on_draining,
    Backoff: _on_backoff,
}


def step(state: Supervision, event: ev.Event, now: float) -> Steps:
    """The next state and the actions to perform, in order; ``now`` is the supervisor's monotonic clock.

    A stop ends every phase; a refused action (LaunchError) ends the server
    FAILED; anything else goes to the phase's own handler. An event a phase
    cannot receive is a ValueError (a bug of the loop, never of the user).
    """
    if state.done:
        return state, ()
    if event is ev.BareEvent.STOP_REQUESTED:
        return _finish(state, S.STOPPED)
    if isinstance(event, ev.Refused):
        return _finish(state, S.FAILED, event.reason)
    if isinstance(event, ev.Command):
        return _on_command(state, event, now)
    return _PHASES[type(state.phase)](state, state.phase, event, now)
