"""The pipeline's control API on real processes: status, events, metrics, drain and restart, and what it refuses.

One pipeline of three simulated engines (chat-1..3 of configs/local.toml, free
ports, files in a temporary directory) with the control API on a free port
serves the whole module; each test leaves it with every server READY. The
in-process tests at the end check what a real socket on 127.0.0.1 cannot:
reads from another machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from _pipeline_runs import ROOT, Run, alive, all_ready, free_port, local_copy, port_of, wait_gone
from _waiting import wait_for
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from model_server.config import load_fleet
from model_server.launcher.control_api import build_app
from model_server.launcher.events_file import EventLog
from model_server.launcher.fleet_control import CommandRefused, FleetControl
from model_server.launcher.gpu import make_inventory
from model_server.launcher.lifecycle import ServerState
from model_server.launcher.metrics import PipelineMetrics
from model_server.launcher.redact import Secret
from model_server.launcher.status_file import ServerStatus, StatusBoard

KEY = "control-key-for-the-tests-0123456789"
NAMES = ["chat-1", "chat-2", "chat-3"]
AUTH = {"Authorization": f"Bearer {KEY}"}


class Fleet:
    def __init__(self, run: Run, config: Path, port: int) -> None:
        self.run, self.config = run, config
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def pids(self) -> dict[str, int]:
        return {s["name"]: s["pid"] for s in self.api.get("/status").json()["servers"]}

    def state(self, name: str) -> str:
        return next(s["state"] for s in self.api.get("/status").json()["servers"] if s["name"] == name)

    def ready(self, timeout_s: float = 45.0) -> dict[str, dict]:
        return self.run.wait(all_ready(NAMES), "chat-1..3 READY", timeout_s)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp_path = tmp_path_factory.mktemp("control")
    port = free_port()
    launch = {"control_port": str(port), "control_key_env": '"MS_TEST_CONTROL_KEY"', "drain_timeout_s": "20"}
    config = local_copy(tmp_path, launch=launch)
    args = tuple(a for n in NAMES for a in ("--only", n))
    run = Run(config, tmp_path, args, env={"MS_TEST_CONTROL_KEY": KEY})
    try:
        run.wait(all_ready(NAMES), "chat-1..3 READY", 60)
        yield Fleet(run, config, port)
        assert run.stop() == 0, run.output()
        assert "Traceback" not in run.output(tail=False)
    finally:
        run.cleanup()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_status_lists_every_server_ready_with_its_gpus(fleet: Fleet) -> None:
    answer = fleet.api.get("/status")
    assert answer.status_code == 200
    servers = {s["name"]: s for s in answer.json()["servers"]}
    assert sorted(servers) == NAMES
    for name, s in servers.items():
        assert s["state"] == "READY" and alive(s["pid"]) and s["restarts"] == 0 and s["last_error"] == ""
        assert s["port"] == port_of(fleet.config, name) and s["since"] > 0
    assert servers["chat-2"]["gpus"] == [{"index": 2, "used_mib": 0, "total_mib": 81920}]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_write_routes_refuse_bad_requests_clearly_and_touch_nothing(fleet: Fleet) -> None:
    before = fleet.pids()
    cases = [
        ("/servers/chat-1/drain", {}, None, 401, "Authorization: Bearer"),
        ("/servers/chat-1/restart", {"Authorization": "Bearer wrong-key"}, None, 401, "not this pipeline's"),
        ("/servers/chat-1/stop", {"Authorization": KEY}, None, 401, "Authorization: Bearer"),  # no scheme
        ("/servers/nope/drain", AUTH, None, 404, "no server named 'nope' on this host. The servers here are: chat-1"),
        ("/servers/chat-1/drain", AUTH, b"{not json", 422, "the body is not JSON"),
        ("/servers/chat-1/drain", AUTH, b"[1, 2]", 422, "not an object"),
        ("/servers/chat-1/drain", AUTH, b'{"then": "explode"}', 422, "then: Input should be 'stop' or 'restart'"),
        ("/servers/chat-1/restart", AUTH, b'{"now": true}', 422, "Fields this route takes: none"),
        ("/servers/chat-1/undrain", AUTH, None, 409, "it is READY, not DRAINING"),
        ("/servers/chat-1/start", AUTH, None, 409, "its supervision still runs"),
        ("/servers/chat-1/explode", AUTH, None, 404, "no route POST /servers/chat-1/explode. The routes: GET /status"),
        ("/status", AUTH, None, 405, "no route POST /status"),
    ]
    for path, headers, body, status, says in cases:
        answer = fleet.api.post(path, headers=headers, content=body)
        assert answer.status_code == status, (path, answer.text)
        assert says in answer.json()["error"], (path, answer.text)
        assert KEY not in answer.text
    assert fleet.pids() == before and all(fleet.state(n) == "READY" for n in NAMES)
    assert KEY not in fleet.run.output(tail=False) and KEY not in fleet.run.status_file.read_text()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_restart_drains_the_requests_in_flight_then_comes_back_with_a_new_pid(fleet: Fleet) -> None:
    old_pid = fleet.pids()["chat-1"]
    url = f"http://127.0.0.1:{port_of(fleet.config, 'chat-1')}/v1/completions"
    body = {"model": "llama-8b", "prompt": "hello", "max_tokens": 600, "ignore_eos": True}
    started = threading.Event()

    def long_request() -> httpx.Response:
        started.set()
        return httpx.post(url, json=body, timeout=30)

    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(long_request)
        started.wait(5)
        wait_for(lambda: _running(fleet, "chat-1") > 0, 10, "the request running on chat-1")
        answer = fleet.api.post("/servers/chat-1/restart", headers=AUTH)
        assert answer.status_code == 202 and answer.json() == {
            "server": "chat-1",
            "accepted": "restart",
            "state": "READY",
        }
        wait_for(lambda: fleet.state("chat-1") == "DRAINING", 5, "chat-1 DRAINING")
        assert alive(old_pid) and not in_flight.done()  # its request still runs
        reply = in_flight.result(timeout=30)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 600
    servers = fleet.ready()
    assert servers["chat-1"]["pid"] != old_pid and servers["chat-1"]["restarts"] == 0
    wait_gone([old_pid])
    lines = [json.loads(x) for x in (fleet.run.status_file.parent / "events.jsonl").read_text().splitlines()]
    mine = [(e["from"], e["to"]) for e in lines if e["server"] == "chat-1"]
    drained = [("READY", "DRAINING"), ("DRAINING", "RESTARTING"), ("RESTARTING", "STARTING"), ("STARTING", "READY")]
    assert mine[-4:] == drained, mine
    assert all(set(e) == {"time", "server", "from", "to", "reason"} for e in lines)
    assert "drained (no request running)" in next(e["reason"] for e in lines if e["to"] == "RESTARTING")
    recent = fleet.api.get("/events", params={"limit": 4}).json()["events"]
    assert [(e["from"], e["to"]) for e in recent if e["server"] == "chat-1"] == drained
    logged = fleet.run.output(tail=False)
    assert "server chat-1: READY -> DRAINING" in logged and "server chat-1: DRAINING -> RESTARTING" in logged


def _running(fleet: Fleet, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port_of(fleet.config, name)}/metrics", timeout=5).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return sum(s.value for s in families["sglang:num_running_reqs"].samples)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_stop_then_start_through_the_api(fleet: Fleet) -> None:
    old_pid = fleet.pids()["chat-3"]
    assert fleet.api.post("/servers/chat-3/stop", headers=AUTH).status_code == 202
    wait_for(lambda: fleet.state("chat-3") == "STOPPED", 15, "chat-3 STOPPED")
    wait_gone([old_pid])
    refused = fleet.api.post("/servers/chat-3/drain", headers=AUTH)
    assert refused.status_code == 409 and "it is STOPPED" in refused.json()["error"]
    assert fleet.api.post("/servers/chat-3/start", headers=AUTH).status_code == 202
    servers = fleet.ready()
    assert servers["chat-3"]["pid"] != old_pid


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_metrics_parse_and_name_every_server_and_gpu(fleet: Fleet) -> None:
    answer = fleet.api.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    states = families["model_server_server_state"].samples
    assert {s.labels["server"] for s in states} == set(NAMES)
    assert all(s.value == 1 for s in states if s.labels["state"] == "READY")
    assert {s.labels["server"] for s in families["model_server_server_restarts"].samples} == set(NAMES)
    used = {s.labels["gpu"]: s.value for s in families["model_server_gpu_memory_total_bytes"].samples}
    assert used == {"1": 81920 << 20, "2": 81920 << 20, "3": 81920 << 20}
    assert families["model_server_pipeline_uptime_seconds"].samples[0].value > 0
    ready = {s.labels["server"] for s in families["model_server_time_to_ready_seconds"].samples}
    assert ready == set(NAMES)
    assert "model_server_health_probe_seconds" in families


# ---- in process: reads from another machine --------------------------------------------------------


@pytest.mark.timeout(30)
def test_reads_from_another_machine_need_the_key(tmp_path: Path) -> None:
    fleet = load_fleet(local_copy(tmp_path))
    specs = [s for s in fleet.servers if s.name in NAMES]
    board = StatusBoard(tmp_path / "status.json", [ServerStatus(s.name, s.group, s.host, s.port) for s in specs], {})
    with ThreadPoolExecutor(1) as pool:
        control = FleetControl(specs, board, make_inventory(fleet.gpu_inventory), pool, lambda _s: None, fleet.launch)  # type: ignore[arg-type,return-value]
        metrics = PipelineMetrics(control.statuses, control.read_gpus)
        client = TestClient(build_app(control, EventLog(), metrics, Secret(KEY), fleet))  # its client is "testclient"
        for path in ("/status", "/events", "/metrics"):
            refused = client.get(path)
            assert refused.status_code == 401 and "read the control API from another machine" in refused.json()["error"]
            assert client.get(path, headers=AUTH).status_code == 200
        assert client.get("/events", params={"limit": 0}, headers=AUTH).status_code == 422
        garbage = client.get("/events", params={"limit": "many"}, headers=AUTH)
        assert garbage.status_code == 422 and "limit" in garbage.json()["error"]
        keyless = TestClient(build_app(control, EventLog(), metrics, None, fleet))
        refused = keyless.post("/servers/chat-1/drain", headers=AUTH)
        assert refused.status_code == 401 and "launch.control_key_env" in refused.json()["error"]
        assert keyless.get("/status").status_code == 403


@pytest.mark.timeout(60)
def test_a_taken_control_port_stops_the_pipeline_before_any_engine_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = local_copy(tmp_path, launch={"control_port": str(port)})
        result = subprocess.run(
            [sys.executable, str(ROOT / "serve_llm_pipeline.py"), "--config", str(config), "--only", "chat-1"],
            cwd=tmp_path, capture_output=True, text=True, timeout=50,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"the control API's port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "Traceback" not in result.stderr and "WAITING_GPU -> STARTING" not in result.stderr


@pytest.mark.timeout(60)
def test_a_control_key_variable_that_is_unset_is_refused_at_start(tmp_path: Path) -> None:
    launch = {"control_port": str(free_port()), "control_key_env": '"MS_TEST_UNSET_CONTROL_KEY"'}
    result = subprocess.run(
        [sys.executable, str(ROOT / "serve_llm_pipeline.py"), "--config", str(local_copy(tmp_path, launch=launch))],
        cwd=tmp_path, capture_output=True, text=True, timeout=50,
        env={k: v for k, v in os.environ.items() if k != "MS_TEST_UNSET_CONTROL_KEY"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "names the environment variable MS_TEST_UNSET_CONTROL_KEY, which is unset" in result.stderr
    assert "export MS_TEST_UNSET_CONTROL_KEY=" in result.stderr and "Traceback" not in result.stderr


class _FakeSupervisor:
    """Takes commands and never runs an engine: what FleetControl sees of a supervisor."""

    def __init__(self, spec: object) -> None:
        self.spec, self.commands = spec, []
        self.state = ServerState.READY

    def submit(self, command: object) -> None:
        self.commands.append(command)

    def run(self) -> ServerState:
        return self.state


def test_a_state_an_operator_asked_for_is_no_failure_until_the_server_crashes_or_is_ready_again(
    tmp_path: Path,
) -> None:
    fleet = load_fleet(local_copy(tmp_path))
    specs = [s for s in fleet.servers if s.name in NAMES]
    board = StatusBoard(tmp_path / "status.json", [ServerStatus(s.name, s.group, s.host, s.port) for s in specs], {})
    with ThreadPoolExecutor(3) as pool:
        control = FleetControl(specs, board, make_inventory(fleet.gpu_inventory), pool, _FakeSupervisor, fleet.launch)  # type: ignore[arg-type]
        control.start_all()
        assert not control.operator_asked("chat-1")
        control.command("chat-1", "restart")
        assert control.operator_asked("chat-1") and not control.operator_asked("chat-2")
        board.update("chat-1", restarts=1)  # it crashed after the operator's restart: that is a failure again
        assert not control.operator_asked("chat-1")
        control.command("chat-2", "drain")
        control.on_transition("chat-2", "DRAINING")
        assert control.operator_asked("chat-2")
        control.on_transition("chat-2", "READY")  # undrained: back in its own hands
        assert not control.operator_asked("chat-2")
        control.close()
        with pytest.raises(CommandRefused, match="the pipeline is stopping") as refused:
            control.command("chat-3", "restart")
        assert refused.value.status == 409
