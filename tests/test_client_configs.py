"""client_configs.py (the original's names) and `model-server probe`, against real simulated replicas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _client_sims import dead_ports, fleet_of, servers_toml, sims_running

import client_configs
from client_configs import INF, Server, get_all_latency, get_fastest_server, get_running_server_sizes

ROOT = Path(__file__).resolve().parent.parent


def _toml(groups: dict[str, tuple[str, list[int]]]) -> str:
    return servers_toml(groups, gpus=True)


@pytest.fixture(scope="module")
def fleet_sims():
    with sims_running(2) as chat, sims_running(1, embedding=True) as emb:
        chat[1].set_faults(slow_factor=20)
        yield chat, emb


def test_get_fastest_server_picks_the_fastest_answering_replica(fleet_sims) -> None:
    chat, emb = fleet_sims
    dead = dead_ports(1)
    fleet = fleet_of({"8": ("completion", [chat[1].port, dead[0], chat[0].port]), "7": ("embedding", [emb[0].port])})
    server, latency = get_fastest_server(initial_latency=5, model_size="8", fleet=fleet)
    assert isinstance(server, Server) and server.port == chat[0].port and server.model_size == "8"
    assert 0 < latency < 5
    server, latency = get_fastest_server(5, "7", test_embedding_servers=True, fleet=fleet)
    assert server is not None and server.port == emb[0].port
    assert get_fastest_server(5, "70", fleet=fleet) == (None, INF)


def test_get_fastest_server_returns_inf_when_nobody_answers_in_time(fleet_sims) -> None:
    chat, _ = fleet_sims
    fleet = fleet_of({"8": ("completion", [*dead_ports(2), chat[1].port])})  # the slow one misses a 1 ms bound
    assert get_fastest_server(initial_latency=0.001, model_size="8", fleet=fleet) == (None, INF)


def test_get_all_latency_and_running_sizes(fleet_sims) -> None:
    chat, emb = fleet_sims
    dead = dead_ports(1)
    fleet = fleet_of({"8": ("completion", [chat[0].port, dead[0]]), "7": ("embedding", [emb[0].port])})
    latencies = get_all_latency(initial_latency=5, fleet=fleet)
    by_port = {s.port: v for s, v in latencies.items()}
    assert set(by_port) == {chat[0].port, dead[0]}
    assert 0 < by_port[chat[0].port] < 5 and by_port[dead[0]] == INF
    embedding = get_all_latency(test_embedding_servers=True, initial_latency=5, fleet=fleet)
    assert [s.port for s in embedding] == [emb[0].port]
    assert get_running_server_sizes(fleet=fleet) == ["8", "7"]


def test_module_tables_come_from_model_server_config(tmp_path) -> None:
    table = tmp_path / "fleet.toml"
    table.write_text(_toml({"8": ("completion", [18001, 18002]), "7": ("embedding", [18003])}))
    code = (
        "import json, client_configs as c;"
        "print(json.dumps([c.Completion_Servers, c.Embedding_Servers, c.get_running_server_sizes()]))"
    )
    env = dict(os.environ, MODEL_SERVER_CONFIG=str(table))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    completion, embedding, sizes = json.loads(out.stdout)
    assert completion == [
        ["127.0.0.1", 18001, "8", "sim/test-model", "1"],
        ["127.0.0.1", 18002, "8", "sim/test-model", "2"],
    ]
    assert embedding == [["127.0.0.1", 18003, "7", "sim/test-model", "3"]] and sizes == ["8", "7"]
    assert client_configs.INF == 200


def _probe_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "model_server", "probe", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=dict(os.environ, COLUMNS="200"),
    )


def test_probe_command_prints_every_replica_and_fails_on_a_dead_group(fleet_sims, tmp_path) -> None:
    chat, emb = fleet_sims
    table = tmp_path / "fleet.toml"
    dead = dead_ports(2)
    table.write_text(
        _toml(
            {
                "8": ("completion", [chat[0].port, dead[0]]),
                "7": ("embedding", [emb[0].port]),
                "9": ("completion", [dead[1]]),
            }
        )
    )
    live = _probe_cli("--config", str(table), "--group", "8", "--group", "7", "--timeout-s", "5")
    assert live.returncode == 0, live.stdout + live.stderr
    assert "8-0" in live.stdout and "8-1" in live.stdout and "7-0" in live.stdout and "connection error" in live.stdout
    assert "group '8': 1/2" in live.stdout
    everything = _probe_cli("--config", str(table), "--timeout-s", "5")
    assert everything.returncode == 1 and "no live replica in group(s): 9" in everything.stdout
    unknown = _probe_cli("--config", str(table), "--group", "70")
    assert unknown.returncode == 2 and "'70'" in unknown.stderr and "'8'" in unknown.stderr
