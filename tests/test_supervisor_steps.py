"""The supervisor's pure step: every decision on a fake clock, no process, no sleep (microseconds each)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from model_server.config import LaunchPolicy, ServerSpec
from model_server.launcher import events as ev
from model_server.launcher.command import build_command
from model_server.launcher.gpu_memory import GpuProcess, GpuReading
from model_server.launcher.lifecycle import ServerState
from model_server.launcher.steps import Settings, Supervision, hang_bounds_s, step

S = ServerState
POLICY = LaunchPolicy(
    engine="sim", bind_host="127.0.0.1", gpu_poll_interval_s=5, gpu_wait_timeout_s=30, startup_timeout_s=60,
    health_interval_s=10, health_timeout_s=3, health_failures_to_restart=3, restart_backoff_initial_s=2,
    restart_backoff_max_s=60, max_restarts=2, restart_window_s=600, stop_grace_s=0,
)  # fmt: skip
SPEC = ServerSpec(name="s1", group="8", kind="completion", host="127.0.0.1", port=9000, model="m", gpus=(1,))
URL = "http://127.0.0.1:9000/health_generate"
FREE = ev.GpusRead((GpuReading(1, 0, 81920),))
BUSY = ev.GpusRead((GpuReading(1, 50000, 81920),))
GONE = {"pid": None, "create_time": None, "pgid": None, "workers": ()}
TICK, STOP = ev.BareEvent.TICK, ev.BareEvent.STOP_REQUESTED
KILL, RECORD, REMOVE_KEY = ev.BareAction.KILL_ENGINE, ev.BareAction.RECORD_WORKERS, ev.BareAction.REMOVE_KEY_FILE


class Run:
    """Feeds events to the step at times of a fake clock; keeps the state and every action."""

    def __init__(self, **policy: object) -> None:
        settings = Settings(SPEC, POLICY.model_copy(update=policy), "/logs/s1.log", rand=lambda: 1.0, tag="own/run/s1")
        self.state = Supervision(settings)
        self.now = 0.0

    def feed(self, event: object, at: float | None = None) -> tuple:
        self.now = self.now if at is None else at
        self.state, actions = step(self.state, event, self.now)
        return actions

    @property
    def phase(self) -> str:
        return type(self.state.phase).__name__

    def to_spawning(self, at: float = 0.0) -> None:
        """From the start (or a backoff that is over) to the spawn, the GPUs and the port free."""
        assert isinstance(self.feed(TICK, at)[-1], ev.ReadGpus)
        assert isinstance(self.feed(FREE)[-1], ev.CheckPort)
        assert isinstance(self.feed(ev.PortChecked(False))[-1], ev.Spawn)

    def to_ready(self, at: float = 0.0, pid: int = 100) -> None:
        self.to_spawning(at)
        assert isinstance(self.feed(ev.Spawned(pid, 1.5))[-1], ev.Probe)
        actions = self.feed(ev.Probed(True))
        assert actions[:2] == (REMOVE_KEY, RECORD) and actions[2].new is S.READY
        assert actions[3] == ev.Wait(self.now + 10)


def restarting(detail: str, cause: str, restarts: int, old: ServerState = S.READY) -> ev.Publish:
    fields = {"state": "RESTARTING", "restarts": restarts, "last_error": cause, **GONE}
    return ev.Publish(old, S.RESTARTING, detail, fields)


def failed(reason: str, old: ServerState) -> ev.Publish:
    return ev.Publish(old, S.FAILED, reason, {"state": "FAILED", "last_error": reason, **GONE})


# ---- the first start, GPU wait ---------------------------------------------------------------------


def test_the_first_start_reads_the_gpus_checks_the_port_spawns_and_probes_at_once() -> None:
    run = Run()
    assert run.feed(TICK, at=0.0) == (ev.ReadGpus((1,), 10000),)
    assert run.feed(FREE) == (ev.CheckPort("127.0.0.1", 9000, name_holder=True),)  # the first start: no settle time
    assert run.feed(ev.PortChecked(False)) == (ev.Spawn(build_command(SPEC, run.state.settings.policy, 0.8)),)
    actions = run.feed(ev.Spawned(100, 1.5), at=0.5)
    fields = {"state": "STARTING", "pid": 100, "create_time": 1.5, "pgid": 100, "tag": "own/run/s1", "workers": ()}
    assert actions == (ev.Publish(S.WAITING_GPU, S.STARTING, "pid 100, log /logs/s1.log", fields), ev.Probe(URL, 3.0))


def test_busy_gpus_are_read_again_until_free_then_the_server_starts() -> None:
    run = Run()
    run.feed(TICK, at=0.0)
    holders = ((GpuProcess(1, 777, 49000), "pid 777 (python x)"),)
    actions = run.feed(ev.GpusRead(BUSY.readings, holders))
    what = "GPU 1: 50000 of 81920 MiB used (pid 777 holds 49000 MiB of GPU 1: pid 777 (python x))"
    # already WAITING_GPU: no publish
    assert actions == (ev.Note("info", f"waiting for GPUs ({what}), 0 s so far"), ev.Wait(5.0))
    assert run.feed(TICK, at=5.0) == (ev.ReadGpus((1,), 10000),)
    assert run.feed(BUSY, at=5.0)[-1] == ev.Wait(10.0)
    run.feed(TICK, at=10.0)
    assert isinstance(run.feed(FREE)[-1], ev.CheckPort) and run.phase == "PortWait"
    assert run.state.server is S.WAITING_GPU


def test_busy_gpus_past_the_wait_timeout_fail_with_todays_message() -> None:
    run = Run()
    run.feed(TICK, at=0.0)
    for t in (0.0, 5.0, 10.0, 15.0, 20.0, 25.0):
        assert run.feed(BUSY, at=t)[-1] == ev.Wait(t + 5)
        run.feed(TICK, at=t + 5)
    actions = run.feed(BUSY, at=30.0)
    reason = (
        "server 's1': its GPUs stayed busy for 30 s (GPU 1: 50000 of 81920 MiB used; a GPU is free below 10000 MiB "
        "used) and launch.gpu_wait_timeout_s is 30. Free the GPUs or raise the timeout"
    )
    assert actions == (KILL, failed(reason, S.WAITING_GPU)) and run.state.done and run.state.server is S.FAILED


def test_free_gpus_with_too_little_memory_are_refused_at_once() -> None:
    run = Run()
    run.feed(TICK)
    actions = run.feed(ev.GpusRead((GpuReading(1, 9000, 40000),)))
    assert run.state.server is S.FAILED
    assert "GPU memory is not enough: GPU 1: 9000 of 40000 MiB used (77.5% free)" in actions[-1].detail


def test_the_memory_fraction_follows_the_free_ratio() -> None:
    run = Run()
    run.feed(TICK)
    run.feed(ev.GpusRead((GpuReading(1, 8000, 81920),)))  # 90% free: the 0.85 rule
    assert run.state.phase.mem_fraction == 0.7
    argv = run.feed(ev.PortChecked(False))[0].command.argv
    assert argv[argv.index("--mem-fraction-static") + 1] == "0.7"


# ---- readiness: startup timeout ---------------------------------------------------------------------


def test_no_200_within_the_startup_timeout_kills_and_restarts() -> None:
    run = Run()
    run.to_spawning()
    run.feed(ev.Spawned(100, None), at=0.0)
    assert run.feed(ev.Probed(False, "connection refused: nothing listens there"), at=3.0) == (ev.Wait(3.25),)
    refused = "connection refused: nothing listens there"
    actions = run.feed(ev.Probed(False, refused), at=10.0)  # progress and workers are due
    assert actions == (
        ev.Note("info", f"not ready yet: {refused} (normal while it loads); 10 s of 60 s"),
        RECORD,
        ev.Wait(10.25),
    )
    assert run.feed(TICK, at=59.0) == (ev.Probe(URL, 1.0),)  # a probe never outlives the startup deadline
    run.feed(ev.Probed(False, "status 503 (loading or warming up)"), at=59.9)
    cause = f"no 200 from {URL} within the startup timeout of 60 s"
    restart = restarting(f"{cause}; restart 1 in 2.0 s", cause, 1, S.STARTING)
    assert run.feed(TICK, at=60.0) == (KILL, restart, ev.Wait(62.0))
    assert run.phase == "Backoff" and run.state.server is S.RESTARTING


# ---- watching: the hang decision ---------------------------------------------------------------------


def test_n_failed_probes_in_a_row_mean_hung_within_the_hang_bounds() -> None:
    run = Run()
    run.to_ready(at=0.0)
    assert run.feed(TICK, at=5.0) == (ev.Wait(10.0),)  # early: not yet
    t = 10.0
    for k in (1, 2):
        assert run.feed(TICK, at=t) == (ev.Probe(URL, 3.0),)
        note = ev.Note("warning", f"health probe {k}/3 failed: no answer within 3 s")
        assert run.feed(ev.Probed(False, "no answer within 3 s"), at=t + 3) == (note, ev.Wait(t + 13))
        t += 13
    assert run.feed(TICK, at=t) == (ev.Probe(URL, 3.0),)
    actions = run.feed(ev.Probed(False, "no answer within 3 s"), at=t + 3)
    cause = "hung: 3 health probes failed in a row (last: no answer within 3 s)"
    assert actions == (
        ev.Note("warning", "health probe 3/3 failed: no answer within 3 s"),
        KILL,
        restarting(f"{cause}; restart 1 in 2.0 s", cause, 1),
        ev.Wait(t + 5),
    )
    soonest, latest = hang_bounds_s(run.state.settings.policy)
    assert soonest <= t + 3 <= latest  # it stopped answering right after the probe at 0 that made it READY: the latest


def test_an_answer_resets_the_count_of_failed_probes() -> None:
    run = Run()
    run.to_ready(at=0.0)
    for t, ok in ((10, False), (23, False), (36, True), (49, False), (62, False)):
        assert run.feed(TICK, at=t) == (ev.Probe(URL, 3.0),)
        actions = run.feed(ev.Probed(ok, "" if ok else "status 500"), at=t + 3)
        assert KILL not in actions
    assert run.state.phase.failures == 2 and run.state.server is S.READY
    run.feed(TICK, at=75.0)
    assert run.feed(ev.Probed(True), at=78.0) == (RECORD, ev.Wait(88.0))
    assert run.state.phase.failures == 0


# ---- crash, backoff, restart; the restart budget -----------------------------------------------------


def test_a_crash_is_killed_backed_off_and_restarted() -> None:
    run = Run()
    run.to_ready(at=0.0)
    cause = "the engine exited (exit status 2); log: ValueError: boom"
    actions = run.feed(ev.EngineExited(2, "ValueError: boom"), at=100.0)
    assert actions == (KILL, restarting(f"{cause}; restart 1 in 2.0 s", cause, 1), ev.Wait(102.0))
    assert run.feed(TICK, at=101.0) == (ev.Wait(102.0),)  # early: wait the rest
    assert run.feed(TICK, at=102.0) == (ev.ReadGpus((1,), 10000),)
    assert run.feed(FREE) == (ev.CheckPort("127.0.0.1", 9000, name_holder=False),)  # a restart: the port may settle
    run.feed(ev.PortChecked(False))
    assert run.feed(ev.Spawned(101, None))[0].old is S.RESTARTING and run.state.server is S.STARTING
    killed_by_signal = run.feed(ev.EngineExited(-9), at=110.0)[1]
    assert killed_by_signal.detail.startswith("the engine exited (killed by signal 9); restart 2 in 4.0 s")


def test_the_backoff_is_jittered_but_never_below_half() -> None:
    run = Run()
    run.state = Supervision(Settings(SPEC, POLICY, "/l", rand=lambda: 0.0))
    run.to_ready()
    assert run.feed(ev.EngineExited(1), at=50.0)[-1] == ev.Wait(51.0)  # half of 2 s


def test_more_restarts_than_the_budget_end_failed_and_nothing_happens_after() -> None:
    run = Run()
    for n in (1, 2):
        run.to_ready(at=run.now)
        assert run.feed(ev.EngineExited(2), at=run.now + 1)[1].fields["restarts"] == n
        run.now = run.state.phase.until_s
    run.to_ready(at=run.now)
    actions = run.feed(ev.EngineExited(2), at=run.now + 1)
    reason = (
        "server 's1': crash loop: the engine exited (exit status 2); it needed 3 restarts within 600 s and "
        "launch.max_restarts is 2. Read its log, fix the cause, start the pipeline again"
    )
    assert actions == (KILL, failed(reason, S.READY)) and run.state.done
    assert run.feed(TICK) == () and run.feed(STOP) == () and run.state.server is S.FAILED


# ---- the port: refused at the first start, waited for at a restart ----------------------------------


def crashed_once() -> Run:
    run = Run()
    run.to_ready(at=0.0)
    run.feed(ev.EngineExited(2), at=100.0)
    run.feed(TICK, at=102.0)
    assert run.feed(FREE) == (ev.CheckPort("127.0.0.1", 9000, name_holder=False),)
    return run


def test_a_taken_port_at_the_first_start_fails_at_once_naming_the_holder() -> None:
    run = Run()
    run.feed(TICK)
    run.feed(FREE)
    actions = run.feed(ev.PortChecked(True, "pid 4242 (nc -l)"))
    reason = (
        "server 's1': port 9000 on 127.0.0.1 is already in use by another process (pid 4242 (nc -l)). "
        "Stop that process (see `ss -ltnp 'sport = :9000'`) or give this server another port"
    )
    assert actions == (KILL, failed(reason, S.WAITING_GPU))


def test_a_port_taken_at_a_restart_is_waited_for_within_the_settle_time_then_used() -> None:
    run = crashed_once()
    assert run.feed(ev.PortChecked(True), at=102.0) == (ev.Wait(102.1),)
    assert run.feed(TICK, at=102.1) == (ev.CheckPort("127.0.0.1", 9000, name_holder=False),)
    assert run.feed(ev.PortChecked(True), at=102.95) == (ev.Wait(103.0),)  # never past the deadline
    assert run.feed(TICK, at=103.0) == (ev.CheckPort("127.0.0.1", 9000, name_holder=True),)
    assert isinstance(run.feed(ev.PortChecked(False), at=103.0)[0], ev.Spawn)


def test_a_port_still_taken_uses_the_restart_budget_then_gives_up() -> None:
    run = crashed_once()
    # past the settle time: who holds it?
    assert run.feed(ev.PortChecked(True), at=103.0) == (ev.CheckPort("127.0.0.1", 9000, name_holder=True),)
    actions = run.feed(ev.PortChecked(True, "pid 4242 (nc -l)"), at=103.0)
    cause = "port 9000 on 127.0.0.1 is in use by another process (pid 4242 (nc -l))"
    # no engine to kill
    assert actions == (restarting(f"{cause}; restart 2 in 4.0 s", cause, 2, S.RESTARTING), ev.Wait(107.0))
    run.feed(TICK, at=107.0)
    run.feed(FREE)
    actions = run.feed(ev.PortChecked(True, "pid 4242 (nc -l)"), at=108.0)
    assert actions[-1].new is S.FAILED
    assert actions[-1].detail.startswith(f"server 's1': gave up: {cause}; it needed 3 restarts")
    assert "max_restarts is 2. Stop that process or give this server another port" in actions[-1].detail


# ---- stop, refusals, bugs ------------------------------------------------------------------------------


def pending() -> Run:
    return Run()


def gpu_wait() -> Run:
    run = Run()
    run.feed(TICK)
    run.feed(BUSY)
    return run


def port_wait() -> Run:
    run = crashed_once()
    run.feed(ev.PortChecked(True), at=102.0)
    return run


def spawning() -> Run:
    run = Run()
    run.feed(TICK)
    run.feed(FREE)
    run.feed(ev.PortChecked(False))
    return run


def starting() -> Run:
    run = spawning()
    run.feed(ev.Spawned(100, None))
    return run


def watching() -> Run:
    run = Run()
    run.to_ready()
    return run


def backoff() -> Run:
    run = watching()
    run.feed(ev.EngineExited(2), at=100.0)
    return run


@pytest.mark.parametrize("make", [pending, gpu_wait, port_wait, spawning, starting, watching, backoff])
def test_a_stop_in_any_phase_kills_and_ends_stopped(make) -> None:
    run = make()
    before = run.state.server
    actions = run.feed(STOP)
    assert actions == (KILL, ev.Publish(before, S.STOPPED, "", {"state": "STOPPED", **GONE}))
    assert run.state.done and run.state.server is S.STOPPED and run.feed(TICK) == ()


def test_a_refused_action_ends_failed_with_its_reason() -> None:
    run = gpu_wait()
    actions = run.feed(ev.Refused("GPU 9 does not exist: the simulated inventory has 8 GPUs"))
    assert actions == (KILL, failed("GPU 9 does not exist: the simulated inventory has 8 GPUs", S.WAITING_GPU))
    run = spawning()
    actions = run.feed(ev.Refused("server 's1': cannot start /no/python: [Errno 2] No such file or directory"))
    assert actions[-1].new is S.FAILED and run.state.done


def test_an_event_a_phase_cannot_receive_is_a_bug() -> None:
    with pytest.raises(ValueError, match="Probed is not expected"):
        gpu_wait().feed(ev.Probed(True))


# ---- the thin loop on an injected clock: a crash loop with minutes of backoff, in no real time ----------


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.waited: list[float] = []

    def clock(self) -> float:
        return self.now

    def wait(self, stop: threading.Event, timeout_s: float) -> bool:
        self.waited.append(timeout_s)
        self.now += timeout_s
        return stop.is_set()


class Crashing:
    pid = 4000
    returncode = 1
    log_pump = None

    def poll(self) -> int:
        return self.returncode


def test_the_loop_runs_on_the_injected_clock_and_wait(tmp_path: Path) -> None:
    from model_server.launcher.status_file import ServerStatus, StatusBoard
    from model_server.launcher.supervisor import Deps, ServerSupervisor

    fake = FakeTime()
    spawned: list[float] = []

    class Inventory:
        def read(self, indices):
            return [GpuReading(i, 0, 81920) for i in indices]

    def spawn(*_a, **_kw):
        spawned.append(fake.now)
        return Crashing()

    deps = Deps(
        inventory=Inventory(), spawn=spawn, kill_groups=lambda *a, **kw: [], port_in_use=lambda h, p: False,
        clock=fake.clock, wait=fake.wait, rand=lambda: 1.0, create_time=lambda pid: None, descendants=lambda pid: [],
        write_key_file=lambda p, k: None, remove_key_file=lambda p: None, probe=lambda url, t: (False, "refused"),
    )  # fmt: skip
    board = StatusBoard(tmp_path / "status.json", [ServerStatus("s1", "8", "127.0.0.1", 9000)], {})
    policy = POLICY.model_copy(update={"restart_backoff_initial_s": 100, "restart_backoff_max_s": 1000})
    sup = ServerSupervisor(SPEC, policy, board, deps, tmp_path / "s1.log")
    assert sup.run() is S.FAILED
    assert spawned == pytest.approx([0.0, 100.0, 300.0])  # 100 s, then 200 s of backoff, on the fake clock in slices
    assert max(fake.waited) <= 0.2 and "crash loop" in board.get("s1").last_error
