"""The launch pipeline's fault matrix on real processes (issue 9, cases 9-13; issue 11, the launcher's part).

Each test runs ``python serve_llm_pipeline.py`` as a subprocess on a copy of
configs/local.toml (free ports, files in tmp_path), with the simulator or the
fake ``sglang`` package of tests/fake_sglang, and does to it what a user's
machine does: SIGKILL, SIGHUP, a port taken at the wrong moment, a damaged
status file, a second pipeline, an engine that prints its API key.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from _pipeline_runs import FAKE, ROOT, alive, all_ready, fake_engine, local_copy, port_of, runs, wait_for, wait_gone  # noqa: F401

from model_server.launcher import processes as procs

SGLANG = {"engine": '"sglang"'}
CHAT1 = ("--only", "chat-1")


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


def one_paragraph_error(text: str) -> str:
    """The error line of a CLI run (``model-server: error: ...``), asserting it is one paragraph."""
    lines = [ln for ln in text.splitlines() if "error:" in ln]
    assert len(lines) == 1, text
    return lines[0]


def refused(config: Path, cwd: Path) -> str:
    """Run the pipeline on ``config`` (chat-1 only); assert it refuses with exit 2 and no traceback; its error line."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "serve_llm_pipeline.py"), "--config", str(config), *CHAT1],
        cwd=cwd, capture_output=True, text=True, timeout=50,
    )  # fmt: skip
    no_traceback(result.stdout + result.stderr)
    assert result.returncode == 2, result.stderr
    return one_paragraph_error(result.stderr)


# ---- case 9: engine workers that outlive their leader ----------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_workers_that_outlive_their_leader_are_stopped_by_the_next_pipeline(tmp_path: Path, runs) -> None:
    # The fake engine starts two workers that arm no parent-death signal; the first one serves the
    # port and leaves the engine's process group (setsid), the second stays in it.
    worker_args = ["--fake-workers", "2", "--fake-server-in-worker", "--fake-setsid-first-worker"]
    config = local_copy(tmp_path, launch=SGLANG, args={"chat-1": worker_args})
    port = port_of(config, "chat-1")
    first = runs(config, tmp_path, CHAT1, env=FAKE)
    servers = first.wait(all_ready(["chat-1"]), "chat-1 READY")
    leader = servers["chat-1"]["pid"]
    workers = wait_for(
        lambda: (
            [p.pid for p in psutil.Process(leader).children()] if len(psutil.Process(leader).children()) == 2 else None
        ),
        what="two workers",
    )

    first.proc.kill()  # SIGKILL: the leader gets its parent-death signal, the workers do not
    first.proc.wait(10)
    wait_gone([leader])
    assert all(alive(w) for w in workers), "the scenario needs workers that outlive their leader"
    assert procs.port_in_use("127.0.0.1", port)

    second = runs(config, tmp_path, CHAT1, env=FAKE)
    servers = second.wait(all_ready(["chat-1"]), "chat-1 READY in the second pipeline", timeout_s=60)
    wait_gone(workers, timeout_s=5)  # the stale-run cleanup ended them before starting anew
    assert re.search(r"earlier run", second.output(tail=False))

    # The status file names the engine's process group and its workers with their start times.
    new_leader = servers["chat-1"]["pid"]
    servers = second.wait(lambda s: len(s["chat-1"].get("workers", [])) == 2, "the workers recorded")
    recorded = {w["pid"]: w["create_time"] for w in servers["chat-1"]["workers"]}
    children = psutil.Process(new_leader).children()
    assert recorded == {c.pid: pytest.approx(c.create_time(), abs=0.05) for c in children}
    assert servers["chat-1"]["pgid"] == new_leader

    # A graceful stop ends the worker that left the group too.
    tree = [p.pid for p in second.tree()]
    assert len(tree) == 3  # the engine (the trampoline exec'd into it) and its 2 workers
    assert second.stop(signal.SIGTERM) == 0, second.output()
    wait_gone(tree)
    assert not procs.port_in_use("127.0.0.1", port)


# ---- case 10: SIGHUP and SIGQUIT ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT])
def test_sighup_and_sigquit_stop_gracefully_and_no_key_file_outlives_its_use(tmp_path: Path, runs, sig: int) -> None:
    key_env = f"MS_TEST_KEY_{os.getpid()}"
    key = f"sk-{time.monotonic_ns()}"
    config = local_copy(
        tmp_path, launch=SGLANG, top=f'api_key_env = "{key_env}"', args={"chat-1": ["--fake-listen-delay-s", "1.5"]}
    )
    run = runs(config, tmp_path, CHAT1, env={**FAKE, key_env: key})
    secrets = tmp_path / "run" / "secrets"

    run.wait(lambda s: s["chat-1"]["state"] == "STARTING", "chat-1 STARTING")
    key_files = list(secrets.glob("*.yaml"))  # while the engine loads, its key is in a 0600 file only
    assert len(key_files) == 1 and key in key_files[0].read_text()
    assert stat.S_IMODE(key_files[0].stat().st_mode) == 0o600 and stat.S_IMODE(secrets.stat().st_mode) == 0o700

    servers = run.wait(all_ready(["chat-1"]), "chat-1 READY")
    leader = servers["chat-1"]["pid"]
    assert not list(secrets.glob("*")), "the engine has read its key: the file must be gone"

    assert run.stop(sig) == 0, run.output()  # as SIGTERM: every server READY until the stop
    wait_gone([leader])
    data = json.loads(run.status_file.read_text())
    assert {s["state"] for s in data["servers"].values()} == {"STOPPED"}
    log = (tmp_path / "logs" / "chat-1.log").read_text()
    assert f"fake engine pid {leader}: SIGTERM" in log  # a graceful stop, not the parent-death SIGKILL
    assert f"signal {signal.Signals(sig).name}: stopping" in run.output(tail=False)
    assert not list(secrets.glob("*"))


# ---- case 11: a port taken during a restart -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_port_taken_during_a_restart_is_retried_with_backoff_until_free(tmp_path: Path, runs) -> None:
    config = local_copy(
        tmp_path,
        launch={**SGLANG, "restart_backoff_initial_s": "1.0", "restart_backoff_max_s": "1.5", "max_restarts": "10"},
    )
    port = port_of(config, "chat-1")
    run = runs(config, tmp_path, CHAT1, env=FAKE)
    servers = run.wait(all_ready(["chat-1"]), "chat-1 READY")
    old = servers["chat-1"]["pid"]

    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the probes' connections linger in TIME_WAIT
    try:
        os.kill(old, signal.SIGKILL)

        def took_port() -> bool:  # the moment the engine lets go of it (its restart waits >= 0.5 s)
            try:
                blocker.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

        wait_for(took_port, 5, "the killed engine to release its port", 0.005)
        blocker.listen()

        def port_retried(s: dict) -> bool:
            if s["chat-1"]["state"] == "FAILED":
                pytest.fail(f"chat-1 FAILED while its port was taken: {s['chat-1']['last_error']}")
            return s["chat-1"]["restarts"] >= 3 and "in use" in s["chat-1"]["last_error"]

        servers = run.wait(port_retried, "three restarts that found the port taken", timeout_s=30)
        assert f"port {port}" in servers["chat-1"]["last_error"] and str(os.getpid()) in servers["chat-1"]["last_error"]
    finally:
        blocker.close()
    servers = run.wait(
        lambda s: s["chat-1"]["state"] == "READY" and s["chat-1"]["pid"] != old,
        "chat-1 READY once the port is free",
        timeout_s=30,
    )
    assert servers["chat-1"]["restarts"] >= 3
    assert run.stop() == 0


# ---- case 12: status file edges and ownership ---------------------------------------------------


BAD_STATUS = {
    "entry is a string": ({"chat-1": "READY"}, "servers['chat-1'] is 'READY'"),
    "pid is a string": ({"chat-1": {"pid": "123", "create_time": 1.0}}, "servers['chat-1'].pid is '123'"),
    "pid is negative": ({"chat-1": {"pid": -1, "create_time": 1.0}}, "servers['chat-1'].pid is -1"),
    "pid is a float": ({"chat-1": {"pid": 1.5, "create_time": 1.0}}, "servers['chat-1'].pid is 1.5"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(BAD_STATUS))
def test_a_status_file_with_wrong_types_is_refused_in_one_paragraph(tmp_path: Path, case: str) -> None:
    servers, expected = BAD_STATUS[case]
    config = local_copy(tmp_path)
    status_file = tmp_path / "run" / "status.json"
    status_file.parent.mkdir()
    status_file.write_text(json.dumps({"version": 1, "pipeline": {"pid": 1, "create_time": 0.0}, "servers": servers}))
    line = refused(config, tmp_path)
    assert str(status_file) in line and expected in line and "remove" in line.lower()


STATUS_CLI_CASES = {
    "a string entry": json.dumps({"pipeline": {}, "servers": {"only": "READY"}}),
    "since yesterday": json.dumps(
        {"pipeline": {}, "servers": {"only": {"state": "READY", "pid": 12, "since": "yesterday"}}}
    ),
    "corrupt JSON": "{not json",
    "a list": "[]",
}


@pytest.mark.timeout(90)
def test_status_command_always_shows_its_live_probes(tmp_path: Path) -> None:
    status_file = tmp_path / "status.json"
    with fake_engine(tmp_path) as port:
        fleet = tmp_path / "fleet.toml"
        fleet.write_text(
            f'[launch]\nengine = "sim"\nstatus_file = "{status_file}"\n[gpu_inventory]\nsource = "simulated"\n'
            f'[[servers]]\nname = "only"\ngroup = "8"\nkind = "completion"\nhost = "127.0.0.1"\nport = {port}\nmodel = "sim/m"\n'
        )
        cmd = [sys.executable, "-m", "model_server", "status", "--config", str(fleet), "--timeout-s", "5"]
        for case, text in STATUS_CLI_CASES.items():
            status_file.write_text(text)
            result = subprocess.run(
                cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"}
            )
            no_traceback(result.stdout + result.stderr)
            assert result.returncode == 0, (case, result.stdout, result.stderr)  # the server is up
            assert "1 up, 0 down" in result.stdout and "only" in result.stdout, (case, result.stdout)
            assert str(status_file) in result.stderr and "status file" in result.stderr, (case, result.stderr)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_second_pipeline_is_refused_by_the_lock_even_without_a_status_file(tmp_path: Path, runs) -> None:
    config = local_copy(tmp_path, launch=SGLANG)
    first = runs(config, tmp_path, CHAT1, env=FAKE)
    servers = first.wait(all_ready(["chat-1"]), "chat-1 READY")
    engine = servers["chat-1"]["pid"]
    first.status_file.unlink()

    second = runs(config, tmp_path, CHAT1, env=FAKE)
    assert second.exit_code(timeout_s=30) == 2, second.output()
    out = second.output()
    no_traceback(out)
    assert f"another pipeline (pid {first.proc.pid})" in one_paragraph_error(out)
    assert alive(engine) and first.proc.poll() is None
    if first.status_file.exists():  # only the owner may write it
        assert json.loads(first.status_file.read_text())["pipeline"]["pid"] == first.proc.pid
    assert first.stop() == 0


# ---- case 13: bad launch settings reach no engine ---------------------------------------------------


@pytest.mark.timeout(60)
def test_an_unwritable_log_dir_is_named_not_blamed_on_python(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = local_copy(tmp_path, launch={"log_dir": json.dumps(str(blocker / "logs"))})
    line = refused(config, tmp_path)
    assert "launch.log_dir" in line and str(blocker / "logs") in line and "cannot start" not in line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field", ["health_timeout_s", "gpu_poll_interval_s", "startup_timeout_s", "stop_grace_s"])
def test_a_huge_duration_is_refused_before_anything_starts(tmp_path: Path, field: str) -> None:
    config = local_copy(tmp_path, launch={field: "1e10"})
    assert f"field 'launch.{field}'" in refused(config, tmp_path)
    assert not (tmp_path / "run" / "status.json").exists()


# ---- issue 11: no secret in any log, status file or status output; late listeners ---------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_no_secret_reaches_a_log_the_status_file_or_status_output(tmp_path: Path, runs) -> None:
    key_env, secret_env = f"MS_TEST_KEY_{os.getpid()}", f"MS_TEST_SECRET_{os.getpid()}"
    key, secret = f"sk-'q\"{time.monotonic_ns()}", f"hf_{time.monotonic_ns()}x"  # quotes: repr and JSON escape them
    config = local_copy(
        tmp_path,
        launch={**SGLANG, "secret_env": json.dumps([secret_env]), "max_restarts": "1"},
        top=f'api_key_env = "{key_env}"',
        args={
            "chat-1": ["--fake-print-env", secret_env],
            "chat-2": ["--fake-print-env", secret_env, "--fake-exit-after-print"],
        },
    )
    env = {**FAKE, key_env: key, secret_env: secret}
    run = runs(config, tmp_path, ("--only", "chat-1", "--only", "chat-2"), env=env)
    servers = run.wait(
        lambda s: s["chat-1"]["state"] == "READY" and s["chat-2"]["state"] == "FAILED", "chat-1 READY, chat-2 FAILED"
    )
    assert "exit status 3" in servers["chat-2"]["last_error"]
    status = subprocess.run(
        [sys.executable, "-m", "model_server", "status", "--config", str(config)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env={**os.environ, **env, "COLUMNS": "250"},
    )  # fmt: skip
    assert run.stop() == 1  # chat-2 failed

    logs = tmp_path / "logs"
    engine_log = (logs / "chat-1.log").read_text()
    assert "server_args=ServerArgs(" in engine_log and f"{secret_env}=" in engine_log  # the engine did print them
    assert "api_key='***'" in engine_log or "api_key=***" in engine_log
    for path in logs.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    variants = {key, secret, repr(key)[1:-1], json.dumps(key)[1:-1]}
    places = {
        str(p): p.read_text(errors="replace") for d in (logs, tmp_path / "run") for p in d.rglob("*") if p.is_file()
    }
    places["pipeline output"] = run.output(tail=False)
    places["status stdout"], places["status stderr"] = status.stdout, status.stderr
    for where, text in places.items():
        for v in variants:
            assert v not in text, f"a secret in {where}"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_readiness_waits_for_a_late_listener_and_slow_health_generate_is_not_a_hang(tmp_path: Path, runs) -> None:
    """Connection refused while loading, 503 while warming up, ~1 s /health_generate: with local.toml's health settings."""
    local = (ROOT / "configs" / "local.toml").read_text()
    health = {
        k: re.search(rf"(?m)^{k} = (.*?)\s*(#.*)?$", local).group(1)
        for k in ("health_interval_s", "health_timeout_s", "health_failures_to_restart")
    }
    slow = ["--fake-listen-delay-s", "2", "--fake-warmup-s", "1", "--fake-health-s", "1.0"]
    config = local_copy(tmp_path, launch={**SGLANG, **health}, args={"chat-1": slow})
    run = runs(config, tmp_path, CHAT1, env=FAKE)
    started = time.monotonic()
    servers = run.wait(all_ready(["chat-1"]), "chat-1 READY")
    assert time.monotonic() - started >= 2.5  # it waited through the load and the warm-up
    assert servers["chat-1"]["restarts"] == 0
    # a few probe cycles: a healthy engine whose /health_generate takes 1 s is never counted as failing
    cycles = 3 * float(health["health_interval_s"]) + 3.0
    observed_until = time.monotonic() + cycles
    run.wait(
        lambda s: time.monotonic() >= observed_until or s["chat-1"]["state"] != "READY",
        "the observation window",
        timeout_s=cycles + 10,
    )
    servers = run.servers()
    assert servers["chat-1"]["state"] == "READY" and servers["chat-1"]["restarts"] == 0
    assert "health probe" not in run.output(tail=False)
    assert run.stop() == 0
