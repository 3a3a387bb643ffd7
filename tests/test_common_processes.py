"""The shared process helpers (identity, ending a group, log tails) on real processes, and SimProcess's argv."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from model_server.common.processes import (
    create_time,
    end_processes,
    identified_process,
    listening_pid,
    log_tail,
    same_process,
    tail_lines,
)
from model_server.config import LaunchPolicy, ServerSpec
from model_server.errors import SimError
from model_server.launcher.command import build_command
from model_server.sim.process import SimProcess

SLEEPER = (sys.executable, "-c", "import time; time.sleep(120)")
IGNORE_TERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)"
)
STUBBORN = (sys.executable, "-c", IGNORE_TERM)


@pytest.fixture
def spawn():
    started: list[subprocess.Popen] = []

    def start(argv: tuple[str, ...]) -> subprocess.Popen:
        proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_process_is_identified_by_pid_and_start_time(spawn) -> None:
    proc = spawn(SLEEPER)
    started = create_time(proc.pid)
    assert started is not None and same_process(proc.pid, started)
    assert identified_process(proc.pid, started).pid == proc.pid
    assert not same_process(proc.pid, started - 10)  # the pid, reused by another process
    assert not same_process("123", started) and not same_process(proc.pid, None) and not same_process(True, started)
    proc.kill()
    proc.wait(10)
    assert not same_process(proc.pid, started) and create_time(proc.pid) is None


@pytest.mark.timeout(30)
def test_end_processes_terms_then_kills_what_ignores_it(spawn) -> None:
    polite, stubborn = spawn(SLEEPER), spawn(STUBBORN)
    assert stubborn.stdout.readline() == b"up\n"  # its handler is set
    remaining, left = end_processes([polite.pid, stubborn.pid], (), grace_s=0.5, reap=[polite, stubborn])
    assert remaining == [stubborn.pid] and left == []  # only the stubborn group needed SIGKILL
    assert polite.returncode == -signal.SIGTERM and stubborn.returncode == -signal.SIGKILL


def test_a_single_process_outside_the_groups_gets_its_own_signal(spawn) -> None:
    proc = spawn(SLEEPER)
    remaining, left = end_processes([], [psutil.Process(proc.pid)], grace_s=5.0, reap=[proc])
    assert (remaining, left) == ([], []) and proc.returncode == -signal.SIGTERM


def test_listening_pid_finds_this_process_by_port_and_host() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        found = listening_pid(port)
        if found is None:
            pytest.skip("this system does not show socket owners to this user")
        assert found == psutil.Process().pid
        assert listening_pid(port, ("127.0.0.1",)) == found and listening_pid(port, ("10.9.9.9",)) is None


def test_log_tails_keep_the_last_non_empty_lines(tmp_path: Path) -> None:
    assert tail_lines("a\n\nb\nc\n\n", 2) == "b\nc" and tail_lines("", 3) == "" and tail_lines("x\n", 0) == ""
    log = tmp_path / "engine.log"
    log.write_text("x" * 10000 + "\nfirst\nValueError: boom\n\n")
    assert log_tail(log) == "ValueError: boom"
    assert log_tail(log, lines=2) == "first\nValueError: boom"
    assert log_tail(tmp_path / "missing.log") == ""


# ---- SimProcess: the launcher's argv, the shared URLs --------------------------------------------------


def test_sim_process_runs_the_argv_the_pipeline_builds_for_a_sim_server() -> None:
    sim = SimProcess(model_path="sim/m", served_model_name="chat", port=18001, embedding=True, args=("--ttft-ms", "1"))
    spec = ServerSpec(name="x", group="g", kind="embedding", host="127.0.0.1", port=18001, model="sim/m",
                      served_model_name="chat", args=("--ttft-ms", "1"))  # fmt: skip
    policy = LaunchPolicy(
        engine="sim", bind_host="127.0.0.1", context_length=None, chunked_prefill_size=None,
        embedding_context_length=None, embedding_chunked_prefill_size=None, enable_metrics=False,
    )  # fmt: skip
    assert sim.command("/k.yaml") == list(build_command(spec, policy, 0.88, key_file="/k.yaml").argv)
    argv = sim.command()
    assert argv[1:4] == ["-m", "model_server", "sim"] and argv[-2:] == ["--ttft-ms", "1"] and "--config" not in argv
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "--is-embedding" in argv


def test_sim_process_urls_are_ipv6_correct_and_bad_settings_are_a_sim_error() -> None:
    sim = SimProcess(host="::1", port=18002)
    assert (sim.url, sim.base_url) == ("http://[::1]:18002", "http://[::1]:18002/v1")
    with pytest.raises(SimError, match="no simulated server"):
        SimProcess(port=18003, args=("--api-key", "sk-1")).command()
