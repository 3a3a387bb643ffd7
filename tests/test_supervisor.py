"""The server state machine, backoff and crash-loop window (pure), and the supervisor loop with fakes."""

from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path

import pytest
from _waiting import wait_for as wait_until

from model_server.config import LaunchPolicy, ServerSpec
from model_server.launcher.gpu_memory import GpuReading
from model_server.launcher.lifecycle import (
    RestartHistory,
    ServerState,
    can_transition,
    decide_after_failure,
    transition,
)
from model_server.launcher.status_file import ServerStatus, StatusBoard
from model_server.launcher.steps import health_url
from model_server.launcher.supervisor import Deps, ServerSupervisor

S = ServerState

# ---- pure: transitions, backoff, crash loop ------------------------------------------------


def test_legal_life_of_a_server() -> None:
    state = None
    for new in (
        S.WAITING_GPU,
        S.STARTING,
        S.READY,
        S.RESTARTING,
        S.WAITING_GPU,
        S.STARTING,
        S.RESTARTING,
        S.STARTING,
        S.READY,
        S.STOPPED,
    ):
        state = transition(state, new)
    assert state is S.STOPPED


@pytest.mark.parametrize(
    ("current", "new"),
    [(S.FAILED, S.STARTING), (S.STOPPED, S.READY), (S.WAITING_GPU, S.READY), (S.READY, S.STARTING), (None, S.READY)],
)
def test_illegal_transitions_are_refused(current: ServerState | None, new: ServerState) -> None:
    assert not can_transition(current, new)
    with pytest.raises(ValueError, match="illegal"):
        transition(current, new)


def test_terminal_states_have_no_way_out() -> None:
    for new in S:
        assert not can_transition(S.FAILED, new)
        assert not can_transition(S.STOPPED, new)


def decide(history: RestartHistory, now: float, max_restarts: int = 2, window_s: float = 100.0):
    return decide_after_failure(
        history, now, cause="the engine exited (exit status 1)", max_restarts=max_restarts, window_s=window_s,
        backoff_initial_s=1.0, backoff_max_s=60.0, rand=lambda: 1.0,
    )  # fmt: skip


def test_more_restarts_than_allowed_in_the_window_fail() -> None:
    h = RestartHistory()
    first = decide(h, 0.0)
    second = decide(first.history, 10.0)
    assert (first.restart, first.delay_s, second.restart, second.delay_s) == (True, 1.0, True, 2.0)
    third = decide(second.history, 20.0)
    assert not third.restart
    assert (
        "crash loop" in third.reason
        and "3 restarts within 100 s" in third.reason
        and "max_restarts is 2" in third.reason
    )
    assert "exit status 1" in third.reason


def test_old_restarts_leave_the_window_and_backoff_starts_over() -> None:
    h = decide(decide(RestartHistory(), 0.0).history, 10.0).history
    later = decide(h, 500.0)
    assert later.restart and later.delay_s == 1.0 and later.history.total == 3


def test_zero_restarts_allowed_fails_at_once() -> None:
    assert not decide(RestartHistory(), 0.0, max_restarts=0).restart


def test_health_url_probes_loopback_for_wildcard_binds() -> None:
    assert health_url("0.0.0.0", 8056) == "http://127.0.0.1:8056/health_generate"
    assert health_url("10.0.0.2", 1) == "http://10.0.0.2:1/health_generate"
    assert health_url("::", 9) == "http://[::1]:9/health_generate"


# ---- the supervisor loop, with fakes for every OS call ---------------------------------------


class FakeProc:
    pids = itertools.count(1000)

    def __init__(self, exit_code: int | None = None) -> None:
        self.pid = next(self.pids)
        self.returncode = exit_code

    def poll(self) -> int | None:
        return self.returncode


class World:
    """Scripted engines: each spawn takes the next behaviour ('crash', 'hang', 'ok')."""

    def __init__(self, behaviours: list[str], busy_reads: int = 0, port_busy: bool = False) -> None:
        self.behaviours = list(behaviours)
        self.procs: list[tuple[FakeProc, str]] = []
        self.busy_reads = busy_reads
        self.port_busy = port_busy
        self.killed: list[int] = []

    def spawn(self, command, log_file, drop_env, **_kw):
        kind = self.behaviours.pop(0) if self.behaviours else "ok"
        proc = FakeProc(2 if kind == "crash" else None)
        self.procs.append((proc, kind))
        return proc

    def probe(self, url: str, timeout_s: float) -> tuple[bool, str]:
        proc, kind = self.procs[-1]
        return (kind == "ok", "" if kind == "ok" else "no answer")

    def kill_groups(self, pgids, grace_s, reap=(), tags=None, processes=()):
        for proc, _ in self.procs:
            if proc.pid in pgids and proc.returncode is None:
                proc.returncode = -15
        self.killed += list(pgids)
        return []

    def read(self, indices):
        used = 50000 if self.busy_reads > 0 else 0
        self.busy_reads -= 1
        return [GpuReading(i, used, 81920) for i in indices]


POLICY = LaunchPolicy(
    engine="sim", bind_host="127.0.0.1", gpu_poll_interval_s=0.01, startup_timeout_s=5, health_interval_s=0.01,
    health_timeout_s=0.01, health_failures_to_restart=2, restart_backoff_initial_s=0.001, restart_backoff_max_s=0.002,
    max_restarts=2, restart_window_s=60, stop_grace_s=0,
)  # fmt: skip
SPEC = ServerSpec(name="s1", group="8", kind="completion", host="127.0.0.1", port=9, model="m", gpus=(1,))


def make(world: World, tmp_path: Path, policy: LaunchPolicy = POLICY) -> tuple[ServerSupervisor, StatusBoard]:
    board = StatusBoard(tmp_path / "status.json", [ServerStatus("s1", "8", "127.0.0.1", 9)], {})
    return ServerSupervisor(SPEC, policy, board, fake_deps(world), tmp_path / "s1.log"), board


def fake_deps(world: World, **overrides) -> Deps:
    values = dict(
        inventory=world, probe=world.probe, spawn=world.spawn, kill_groups=world.kill_groups,
        port_in_use=lambda h, p: world.port_busy, port_holder=lambda h, p: "pid 4242 (nc -l)", create_time=lambda pid: 1.0,
        descendants=lambda pid: [], write_key_file=lambda path, key: None, remove_key_file=lambda path: None,
    )  # fmt: skip
    values.update(overrides)
    return Deps(**values)


def run_in_thread(sup: ServerSupervisor) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(sup.run()), daemon=True)
    thread.start()
    return thread, result


@pytest.mark.timeout(20)
def test_crash_loop_ends_failed_after_max_restarts(tmp_path: Path) -> None:
    world = World(["crash"] * 10)
    sup, board = make(world, tmp_path)
    assert sup.run() is S.FAILED
    assert len(world.procs) == 3  # the first start + max_restarts (2)
    status = board.get("s1")
    assert status.state == "FAILED" and status.restarts == 2 and "crash loop" in status.last_error


@pytest.mark.timeout(20)
def test_hung_engine_is_killed_and_restarted_then_stops(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="model_server.launcher.supervisor")
    world = World(["hang", "ok"])
    sup, board = make(world, tmp_path, POLICY.model_copy(update={"startup_timeout_s": 0.05}))
    thread, result = run_in_thread(sup)
    wait_until(lambda: board.get("s1").state == "READY")
    first, second = world.procs[0][0], world.procs[1][0]
    assert first.pid in world.killed and board.get("s1").pid == second.pid
    assert "startup timeout" in board.get("s1").last_error
    proc = sup.request_stop()
    assert proc is second  # handed over: the caller kills it, the supervisor does not (one SIGTERM)
    thread.join(5)
    assert not thread.is_alive(), "the supervisor did not stop within 5 s"
    assert result == [S.STOPPED] and board.get("s1").state == "STOPPED"
    assert "server s1: STARTING -> READY" in caplog.text


@pytest.mark.timeout(20)
def test_failed_probes_in_a_row_after_ready_mean_hung(tmp_path: Path) -> None:
    world = World(["ok", "ok"])
    sup, board = make(world, tmp_path)
    thread, _ = run_in_thread(sup)
    wait_until(lambda: board.get("s1").state == "READY")
    world.procs[0] = (world.procs[0][0], "hang")  # it stops answering
    wait_until(lambda: board.get("s1").state == "READY" and board.get("s1").restarts == 1)
    assert "hung: 2 health probes failed in a row" in board.get("s1").last_error
    sup.request_stop()
    thread.join(5)
    assert not thread.is_alive(), "the supervisor did not stop within 5 s"
    assert not thread.is_alive()


@pytest.mark.timeout(20)
def test_waits_for_busy_gpus_then_starts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="model_server.launcher.supervisor")
    world = World(["ok"], busy_reads=3)
    sup, board = make(world, tmp_path)
    thread, _ = run_in_thread(sup)
    wait_until(lambda: board.get("s1").state == "READY")
    assert (
        "WAITING_GPU -> STARTING" in caplog.text and "waiting for GPUs (GPU 1: 50000 of 81920 MiB used)" in caplog.text
    )
    sup.request_stop()
    thread.join(5)
    assert not thread.is_alive(), "the supervisor did not stop within 5 s"


@pytest.mark.timeout(20)
def test_gpu_wait_deadline_and_busy_port_fail_without_spawning(tmp_path: Path) -> None:
    world = World(["ok"], busy_reads=10**6)
    sup, board = make(world, tmp_path, POLICY.model_copy(update={"gpu_wait_timeout_s": 0.05}))
    assert sup.run() is S.FAILED and world.procs == []
    assert "stayed busy" in board.get("s1").last_error and "gpu_wait_timeout_s" in board.get("s1").last_error
    world = World(["ok"], port_busy=True)
    sup, board = make(world, tmp_path)
    assert sup.run() is S.FAILED and world.procs == []
    assert "port 9 on 127.0.0.1 is already in use" in board.get("s1").last_error


# ---- the pipeline's verdict, in process with the same fakes ------------------------------------


def fake_pipeline(world: World, tmp_path: Path):
    from model_server.config import parse_fleet
    from model_server.launcher.pipeline import Pipeline, Plan

    fleet = parse_fleet(
        f'[launch]\nengine = "sim"\nbind_host = "127.0.0.1"\nstatus_file = "{tmp_path / "status.json"}"\n'
        f'log_dir = "{tmp_path}"\nhealth_interval_s = 0.01\nhealth_timeout_s = 0.01\nrestart_backoff_initial_s = 0.001\n'
        f"max_restarts = 1\nstop_grace_s = 0\n"
        + "".join(
            f'[[servers]]\nname = "s{i}"\ngroup = "8"\nkind = "completion"\nhost = "127.0.0.1"\nport = {9000 + i}\nmodel = "m"\n'
            for i in (1, 2)
        )
    )
    return Pipeline(Plan(fleet, fleet.servers), deps=fake_deps(world, port_in_use=lambda h, p: False))


@pytest.mark.timeout(20)
def test_pipeline_exits_1_when_every_server_failed(tmp_path: Path) -> None:
    assert fake_pipeline(World(["crash"] * 10), tmp_path).run(install_signals=False) == 1


@pytest.mark.timeout(20)
def test_pipeline_exits_0_when_all_were_ready_until_the_stop(tmp_path: Path) -> None:
    from model_server.launcher.status_file import read_status

    pipeline = fake_pipeline(World(["ok", "ok"]), tmp_path)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(pipeline.run(install_signals=False)), daemon=True)
    thread.start()
    wait_until(
        lambda: (
            {s["state"] for s in (read_status(tmp_path / "status.json") or {"servers": {}})["servers"].values()}
            == {"READY"}
        )
    )
    pipeline.request_stop()
    thread.join(10)
    assert result == [0]
    assert {s["state"] for s in read_status(tmp_path / "status.json")["servers"].values()} == {"STOPPED"}


# ---- a port taken during a restart, the key file's life, who holds a busy GPU -----------------------


@pytest.mark.timeout(20)
def test_a_port_taken_at_a_restart_uses_the_restart_budget_then_fails_naming_the_holder(tmp_path: Path) -> None:
    world = World(["crash"])
    sup, board = make(world, tmp_path, POLICY.model_copy(update={"max_restarts": 3}))
    spawned = world.spawn

    def spawn_then_take_the_port(*args, **kwargs):
        proc = spawned(*args, **kwargs)
        world.port_busy = True  # someone takes the port while the crashed engine restarts
        return proc

    world.spawn = spawn_then_take_the_port
    sup.deps.spawn = spawn_then_take_the_port
    sup.port_settle_s = 0.05
    assert sup.run() is S.FAILED
    assert len(world.procs) == 1  # never started over the other process
    status = board.get("s1")
    assert status.restarts == 3  # the crash, then two attempts that found the port taken
    assert status.last_error.startswith(
        "server 's1': gave up: port 9 on 127.0.0.1 is in use by another process (pid 4242 (nc -l))"
    )
    assert "max_restarts is 3" in status.last_error and "crash loop" not in status.last_error


@pytest.mark.timeout(20)
def test_a_port_freed_during_the_restart_budget_lets_the_server_start(tmp_path: Path) -> None:
    world = World(["crash", "ok"])
    sup, board = make(world, tmp_path, POLICY.model_copy(update={"max_restarts": 5}))
    checks = itertools.count()
    sup.deps.port_in_use = lambda h, p: len(world.procs) == 1 and next(checks) < 6  # busy for a while after the crash
    sup.port_settle_s = 0.05
    thread, _ = run_in_thread(sup)
    wait_until(lambda: board.get("s1").state == "READY" and len(world.procs) == 2)
    assert board.get("s1").restarts >= 2 and "in use" in board.get("s1").last_error
    sup.request_stop()
    thread.join(5)
    assert not thread.is_alive()


@pytest.mark.timeout(20)
def test_the_key_file_exists_only_while_the_engine_starts(tmp_path: Path) -> None:
    from model_server.launcher.redact import Secret

    events: list[str] = []
    world = World(["crash", "ok"])
    deps = fake_deps(
        world,
        write_key_file=lambda path, key: events.append(f"write {path.name} {key}"),
        remove_key_file=lambda path: events.append(f"remove {path.name}"),
    )
    board = StatusBoard(tmp_path / "status.json", [ServerStatus("s1", "8", "127.0.0.1", 9)], {})
    spawned = world.spawn
    deps.spawn = lambda *a, **kw: (events.append("spawn"), spawned(*a, **kw))[1]
    sup = ServerSupervisor(SPEC, POLICY, board, deps, tmp_path / "s1.log", tmp_path / "k.yaml", key=Secret("sk-1"))
    assert "sk-1" not in repr(sup) and "sk-1" not in repr(sup.key)
    thread, _ = run_in_thread(sup)
    wait_until(lambda: board.get("s1").state == "READY")
    ready_at = len(events)
    sup.request_stop()
    thread.join(5)
    # written before each start; removed when the first engine exited and once the second answered
    assert events[:ready_at] == [
        "write k.yaml sk-1",
        "spawn",
        "remove k.yaml",
        "write k.yaml sk-1",
        "spawn",
        "remove k.yaml",
    ]
    assert events[-1] == "remove k.yaml"


@pytest.mark.timeout(20)
def test_waiting_for_a_gpu_names_the_processes_that_hold_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from model_server.launcher.gpu_memory import GpuProcess

    caplog.set_level(logging.INFO, logger="model_server.launcher.supervisor")
    world = World(["ok"], busy_reads=2)
    deps = fake_deps(
        world,
        gpu_processes=lambda inventory, indices: [GpuProcess(1, 777, 49000)],
        describe_pid=lambda pid, owner=None: (
            f"pid {pid} (python -m sglang.launch_server; an engine process of this pipeline's status file)"
        ),
    )
    board = StatusBoard(tmp_path / "status.json", [ServerStatus("s1", "8", "127.0.0.1", 9)], {})
    sup = ServerSupervisor(SPEC, POLICY, board, deps, tmp_path / "s1.log", tag="own/run/s1")
    thread, _ = run_in_thread(sup)
    wait_until(lambda: board.get("s1").state == "READY")
    assert (
        "waiting for GPUs (GPU 1: 50000 of 81920 MiB used (pid 777 holds 49000 MiB of GPU 1: pid 777 (python -m sglang.launch_server;"
        in caplog.text
    )
    sup.request_stop()
    thread.join(5)


@pytest.mark.timeout(20)
def test_workers_are_recorded_in_the_status_file(tmp_path: Path) -> None:
    world = World(["ok"])
    sup, board = make(world, tmp_path)
    sup.deps.descendants = lambda pid: [(pid + 1, 5.0), (pid + 2, 6.0)]
    thread, _ = run_in_thread(sup)
    wait_until(lambda: board.get("s1").state == "READY" and len(board.get("s1").workers) == 2)
    status = board.get("s1")
    assert status.pgid == status.pid and [(w.pid, w.create_time) for w in status.workers] == [
        (status.pid + 1, 5.0),
        (status.pid + 2, 6.0),
    ]
    sup.request_stop()
    thread.join(5)
    assert board.get("s1").workers == () and board.get("s1").pid is None


@pytest.mark.timeout(20)
def test_a_pipeline_removes_the_key_files_an_earlier_run_left(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="model_server.launcher.pipeline")
    left = tmp_path / "secrets" / "s1.yaml"
    left.parent.mkdir()
    left.write_text("api-key: sk-left\n")
    assert fake_pipeline(World(["crash"] * 10), tmp_path).run(install_signals=False) == 1
    assert not left.exists() and f"removed the API-key file {left}" in caplog.text


def test_engines_of_ours_still_on_a_gpu_after_the_stop_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    from model_server.launcher.gpu_memory import GpuProcess
    from model_server.launcher.pipeline import _report_gpu_holders

    caplog.set_level(logging.ERROR, logger="model_server.launcher.pipeline")
    world = World([])
    deps = fake_deps(
        world,
        gpu_processes=lambda inventory, indices: [
            GpuProcess(1, 50, 30000),
            GpuProcess(1, 60, 100),
            GpuProcess(1, 70, 5),
        ],
        engine_tag=lambda pid: {50: "own/run1/s1", 60: None, 70: "another/run/s1"}[pid],
        describe_pid=lambda pid, owner=None: f"pid {pid} (x; an engine process of this pipeline's status file)",
    )
    _report_gpu_holders(deps, [SPEC], "own", "after the stop")
    assert "after the stop, pid 50 holds 30000 MiB of GPU 1: pid 50 (x; an engine process" in caplog.text
    assert "pid 60" not in caplog.text and "pid 70" not in caplog.text  # not ours to report


def test_the_launcher_modules_pin_their_surface() -> None:
    from model_server.launcher import engine_log as enginelog
    from model_server.launcher import pipeline, redact, rundir, steps, supervisor
    from model_server.launcher import processes as procs
    from model_server.launcher import status_file as status

    assert sorted(supervisor.__all__) == ["Deps", "ServerSupervisor", "probe_health"]
    assert sorted(steps.__all__) == sorted(
        ["Settings", "Supervision", "command_refusal", "exit_cause", "hang_bounds_s", "health_url", "step"]
    )
    assert sorted(pipeline.__all__) == sorted(
        ["DryRunCommand", "Pipeline", "Plan", "STOP_SIGNALS", "dry_run_commands", "fleet_redactor", "plan"]
    )
    assert sorted(status.__all__) == sorted(
        ["ServerStatus", "StatusBoard", "StatusFile", "StatusLock", "Worker", "cleanup_stale", "load_status",
         "owner_tag", "read_status"]
    )  # fmt: skip
    assert sorted(redact.__all__) == ["MASK", "RedactingFilter", "Redactor", "Secret"]
    assert sorted(enginelog.__all__) == ["IDLE_FLUSH_S", "LogPump", "open_log", "write_redacted"]
    assert "tagged_processes" in procs.__all__ and "port_holder" in procs.__all__ and "check_writable" in rundir.__all__
    for module in (enginelog, pipeline, procs, redact, rundir, status, steps, supervisor):
        assert all(hasattr(module, name) for name in module.__all__), module.__name__


def test_hang_bounds_follow_the_settings() -> None:
    from model_server.launcher.steps import hang_bounds_s

    assert hang_bounds_s(
        LaunchPolicy(engine="sim", health_interval_s=1, health_timeout_s=3, health_failures_to_restart=2)
    ) == (4, 8)
    assert hang_bounds_s(LaunchPolicy()) == (70, 105)  # configs/servers.toml's: every 10 s, 25 s timeout, 3 in a row
