"""The launch pipeline end to end: `python serve_llm_pipeline.py` as a real subprocess on a copy of
configs/local.toml (free ports, files in tmp_path, short intervals), watched through its status file."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from _pipeline_runs import LOCAL, all_ready, free_port, local_copy, runs, wait_gone  # noqa: F401

from model_server.launcher import processes as procs
from model_server.launcher.command import LaunchCommand

CRASHY = """
[[servers]]
name = "crashy"
group = "8"
kind = "completion"
host = "127.0.0.1"
port = {port}
model = "sim/llama-3.1-8b-instruct"
served_model_name = "llama-8b"
gpus = [5]
args = ["--no-such-flag"]
"""


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_local_fleet_ready_heals_crash_and_hang_fails_crash_loop_and_stops_clean(tmp_path: Path, runs) -> None:
    config = local_copy(tmp_path, extra=CRASHY.format(port=free_port()))
    run = runs(config, tmp_path)
    servers = run.wait(
        lambda s: all_ready(LOCAL)(s) and s["crashy"]["state"] == "FAILED", "every server READY, crashy FAILED"
    )
    assert (
        "crash loop" in servers["crashy"]["last_error"] and "unrecognized arguments" in servers["crashy"]["last_error"]
    )
    assert servers["crashy"]["restarts"] == 2
    before = {n: servers[n]["pid"] for n in LOCAL}

    os.kill(before["chat-1"], signal.SIGKILL)  # a crash
    servers = run.wait(
        lambda s: s["chat-1"]["state"] == "READY" and s["chat-1"]["pid"] != before["chat-1"], "chat-1 back"
    )
    assert servers["chat-1"]["restarts"] == 1 and "killed by signal 9" in servers["chat-1"]["last_error"]

    os.kill(before["chat-2"], signal.SIGSTOP)  # a hang: the port accepts, nothing answers
    servers = run.wait(
        lambda s: s["chat-2"]["state"] == "READY" and s["chat-2"]["pid"] != before["chat-2"], "chat-2 back"
    )
    assert "hung: 2 health probes failed in a row" in servers["chat-2"]["last_error"]
    wait_gone([before["chat-2"]])
    for name in ("chat-3", "embed-1", "embed-2"):  # the others were never touched
        assert servers[name]["state"] == "READY" and servers[name]["pid"] == before[name]
    assert re.search(r"ERROR .*server crashy: STARTING -> FAILED \(.*crash loop", run.output(tail=False))

    tree = [p.pid for p in run.tree()]
    assert len(tree) >= 5
    code = run.stop(signal.SIGTERM)
    assert code == 1, run.output()  # crashy was not healthy
    wait_gone(tree)
    assert {s["state"] for s in run.servers().values()} == {"STOPPED", "FAILED"}


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_sigkilled_pipeline_leaves_nothing_and_a_new_one_takes_over(tmp_path: Path, runs) -> None:
    key_env = f"MS_TEST_KEY_{os.getpid()}"
    key = f"sk-{time.monotonic_ns()}"
    config = local_copy(tmp_path, top=f'api_key_env = "{key_env}"')
    names = ["chat-1", "embed-1"]
    args = ("--only", "chat-1", "--only", "embed-1")
    first = runs(config, tmp_path, args, env={key_env: key})
    servers = first.wait(all_ready(names), "first run READY")
    old = [servers[n]["pid"] for n in names]
    for pid in old:  # the key reached the engine through a 0600 file only, removed once it answered
        p = psutil.Process(pid)
        assert key not in " ".join(p.cmdline()) and key_env not in p.environ()
        key_file = Path(p.cmdline()[p.cmdline().index("--config") + 1])
        assert key_file.parent.name == "secrets" and not key_file.exists()
    status = subprocess.run(
        [sys.executable, "-m", "model_server", "status", "--config", str(config)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert status.returncode == 1  # the three servers not started here are down
    assert status.stdout.count("READY") == 2 and "2 up, 3 down" in status.stdout

    first.proc.kill()  # SIGKILL: no handler runs; the parent-death signal takes the engines down
    first.proc.wait(10)
    wait_gone(old)

    second = runs(config, tmp_path, args, env={key_env: key})
    servers = second.wait(all_ready(names), "second run READY")
    assert not {servers[n]["pid"] for n in names} & set(old)
    tree = [p.pid for p in second.tree()]
    assert second.stop(signal.SIGINT) == 0, second.output()  # Ctrl-C, every server healthy until then
    wait_gone(tree)
    assert not list((tmp_path / "run" / "secrets").glob("*.yaml"))  # key files removed on stop
    # The sims print their resolved settings, key included, as SGLang does: the logs hold none of it.
    logs = {p: p.read_text(errors="replace") for d in ("logs", "run") for p in (tmp_path / d).rglob("*") if p.is_file()}
    assert any("server_args=" in text for text in logs.values())
    assert not [p for p, text in logs.items() if key in text]
    assert key not in first.output(tail=False) + second.output(tail=False) + status.stdout + status.stderr


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_gpu_wait_short_memory_busy_port_and_stale_cleanup(tmp_path: Path, runs) -> None:
    gpu_state = tmp_path / "gpus.json"
    gpu_state.write_text(json.dumps({"1": 30000, "2": 9000}))  # GPU 1 busy; GPU 2 "free" but 77.5% free
    config = local_copy(tmp_path, inventory=f"state_file = {json.dumps(str(gpu_state))}")
    config.write_text(config.read_text().replace("total_mib = 81920", "total_mib = 40000"))
    text = config.read_text()
    embed_port = int(re.search(r'name = "embed-1"(?:.|\n)*?port = (\d+)', text).group(1))

    # an engine of an "earlier run" still alive, recorded in the status file
    leftover = procs.spawn_engine(
        LaunchCommand("old", (sys.executable, "-c", "import time; time.sleep(120)")), tmp_path / "old.log"
    )
    status_file = tmp_path / "run" / "status.json"
    status_file.parent.mkdir(parents=True)
    status_file.write_text(json.dumps({"pipeline": {"pid": 1, "create_time": 0.0}, "servers": {
        "chat-1": {"pid": leftover.pid, "create_time": psutil.Process(leftover.pid).create_time()}}}))  # fmt: skip

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", embed_port))
    blocker.listen()
    try:
        run = runs(config, tmp_path, ("--only", "chat-1", "--only", "chat-2", "--only", "chat-3", "--only", "embed-1"))
        servers = run.wait(
            lambda s: s["chat-3"]["state"] == "READY" and s["chat-1"]["state"] == "WAITING_GPU"
            and s["chat-2"]["state"] == "FAILED" and s["embed-1"]["state"] == "FAILED",
            "chat-3 READY, chat-1 waiting, chat-2 and embed-1 refused",
        )  # fmt: skip
        assert leftover.wait(timeout=10) is not None  # the stale-run cleanup stopped it
        assert f"server chat-1: 1 process(es) of an earlier run still alive (pid {leftover.pid})" in run.output(
            tail=False
        )
        assert "GPU memory is not enough: GPU 2: 9000 of 40000 MiB used (77.5% free)" in servers["chat-2"]["last_error"]
        assert f"port {embed_port} on 127.0.0.1 is already in use" in servers["embed-1"]["last_error"]
        assert servers["chat-2"]["restarts"] == 0 and servers["embed-1"]["restarts"] == 0
        assert "waiting for GPUs (GPU 1: 30000 of 40000 MiB used)" in run.output(tail=False)

        gpu_state.write_text(json.dumps({"2": 9000}))  # GPU 1 frees up
        run.wait(all_ready(["chat-1", "chat-3"]), "chat-1 READY after its GPU freed")
        assert run.stop(signal.SIGTERM) == 1  # two servers were refused
    finally:
        blocker.close()
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait(5)
