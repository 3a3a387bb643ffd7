"""Drain, undrain, restart and stop from the control API, as the supervisor's pure step decides them (fake clock)."""

from __future__ import annotations

import pytest
from test_supervisor_steps import FREE, KILL, STOP, TICK, Run

from model_server.launcher import events as ev
from model_server.launcher.lifecycle import ServerState, can_transition
from model_server.launcher.steps import DRAIN_POLL_S, command_refusal

S = ServerState
METRICS = "http://127.0.0.1:9000/metrics"


def ready(at: float = 0.0, **policy: object) -> Run:
    run = Run(**{"drain_timeout_s": 30, "drain_notice_s": 0, **policy})
    run.to_ready(at)
    return run


def drain(run: Run, at: float, verb: ev.Verb = "drain", then: ev.AfterDrain = "stop") -> None:
    """Command a drain at ``at``; past its notice, the first read of the engine's running requests."""
    publish, wait = run.feed(ev.Command(verb, then), at)
    assert (publish.old, publish.new) == (S.READY, S.DRAINING) and publish.fields == {"state": "DRAINING"}
    assert isinstance(wait, ev.Wait) and wait.until_s == at + run.state.settings.policy.drain_notice_s
    assert run.phase == "Draining"
    assert run.feed(TICK, at=wait.until_s) == (ev.ReadRunning(METRICS, 3),)  # bounded by the health timeout


def test_a_drain_reads_nothing_before_its_notice_has_passed() -> None:
    """Clients hear of a drain at their next read of the control API: the engine serves until the notice ends."""
    run = ready(drain_notice_s=2.0)
    publish, wait = run.feed(ev.Command("drain", "stop"), at=5.0)
    assert publish.new is S.DRAINING and wait == ev.Wait(7.0)
    assert run.feed(TICK, at=7.0) == (ev.ReadRunning(METRICS, 3),)
    actions = run.feed(ev.RunningRead(0), at=7.1)
    assert actions[1].new is S.STOPPED and "no request running" in actions[1].detail


def test_a_drain_timeout_shorter_than_the_notice_ends_the_drain_at_its_timeout() -> None:
    run = ready(drain_notice_s=10.0, drain_timeout_s=3.0)
    _publish, wait = run.feed(ev.Command("restart", "stop"), at=0.0)
    assert wait == ev.Wait(3.0)
    actions = run.feed(TICK, at=3.0)
    assert actions[1].new is S.RESTARTING and "drain timeout of 3 s" in actions[1].detail


def test_a_drain_waits_for_the_running_requests_then_stops() -> None:
    run = ready()
    drain(run, at=5.0)
    assert run.feed(ev.RunningRead(2)) == (ev.Wait(5.0 + DRAIN_POLL_S),)
    assert run.feed(TICK, at=5.5) == (ev.ReadRunning(METRICS, 3),)
    actions = run.feed(ev.RunningRead(0))
    assert actions[0] is KILL and actions[1].new is S.STOPPED and "no request running" in actions[1].detail
    assert run.state.done and run.state.server is S.STOPPED


def test_a_restart_drains_first_and_does_not_spend_the_crash_budget() -> None:
    run = ready()
    drain(run, at=5.0, verb="restart")
    kill, publish, read_gpus = run.feed(ev.RunningRead(0), at=6.0)
    assert kill is KILL and publish.new is S.RESTARTING and "restart asked" in publish.detail
    assert isinstance(read_gpus, ev.ReadGpus) and run.phase == "GpuWait"
    assert run.state.history.total == 0  # an operator's restart is no crash
    assert "restarts" not in publish.fields
    run.feed(FREE)
    assert run.phase == "PortWait"  # a restart: the old engine's port gets time to settle


def test_the_drain_timeout_ends_a_drain_with_requests_still_running() -> None:
    run = ready()
    drain(run, at=0.0)
    assert run.feed(ev.RunningRead(4), at=29.9) == (ev.Wait(30.0),)
    actions = run.feed(TICK, at=30.0)
    assert actions[1].new is S.STOPPED and "drain timeout of 30 s" in actions[1].detail
    run = ready()
    drain(run, at=0.0)
    actions = run.feed(ev.RunningRead(4), at=31.0)  # a slow read that ends past the deadline
    assert actions[1].new is S.STOPPED


def test_an_engine_without_metrics_is_drained_for_the_whole_timeout_and_said_once() -> None:
    run = ready()
    drain(run, at=0.0)
    note, wait = run.feed(ev.RunningRead(None, "status 404"), at=1.0)
    assert note.level == "warning" and "status 404" in note.message and "whole 30 s" in note.message
    assert wait == ev.Wait(1.0 + DRAIN_POLL_S)
    assert run.feed(ev.RunningRead(None, "status 404"), at=2.0) == (ev.Wait(2.0 + DRAIN_POLL_S),)
    assert run.feed(TICK, at=30.0)[1].new is S.STOPPED


def test_undrain_returns_to_ready_and_probing_goes_on() -> None:
    run = ready()
    drain(run, at=5.0)
    publish, wait = run.feed(ev.Command("undrain"), at=6.0)
    assert (publish.old, publish.new) == (S.DRAINING, S.READY) and wait == ev.Wait(6.0)
    assert run.phase == "Watching"
    assert run.feed(TICK) == (ev.Probe("http://127.0.0.1:9000/health_generate", 3),)


def test_a_restart_asked_while_draining_changes_what_follows_the_drain() -> None:
    run = ready()
    drain(run, at=0.0)
    note, wait = run.feed(ev.Command("restart"), at=1.0)
    assert "once drained: restart" in note.message and wait == ev.Wait(1.0)
    assert run.state.phase.then == "restart"


def test_an_engine_that_exits_while_draining_is_a_crash() -> None:
    run = ready()
    drain(run, at=0.0)
    actions = run.feed(ev.EngineExited(-9), at=1.0)
    assert actions[1].new is S.RESTARTING and run.state.history.total == 1


def test_stop_ends_a_draining_server_and_a_ready_one_at_once() -> None:
    run = ready()
    drain(run, at=0.0)
    assert run.feed(STOP)[1].new is S.STOPPED
    run = ready()
    kill, publish = run.feed(ev.Command("stop"), at=3.0)
    assert kill is KILL and publish.new is S.STOPPED and run.state.done


def test_a_command_the_state_no_longer_allows_is_logged_and_ignored() -> None:
    run = Run(drain_timeout_s=30)
    run.to_spawning()
    run.feed(ev.Spawned(100, 1.5))
    note, wait = run.feed(ev.Command("drain"), at=1.0)
    assert note.level == "warning" and "drain ignored: it is STARTING" in note.message and wait == ev.Wait(1.0)
    assert run.phase == "Starting"


@pytest.mark.parametrize(
    ("state", "verb", "says"),
    [
        (S.STOPPED, "drain", "it is STOPPED, so no engine runs to drain. Start it with POST"),
        (S.FAILED, "restart", "it is FAILED"),
        (S.READY, "undrain", "not DRAINING"),
        (S.DRAINING, "drain", "already DRAINING"),
        (S.STARTING, "restart", "wait until it is READY"),
        (S.STOPPED, "stop", "already STOPPED"),
    ],
)
def test_command_refusals_name_the_state_and_the_way_out(state: ServerState, verb: str, says: str) -> None:
    refusal = command_refusal(state, verb)
    assert refusal is not None and says in refusal


@pytest.mark.parametrize(
    ("state", "verb"),
    [(S.READY, "drain"), (S.READY, "restart"), (S.DRAINING, "restart"), (S.DRAINING, "undrain"), (S.STARTING, "stop")],
)
def test_commands_the_state_allows(state: ServerState, verb: str) -> None:
    assert command_refusal(state, verb) is None


def test_draining_is_reached_only_from_ready() -> None:
    assert can_transition(S.READY, S.DRAINING) and can_transition(S.DRAINING, S.READY)
    assert all(can_transition(S.DRAINING, s) for s in (S.RESTARTING, S.STOPPED, S.FAILED))
    assert not any(can_transition(s, S.DRAINING) for s in S if s is not S.READY)


def test_a_restart_asked_during_the_notice_keeps_the_notice() -> None:
    """A second command wakes the supervisor early: the running requests are still not read before the notice ends."""
    run = ready(drain_notice_s=2.0)
    run.feed(ev.Command("drain", "stop"), at=5.0)
    assert run.feed(ev.Command("restart", "stop"), at=5.5)[-1] == ev.Wait(5.5)
    assert run.feed(TICK, at=5.5) == (ev.Wait(7.0),)
    assert run.feed(TICK, at=7.0) == (ev.ReadRunning(METRICS, 3),)
