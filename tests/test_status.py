"""The status file, the stale-run cleanup (real processes) and `model-server status` exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from _pipeline_runs import fake_engine, free_port
from _waiting import wait_for as wait_until

from model_server.common.processes import same_process
from model_server.errors import LaunchError
from model_server.launcher import processes as procs
from model_server.launcher.command import LaunchCommand
from model_server.launcher.status_file import (
    ServerStatus,
    StatusBoard,
    StatusFile,
    StatusLock,
    cleanup_stale,
    load_status,
    read_status,
)

ROOT = Path(__file__).resolve().parent.parent

# A leader that starts a child in its own process group, then both sleep (an engine with workers).
FAMILY = (
    "import subprocess, sys, time;"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']);"
    "print('up', flush=True); time.sleep(120)"
)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def family(tmp_path: Path):
    """A leftover 'engine': a group of two real processes; killed at the end whatever happens."""
    started = []

    def start() -> tuple[subprocess.Popen, list[int]]:
        proc = procs.spawn_engine(LaunchCommand("old", (sys.executable, "-c", FAMILY)), tmp_path / "old.log")
        wait_until(lambda: len(psutil.Process(proc.pid).children()) == 1, what="the child of the leftover engine")
        started.append(proc)
        return proc, [proc.pid, psutil.Process(proc.pid).children()[0].pid]

    yield start
    for proc in started:
        procs.kill_groups([proc.pid], 0.5, reap=[proc])


def test_board_writes_atomically_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "run" / "status.json"
    board = StatusBoard(path, [ServerStatus("a", "8", "127.0.0.1", 1), ServerStatus("b", "7", "h", 2)], {"pid": 7})
    since = board.get("a").since
    board.update("a", state="STARTING", pid=42, create_time=3.5)
    board.update("a", restarts=1)
    data = read_status(path)
    assert data["pipeline"]["pid"] == 7
    assert data["servers"]["a"] | {"since": 0} == {
        "name": "a", "group": "8", "host": "127.0.0.1", "port": 1, "state": "STARTING", "pid": 42,
        "create_time": 3.5, "pgid": None, "workers": [], "tag": None, "restarts": 1, "last_error": "", "since": 0,
    }  # fmt: skip
    assert load_status(path).servers["a"] == board.get("a")  # what is written reads back the same
    assert data["servers"]["a"]["since"] >= since
    assert [p.name for p in path.parent.iterdir()] == ["status.json"]  # no temp file left behind


def test_missing_and_broken_status_files(tmp_path: Path) -> None:
    assert read_status(tmp_path / "none.json") is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LaunchError, match="status file cannot be read"):
        read_status(bad)
    bad.write_text("[]")
    with pytest.raises(LaunchError, match="not a model-server status file"):
        read_status(bad)


@pytest.mark.timeout(60)
def test_cleanup_stops_the_groups_of_an_earlier_run_only(tmp_path: Path, family) -> None:
    old, old_pids = family()
    other, other_pids = family()
    path = tmp_path / "status.json"
    servers = {
        "old": {"pid": old.pid, "create_time": psutil.Process(old.pid).create_time()},
        # a reused pid: same number, another start time -> not ours, left alone
        "reused": {"pid": other.pid, "create_time": psutil.Process(other.pid).create_time() - 1000},
    }
    path.write_text(json.dumps({"pipeline": {"pid": 999999999, "create_time": 1.0}, "servers": servers}))
    assert same_process(old.pid, servers["old"]["create_time"])
    stopped = cleanup_stale(load_status(path), 2.0, procs.kill_groups, procs.tagged_processes, "owner", "owner/now/")
    assert stopped == ["old"]
    old.wait(timeout=10)
    wait_until(lambda: all(gone(p) for p in old_pids), what="the earlier run's group gone")
    assert not any(gone(p) for p in other_pids)


@pytest.mark.timeout(60)
def test_cleanup_finds_workers_by_their_record_and_by_their_tag(tmp_path: Path) -> None:
    """A worker that left its group is found by (pid, start time); one never recorded, by its engine tag."""
    sleeper = (sys.executable, "-c", "import time; time.sleep(120)")
    recorded = procs.spawn_engine(LaunchCommand("w1", sleeper), tmp_path / "w1.log")  # its own group: a setsid'd worker
    untracked = procs.spawn_engine(LaunchCommand("w2", sleeper), tmp_path / "w2.log", tag="owner/old/chat-1")
    mine = procs.spawn_engine(LaunchCommand("w3", sleeper), tmp_path / "w3.log", tag="owner/now/chat-1")  # this run's
    foreign = procs.spawn_engine(LaunchCommand("w4", sleeper), tmp_path / "w4.log", tag="another/old/chat-1")
    everyone = [recorded, untracked, mine, foreign]
    try:
        # until a forked child has exec'd, its environment is this process's (no tag): wait for the three tags
        tagged = {untracked.pid, mine.pid, foreign.pid}
        wait_until(lambda: tagged <= {p.pid for p in procs.tagged_processes(lambda _tag: True)}, 20,
                   what="the three tagged workers started")  # fmt: skip
        path = tmp_path / "status.json"
        path.write_text(json.dumps({"pipeline": {}, "servers": {"chat-1": {
            "pid": 999999, "create_time": 1.0, "tag": "owner/old/chat-1",
            "workers": [{"pid": recorded.pid, "create_time": psutil.Process(recorded.pid).create_time()}]}}}))  # fmt: skip
        stopped = cleanup_stale(
            load_status(path), 2.0, procs.kill_groups, procs.tagged_processes, "owner", "owner/now/"
        )
        assert stopped == ["chat-1"]
        assert recorded.wait(10) is not None and untracked.wait(10) is not None
        assert mine.poll() is None and foreign.poll() is None
    finally:
        for proc in everyone:
            procs.kill_groups([proc.pid], 0.5, reap=[proc])


@pytest.mark.timeout(60)
def test_kill_groups_ends_a_tagged_process_that_left_the_group(tmp_path: Path) -> None:
    leader = procs.spawn_engine(
        LaunchCommand("e", (sys.executable, "-c", "import time; time.sleep(120)")), tmp_path / "e.log", tag="o/r/e"
    )
    escaped = procs.spawn_engine(
        LaunchCommand("w", (sys.executable, "-c", "import time; time.sleep(120)")), tmp_path / "w.log", tag="o/r/e"
    )
    try:
        hard = procs.kill_groups([leader.pid], 2.0, reap=[leader, escaped], tags=lambda t: t == "o/r/e")
        assert hard == []
        assert leader.poll() is not None and escaped.poll() is not None
    finally:
        for proc in (leader, escaped):
            procs.kill_groups([proc.pid], 0.5, reap=[proc])


HOLD_LOCK = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid()); print('locked', flush=True); time.sleep(120)"


@pytest.mark.timeout(60)
def test_the_status_lock_refuses_a_second_owner_and_frees_when_the_first_dies(tmp_path: Path) -> None:
    path = tmp_path / "run" / "status.json"
    path.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path) + ".lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LaunchError) as info:
            StatusLock(path).acquire()
        message = str(info.value)
        assert f"another pipeline (pid {holder.pid})" in message and f"kill -TERM {holder.pid}" in message
        assert not path.exists()  # refused before writing anything
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.wait(10)
    with StatusLock(path) as lock:
        assert lock.path.read_text().strip() == str(os.getpid())
        with pytest.raises(LaunchError, match="another pipeline"):
            StatusLock(path).acquire()  # one owner, also within one process
    StatusLock(path).acquire().release()


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("READY", "servers['a'] is 'READY', not an object of fields"),
        ({"pid": "123"}, "servers['a'].pid is '123', not a process id"),
        ({"pid": -1}, "servers['a'].pid is -1, not a process id"),
        ({"pid": 1.5}, "servers['a'].pid is 1.5, not a process id"),
        ({"pid": True}, "servers['a'].pid is True, not a process id"),
        ({"since": "yesterday"}, "servers['a'].since is 'yesterday', not a time"),
        ({"state": "BUSY"}, "servers['a'].state is 'BUSY', not one of"),
        ({"restarts": -2}, "servers['a'].restarts is -2, not a count"),
        ({"workers": [{"pid": 5}]}, "servers['a'].workers[0] is {'pid': 5}, not {pid, create_time}"),
        ({"last_error": ["x" * 1000]}, "servers['a'].last_error is ['xxxxxxxxxxxxxxxxx"),
    ],
)
def test_load_status_names_every_wrong_field(tmp_path: Path, entry: object, problem: str) -> None:
    path = tmp_path / "status.json"
    path.write_text(json.dumps({"pipeline": {}, "servers": {"a": entry, "b": {"pid": 7, "create_time": 3.0}}}))
    status = load_status(path)
    assert len(status.problems) == 1 and status.problems[0].startswith(problem), status.problems
    assert list(status.servers) == ["b"] and status.servers["b"].pid == 7  # the valid entries stay
    assert "remove" in status.refusal() and str(path) in status.refusal() and len(status.refusal()) < 1000


def test_load_status_of_missing_corrupt_and_foreign_files(tmp_path: Path) -> None:
    assert load_status(tmp_path / "none.json") == StatusFile(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    for text, problem in (
        ("{not json", "it is not JSON"),
        ("[]", "not a model-server status file"),
        ("[" * 100000, "it is not JSON"),
    ):
        bad.write_text(text)
        status = load_status(bad)
        assert status.exists and problem in status.problems[0] and not status.servers


def test_the_board_redacts_what_it_writes(tmp_path: Path) -> None:
    from model_server.launcher.redact import Redactor

    path = tmp_path / "status.json"
    board = StatusBoard(path, [ServerStatus("a", "8", "h", 1)], {}, redact=Redactor(["sk-secret"]).redact)
    board.update("a", last_error="the engine exited; log: server_args=ServerArgs(api_key='sk-secret')")
    assert "sk-secret" not in path.read_text() and "api_key='***'" in path.read_text()


@pytest.mark.timeout(90)
def test_status_command_exit_codes(tmp_path: Path) -> None:
    port = free_port()
    status_file = tmp_path / "status.json"
    (tmp_path / "fleet.toml").write_text(
        f'[launch]\nengine = "sim"\nstatus_file = "{status_file}"\n[gpu_inventory]\nsource = "simulated"\n'
        f'[[servers]]\nname = "only"\ngroup = "8"\nkind = "completion"\nhost = "127.0.0.1"\nport = {port}\nmodel = "sim/m"\n'
    )
    StatusBoard(status_file, [ServerStatus("only", "8", "127.0.0.1", port, state="READY", pid=1234)], {})
    cmd = [sys.executable, "-m", "model_server", "status", "--config", str(tmp_path / "fleet.toml"), "--timeout-s", "2"]
    env = {**os.environ, "COLUMNS": "200"}
    with fake_engine(tmp_path, port=port):
        up = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "only" in up.stdout and "READY" in up.stdout and "1 up, 0 down" in up.stdout
    source = "host 127.0.0.1: status file + probes; control API not used: launch.control_port is not set in the table"
    assert source in up.stdout, up.stdout
    down = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert down.returncode == 1
    assert "0 up, 1 down" in down.stdout
