"""The status file, the stale-run cleanup (real processes) and `model-server status` exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from model_server import procs
from model_server.errors import LaunchError
from model_server.launch import LaunchCommand
from model_server.sim.process import SimProcess, free_port
from model_server.status import ServerStatus, StatusBoard, cleanup_stale, read_status, same_process

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


def wait_until(predicate, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s} s"
        time.sleep(0.05)


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
        "create_time": 3.5, "restarts": 1, "last_error": "", "since": 0,
    }  # fmt: skip
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
    stopped = cleanup_stale(path, 2.0, lambda pid, grace: procs.kill_groups([pid], grace))
    assert stopped == ["old"]
    old.wait(timeout=10)
    wait_until(lambda: all(gone(p) for p in old_pids), what="the earlier run's group gone")
    assert not any(gone(p) for p in other_pids)


@pytest.mark.timeout(60)
def test_a_live_pipeline_of_the_same_status_file_is_refused(tmp_path: Path, family) -> None:
    owner, _ = family()
    path = tmp_path / "status.json"
    meta = {"pid": owner.pid, "create_time": psutil.Process(owner.pid).create_time()}
    path.write_text(json.dumps({"pipeline": meta, "servers": {}}))
    with pytest.raises(LaunchError, match=f"another pipeline \\(pid {owner.pid}\\) is running"):
        cleanup_stale(path, 1.0, lambda pid, grace: None)


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
    with SimProcess(port=port):  # started by __enter__
        up = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "only" in up.stdout and "READY" in up.stdout and "1 up, 0 down" in up.stdout
    down = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert down.returncode == 1
    assert "0 up, 1 down" in down.stdout
