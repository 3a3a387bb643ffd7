"""The fleet's view, host by host: which source each host gets and how the answers merge (no socket), and the
control API's refusals as :func:`~model_server.common.control_status.get_control_status` reports them (the app in process)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _client_sims import rehost, servers_toml
from fastapi.testclient import TestClient

from model_server.common.control_status import ControlAnswer, Recorded, get_control_status
from model_server.config import LaunchPolicy, parse_fleet
from model_server.launcher import fleet_view as fv
from model_server.launcher.control_api import build_app
from model_server.launcher.events_file import EventLog
from model_server.launcher.fleet_control import FleetControl
from model_server.launcher.gpu import make_inventory
from model_server.launcher.metrics import PipelineMetrics
from model_server.launcher.redact import Secret
from model_server.launcher.status_file import ServerStatus, StatusBoard, StatusFile

KEY = "fleet-view-key-0123456789abcdef"


def two_hosts(control: str = 'control_port = 9100\ncontrol_key_env = "MS_TEST_VIEW_KEY"\n'):
    text = servers_toml({"8": ("completion", [1001, 1002]), "7": ("embedding", [1003])})
    text = rehost(text, {"8-1": "10.0.0.2", "7-0": "10.0.0.2"})
    sims = '[gpu_inventory]\nsource = "simulated"\n'
    return parse_fleet(f"[launch]\n{control}\n{sims}{text}", source="<two hosts>")


API_STATUS = {
    "started": 1000.0,
    "servers": [
        {"name": "8-1", "state": "READY", "pid": 42, "restarts": 1, "since": 1001.0, "last_error": ""},
        {"name": "7-0", "state": "DRAINING", "pid": 43, "restarts": 0, "since": 1002.0, "last_error": "x"},
    ],
    "rollouts": {"8": {"id": "8-1", "state": "running", "current": "8-1"}},
}


def test_hosts_of_keeps_the_order_of_the_table() -> None:
    fleet = two_hosts()
    assert {h: [s.name for s in v] for h, v in fv.hosts_of(fleet.servers).items()} == {
        "127.0.0.1": ["8-0"],
        "10.0.0.2": ["8-1", "7-0"],
    }


def test_a_host_whose_control_api_answered_takes_its_states_and_rollouts() -> None:
    specs = fv.hosts_of(two_hosts().servers)["10.0.0.2"]
    answer = ControlAnswer("http://10.0.0.2:9100/status", API_STATUS)
    probes = {"8-1": fv.Live(True), "7-0": fv.Live(False, "status 503")}
    host = fv.merge_host("10.0.0.2", specs, answer, None, probes)
    assert host.source == fv.SOURCE_API and host.why == "" and host.control_url == answer.url
    assert host.servers[0].recorded == Recorded("READY", 42, 1, 1001.0, "")
    assert host.servers[1].recorded.state == "DRAINING" and not host.servers[1].up
    assert host.rollouts == {"8": API_STATUS["rollouts"]["8"]} and host.pipeline == {"started": 1000.0}


def test_the_local_host_falls_back_to_the_status_file_and_another_host_to_probes_only(tmp_path: Path) -> None:
    fleet = two_hosts()
    by_host = fv.hosts_of(fleet.servers)
    refused = ControlAnswer("http://127.0.0.1:9100/status", problem="nothing listens at ...")
    entries = {"8-0": ServerStatus("8-0", "8", "127.0.0.1", 1001, state="STARTING", pid=7, restarts=2)}
    status_file = StatusFile(tmp_path / "status.json", True, {"pid": 99}, entries, ("servers['x'].pid is 'a'",))
    local = fv.merge_host("127.0.0.1", by_host["127.0.0.1"], refused, status_file, {}, pipeline_running=False)
    assert local.source == fv.SOURCE_FILE and local.why == "nothing listens at ..."
    assert local.servers[0].recorded == Recorded("STARTING", 7, 2, entries["8-0"].since, "")
    assert local.servers[0].live is None and not local.servers[0].up  # not probed: its recorded state decides
    assert local.pipeline == {"pid": 99, "running": False, "file": str(status_file.path)}
    assert local.status_file_problems == ("servers['x'].pid is 'a'",)
    other = fv.merge_host("10.0.0.2", by_host["10.0.0.2"], refused, None, {"8-1": fv.Live(True)})
    assert other.source == fv.SOURCE_PROBES and other.servers[0].recorded is None and other.servers[0].up
    no_file = fv.merge_host("127.0.0.1", by_host["127.0.0.1"], None, StatusFile(tmp_path / "none.json"), {})
    assert no_file.source == fv.SOURCE_PROBES
    assert (
        no_file.why
        == f"launch.control_port is not set in the table; this machine has no status file at {tmp_path / 'none.json'}"
    )


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ([], 'no "servers" list'),
        ({"servers": {}}, 'no "servers" list'),
        ({"servers": [{"name": "a"}]}, "servers[0] has no name and state"),
    ],
)
def test_an_answer_that_is_not_a_status_is_a_reason_to_fall_back(data: object, problem: str) -> None:
    specs = fv.hosts_of(two_hosts().servers)["10.0.0.2"]
    host = fv.merge_host("10.0.0.2", specs, ControlAnswer("u", data), None, {})  # type: ignore[arg-type]
    assert host.source == fv.SOURCE_PROBES and problem in host.why


def test_read_fleet_asks_every_host_and_probes_every_server_concurrently_without_sockets(tmp_path: Path) -> None:
    fleet = two_hosts(f'status_file = "{tmp_path / "status.json"}"\n')  # no control_port: every host falls back
    probed: list[str] = []

    def probe(spec, _timeout_s: float) -> fv.Live:
        probed.append(spec.name)
        return fv.Live(spec.name != "7-0", "" if spec.name != "7-0" else "connection refused")

    view = fv.read_fleet(fleet, identities=frozenset({"127.0.0.1"}), probe_one=probe)
    assert sorted(probed) == ["7-0", "8-0", "8-1"]
    assert [(h.host, h.source) for h in view.hosts] == [("127.0.0.1", fv.SOURCE_PROBES), ("10.0.0.2", fv.SOURCE_PROBES)]
    assert [s.name for s in view.down] == ["7-0"] and len(view.servers) == 3
    assert view.status_file == str(tmp_path / "status.json")  # a host of the table is this machine
    elsewhere = fv.read_fleet(fleet, identities=frozenset({"192.0.2.1"}), probe_one=probe)
    assert elsewhere.status_file is None and {h.source for h in elsewhere.hosts} == {fv.SOURCE_PROBES}
    data = view.as_dict()
    assert data["hosts"][1]["servers"][1]["live"] == {"ok": False, "why": "connection refused"}
    assert "launch.control_port is not set" in data["hosts"][1]["why"]


# ---- the control API's refusals, as the view reports them (in process: the client is not 127.0.0.1) --------


@pytest.fixture
def app_client(tmp_path: Path):
    fleet = two_hosts()
    specs = [s for s in fleet.servers if s.host == "10.0.0.2"]
    board = StatusBoard(tmp_path / "status.json", [ServerStatus(s.name, s.group, s.host, s.port) for s in specs], {})
    with ThreadPoolExecutor(1) as pool:
        control = FleetControl(specs, board, make_inventory(fleet.gpu_inventory), pool, lambda _s: None, fleet.launch)  # type: ignore[arg-type,return-value]
        metrics = PipelineMetrics(control.statuses, control.read_gpus)
        yield fleet, TestClient(build_app(control, EventLog(), metrics, Secret(KEY), fleet))


@pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument with the TestClient")
def test_a_read_without_the_key_says_which_variable_to_export(app_client) -> None:
    fleet, client = app_client
    answer = get_control_status("10.0.0.2", fleet.launch, None, client=client)
    assert answer.data is None and "answered 401" in answer.problem
    assert "Export MS_TEST_VIEW_KEY=<the pipelines' control key> here" in answer.problem
    wrong = get_control_status("10.0.0.2", fleet.launch, "wrong", client=client)
    assert "is not that pipeline's" in wrong.problem and KEY not in wrong.problem
    right = get_control_status("10.0.0.2", fleet.launch, KEY, client=client)
    assert right.problem == "" and [s["name"] for s in right.data["servers"]] == ["8-1", "7-0"]
    assert right.data["rollouts"] == {}
    no_key_env = get_control_status("10.0.0.2", LaunchPolicy(control_port=9100), None, client=client)
    assert "Export MODEL_SERVER_CONTROL_KEY=<the pipelines' control key> here" in no_key_env.problem  # the default


def test_the_key_comes_from_the_variable_the_table_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers (CLI, dashboard, clients, gateways) take the key if it is there, and do without it if not."""
    policy = two_hosts().launch
    monkeypatch.delenv("MS_TEST_VIEW_KEY", raising=False)
    assert policy.control_key(required=False) is None
    monkeypatch.setenv("MS_TEST_VIEW_KEY", "")
    assert policy.control_key(required=False) is None
    monkeypatch.setenv("MS_TEST_VIEW_KEY", KEY)
    assert policy.control_key(required=False) == KEY
    monkeypatch.delenv("MODEL_SERVER_CONTROL_KEY", raising=False)
    assert LaunchPolicy().control_key(required=False) is None
    monkeypatch.setenv("MODEL_SERVER_CONTROL_KEY", KEY)  # the default variable, when the table names none
    assert LaunchPolicy().control_key(required=False) == KEY
