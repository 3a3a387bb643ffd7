"""Shared by the launch pipeline's real-process tests: fleet files, pipeline subprocesses, waits.

A test copies configs/local.toml with free ports and its files in tmp_path
(:func:`local_copy`), starts ``python serve_llm_pipeline.py`` as a subprocess
(:class:`Run`, through the ``runs`` fixture, which kills whatever is left), and
polls the status file with deadlines, never bare sleeps.

``FAKE_SGLANG`` is a fake ``sglang`` package (tests/fake_sglang): with
``engine = "sglang"`` and ``PYTHONPATH=FAKE_SGLANG`` the pipeline starts it as
``python -m sglang.launch_server``; see its docstring for what it imitates.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from _waiting import wait_for

from model_server.launcher import processes as procs
from model_server.launcher.command import LaunchCommand

ROOT = Path(__file__).resolve().parent.parent
FAKE_SGLANG = Path(__file__).resolve().parent / "fake_sglang"
FAKE = {"PYTHONPATH": str(FAKE_SGLANG)}  # the environment that makes `python -m sglang.launch_server` the fake
FAST = {
    "gpu_poll_interval_s": "0.2",
    "startup_timeout_s": "45",
    "health_interval_s": "0.4",
    "health_timeout_s": "2.0",  # generous: 2 busy cores must not look like a hang
    "health_failures_to_restart": "2",
    "restart_backoff_initial_s": "0.1",
    "restart_backoff_max_s": "0.5",
    "max_restarts": "2",
    "restart_window_s": "120",
    "stop_grace_s": "3",
    "drain_notice_s": "0.5",  # no test client but the listening ones (which set their own) needs the 2 s default
}


def free_port() -> int:
    """A TCP port the OS says is free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LOCAL = ["chat-1", "chat-2", "chat-3", "embed-1", "embed-2"]


def local_copy(
    tmp_path: Path,
    launch: dict[str, str] | None = None,
    top: str = "",
    inventory: str = "",
    extra: str = "",
    args: dict[str, list[str]] | None = None,
) -> Path:
    """configs/local.toml with free ports, logs/status in tmp_path and the given [launch] values.

    ``args`` replaces the ``args`` of the named servers (the fake engine's flags, for instance). The table's
    [[gateways]] entries are left out (their fixed ports): a test that runs a gateway brings its own entry.
    """
    text = (ROOT / "configs" / "local.toml").read_text()
    text = re.sub(r"(?ms)^\[\[gateways\]\]\n.*?(?=^\[|\Z)", "", text)
    assert "[[gateways]]" not in text, "configs/local.toml: a [[gateways]] entry local_copy did not leave out"
    text = re.sub(r"(?m)^port = \d+$", lambda _m: f"port = {free_port()}", text)
    values = {
        **FAST,
        "log_dir": json.dumps(str(tmp_path / "logs")),
        "status_file": json.dumps(str(tmp_path / "run" / "status.json")),
    }
    values.update(launch or {})
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        if n == 0:
            text = text.replace("[launch]\n", f"[launch]\n{key} = {value}\n", 1)
    if "control_port" not in values:  # configs/local.toml's fixed port: one pipeline at a time could use it
        text = re.sub(r"(?m)^control_port = .*\n", "", text)
    text = text.replace("[gpu_inventory]\n", f"[gpu_inventory]\n{inventory}\n", 1)
    for name, server_args in (args or {}).items():
        block = re.search(rf'(?s)name = "{re.escape(name)}".*?(?=\[\[servers\]\]|\Z)', text)
        assert block, name
        new = re.sub(r"(?m)^args = .*\n", "", block.group(0)).rstrip("\n") + f"\nargs = {json.dumps(server_args)}\n\n"
        text = text[: block.start()] + new + text[block.end() :]
    path = tmp_path / "fleet.toml"
    path.write_text(top + "\n" + text + extra)
    return path


def port_of(config: Path, name: str) -> int:
    match = re.search(rf'name = "{re.escape(name)}"(?:.|\n)*?port = (\d+)', config.read_text())
    assert match, name
    return int(match.group(1))


class Run:
    """One pipeline subprocess; always gone (with its whole tree) after the test."""

    def __init__(
        self, config: Path, tmp_path: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> None:
        self.status_file = tmp_path / "run" / "status.json"
        self.log = tmp_path / f"pipeline-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "serve_llm_pipeline.py"), "--config", str(config), *args],
                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            )  # fmt: skip
        self.seen: set[int] = set()

    def servers(self) -> dict[str, dict]:
        try:
            data = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}
        if data.get("pipeline", {}).get("pid") != self.proc.pid:
            return {}  # an earlier run's file
        return data["servers"]

    def tree(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update(p.pid for p in kids)
        return kids

    def wait(self, predicate: Callable[[dict[str, dict]], bool], what: str, timeout_s: float = 60.0) -> dict[str, dict]:
        def reached() -> dict[str, dict] | None:
            servers = self.servers()
            self.tree()
            if self.proc.poll() is not None:
                pytest.fail(f"the pipeline exited ({self.proc.returncode}) while waiting for {what}:\n{self.output()}")
            return servers if servers and predicate(servers) else None

        return wait_for(
            reached, timeout_s, lambda: f"{what}; status {json.dumps(self.servers())}\n{self.output()}", 0.05
        )

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout_s)

    def exit_code(self, timeout_s: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout_s)

    def output(self, tail: bool = True) -> str:
        text = self.log.read_text(errors="replace")
        return text[-6000:] if tail else text

    def cleanup(self) -> None:
        self.tree()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.seen:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.kill(pid, signal.SIGKILL)  # one that left its group
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def runs():
    started: list[Run] = []

    def start(*args, **kwargs) -> Run:
        run = Run(*args, **kwargs)
        started.append(run)
        return run

    yield start
    for run in started:
        run.cleanup()


def all_ready(names: list[str]) -> Callable[[dict[str, dict]], bool]:
    return lambda s: all(s.get(n, {}).get("state") == "READY" for n in names)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: list[int], timeout_s: float = 20.0) -> None:
    wait_for(lambda: not [pid for pid in pids if alive(pid)], timeout_s, f"processes {pids} to end")


@contextlib.contextmanager
def fake_engine(tmp_path: Path, *args: str, port: int | None = None) -> Iterator[int]:
    """The fake ``sglang.launch_server`` on ``port`` (default: a free one), outside any pipeline; yields the port once it listens."""
    port = port or free_port()
    argv = (sys.executable, "-m", "sglang.launch_server", "--model-path", "m", "--port", str(port), *args)
    proc = procs.spawn_engine(LaunchCommand("fake", argv, FAKE), tmp_path / "fake.log")
    try:
        wait_for(lambda: procs.port_in_use("127.0.0.1", port), what="the fake engine listening")
        yield port
    finally:
        procs.kill_groups([proc.pid], 2.0, reap=[proc])
