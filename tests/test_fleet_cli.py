"""The fleet-wide CLI on two hosts simulated on one machine: `model-server status`, `drain`, `restart`, `start`,
`rollout`, each run as a subprocess.

Linux's loopback answers all of 127/8, so one table names two hosts, 127.0.0.2
(servers 8-0, 8-1) and 127.0.0.3 (8-2, 7-0); neither is "always local", so
each pipeline, started with ``--host-ip`` its host, takes only its own
servers. The two pipelines run from their own directories (the table's
relative status file and logs land there) with tables that differ only in
``bind_host``, so each engine listens on its host's address only, and both
serve the control API on their host's address and the same port. The key is
in the environment of the pipelines and of the CLI, never on a command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from _client_sims import rehost, servers_toml
from _pipeline_runs import FAST, Run, all_ready, free_port
from _waiting import wait_for

KEY_ENV = "MS_TEST_FLEET_KEY"
KEY = "fleet-cli-control-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
HOSTS = {"127.0.0.2": ["8-0", "8-1"], "127.0.0.3": ["8-2", "7-0"]}


def table(bind_host: str, control_port: int | None, ports: dict[str, int]) -> str:
    servers = servers_toml(
        {"8": ("completion", [ports["8-0"], ports["8-1"], ports["8-2"]]), "7": ("embedding", [ports["7-0"]])}
    )
    servers = rehost(servers, {name: host for host, names in HOSTS.items() for name in names})
    launch = {
        **FAST, "engine": '"sim"', "bind_host": json.dumps(bind_host), "status_file": '"run/status.json"',
        "log_dir": '"logs"', "drain_timeout_s": "20", "control_key_env": json.dumps(KEY_ENV),
    }  # fmt: skip
    if control_port is not None:
        launch["control_port"] = str(control_port)
    lines = "\n".join(f"{k} = {v}" for k, v in launch.items())
    return f'[launch]\n{lines}\n\n[gpu_inventory]\nsource = "simulated"\n{servers}'


@dataclass
class TwoHosts:
    root: Path
    config: Path  # the table the CLI reads (host 127.0.0.2's copy)
    port: int
    ports: dict[str, int]
    runs: dict[str, Run]
    dirs: dict[str, Path]

    def api(self, host: str) -> httpx.Client:
        return httpx.Client(base_url=f"http://{host}:{self.port}", headers=AUTH, timeout=10)

    def servers(self) -> dict[str, dict]:
        out = {}
        for host in HOSTS:
            with self.api(host) as api:
                out.update({s["name"]: s for s in api.get("/status").json()["servers"]})
        return out

    def ready(self, timeout_s: float = 45.0) -> dict[str, dict]:
        for host, names in HOSTS.items():
            self.runs[host].wait(all_ready(names), f"{', '.join(names)} READY on {host}", timeout_s)
        return self.servers()

    def events(self, host: str) -> list[dict]:
        path = self.dirs[host] / "run" / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def other_table(self, name: str, control_port: int | None) -> Path:
        path = self.root / name
        path.write_text(table("127.0.0.2", control_port, self.ports))
        return path


def cli(*args: str, cwd: Path, key: bool = True, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV} | {"COLUMNS": "200"}
    if key:
        env[KEY_ENV] = KEY
    done = subprocess.run(
        [sys.executable, "-m", "model_server", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout_s,
    )  # fmt: skip
    assert "Traceback" not in done.stderr and KEY not in done.stdout + done.stderr, done.stderr
    return done


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    root = tmp_path_factory.mktemp("two-hosts")
    port = free_port()
    ports = {name: free_port() for names in HOSTS.values() for name in names}
    runs: dict[str, Run] = {}
    dirs: dict[str, Path] = {}
    try:
        for host in HOSTS:
            dirs[host] = root / host
            dirs[host].mkdir()
            config = dirs[host] / "fleet.toml"
            config.write_text(table(host, port, ports))
            runs[host] = Run(config, dirs[host], ("--host-ip", host), env={KEY_ENV: KEY})
        two = TwoHosts(root, dirs["127.0.0.2"] / "fleet.toml", port, ports, runs, dirs)
        two.ready(60)
        yield two
        for run in runs.values():
            assert run.stop() == 0, run.output()
            assert "Traceback" not in run.output(tail=False) and KEY not in run.output(tail=False)
    finally:
        for run in runs.values():
            run.cleanup()


def row(stdout: str, name: str) -> str:
    return next(line for line in stdout.splitlines() if f" {name} " in line)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_status_shows_both_hosts_from_their_control_apis(fleet: TwoHosts) -> None:
    servers = fleet.servers()
    done = cli("status", "--config", str(fleet.config), "--timeout-s", "5", cwd=fleet.root)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for host, names in HOSTS.items():
        assert f"host {host}: control API http://{host}:{fleet.port}/status (pipeline started" in out, out
        for name in names:
            line = row(out, name)
            assert f"{host}:{fleet.ports[name]}" in line and "READY" in line and str(servers[name]["pid"]) in line
            assert "up" in line
    assert "4 up, 0 down" in out and "4 servers on 2 host(s)" in out
    as_json = cli("status", "--config", str(fleet.config), "--json", cwd=fleet.root)
    view = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and [(h["host"], h["source"], h["why"]) for h in view["hosts"]] == [
        ("127.0.0.2", "control API", ""),
        ("127.0.0.3", "control API", ""),
    ]
    assert {s["name"]: s["recorded"]["pid"] for h in view["hosts"] for s in h["servers"]} == {
        n: s["pid"] for n, s in servers.items()
    }


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_status_falls_back_host_by_host_and_says_why(fleet: TwoHosts) -> None:
    """A table whose control_port nobody serves: this machine's host (127.0.0.3 here, by --host-ip) shows its status
    file; the other, its probes only."""
    unserved = free_port()
    config = fleet.other_table("unserved.toml", unserved)
    done = cli(
        "status", "--config", str(config), "--host-ip", "127.0.0.3", "--timeout-s", "5", cwd=fleet.dirs["127.0.0.3"]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert (
        f"host 127.0.0.2: probes only; control API not used: nothing listens at http://127.0.0.2:{unserved}/status "
        f"(connection refused)" in out
    ), out
    assert (
        f"host 127.0.0.3: status file + probes; control API not used: nothing listens at http://127.0.0.3:{unserved}"
        in out
    )
    assert f"pipeline pid {fleet.runs['127.0.0.3'].proc.pid}: running" in out
    assert "READY" in row(out, "8-2") and "READY" in row(out, "7-0") and "READY" not in row(out, "8-0")
    assert "4 up, 0 down" in out
    no_port = cli("status", "--config", str(fleet.other_table("no-port.toml", None)), "--json", cwd=fleet.root)
    view = json.loads(no_port.stdout)
    assert [(h["source"], h["why"]) for h in view["hosts"]] == [
        ("probes only", "launch.control_port is not set in the table"),
    ] * 2


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_restart_drain_and_start_through_the_cli(fleet: TwoHosts) -> None:
    before = fleet.ready()
    args = ("--config", str(fleet.config))
    restarted = cli("restart", "7-0", *args, cwd=fleet.root)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    new_pid = fleet.servers()["7-0"]["pid"]
    assert new_pid != before["7-0"]["pid"]
    assert f"7-0 on 127.0.0.3: restart accepted (it was READY, pid {before['7-0']['pid']})" in restarted.stdout
    assert f"7-0: READY again, pid {before['7-0']['pid']} -> {new_pid}" in restarted.stdout
    assert "  7-0: DRAINING" in restarted.stdout  # progress, as it happens

    drained = cli("drain", "8-1", *args, cwd=fleet.root)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert "8-1: STOPPED after its drain" in drained.stdout and "model-server start 8-1" in drained.stdout
    refused = cli("restart", "8-1", *args, cwd=fleet.root)
    assert refused.returncode == 2 and "refused POST /servers/8-1/restart (409)" in refused.stderr, refused.stderr
    assert "it is STOPPED" in refused.stderr
    not_ready = cli("rollout", "8", *args, cwd=fleet.root)
    assert not_ready.returncode == 2, not_ready.stdout + not_ready.stderr
    assert "on host 127.0.0.2, 8-1 is STOPPED. Nothing was restarted" in not_ready.stderr
    started = cli("start", "8-1", *args, cwd=fleet.root)
    assert started.returncode == 0 and "8-1: READY, pid" in started.stdout, started.stdout + started.stderr

    impatient = cli("restart", "8-0", *args, "--timeout-s", "0.5", cwd=fleet.root)
    assert impatient.returncode == 1, impatient.stdout + impatient.stderr
    assert "timed out waiting for 8-0 to be READY again with a new pid" in impatient.stderr
    wait_for(lambda: fleet.servers()["8-0"]["pid"] != before["8-0"]["pid"], 30, "8-0 restarted all the same")
    after = fleet.ready()
    assert after["8-2"]["pid"] == before["8-2"]["pid"]  # nothing else touched


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_rollout_of_a_group_on_two_hosts_goes_one_host_after_another(fleet: TwoHosts) -> None:
    before = fleet.ready()
    done = cli("rollout", "8", "--config", str(fleet.config), cwd=fleet.root, timeout_s=55)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (
        "rollout of group 8: 3 server(s) on 2 host(s), one at a time: 127.0.0.2 (8-0, 8-1); then 127.0.0.3 (8-2)"
    )
    marks = [
        "host 127.0.0.2: rollout 8-", "  8-0: restarting (1/2)", "  8-0: READY again", "  8-1: restarting (2/2)",
        "  8-1: READY again", "host 127.0.0.2: done", "host 127.0.0.3: rollout 8-", "  8-2: restarting (1/1)",
        "  8-2: READY again", "host 127.0.0.3: done", "rollout of group 8 done: 3 server(s) restarted on 2 host(s)",
    ]  # fmt: skip
    at = [next(i for i, line in enumerate(lines) if line.startswith(mark)) for mark in marks]
    assert at == sorted(at), done.stdout
    after = fleet.servers()
    for name in ("8-0", "8-1", "8-2"):
        assert after[name]["pid"] != before[name]["pid"] and after[name]["state"] == "READY"
    assert after["7-0"]["pid"] == before["7-0"]["pid"]
    # the second host's first drain began after the first host's last server was READY again
    back = max(e["time"] for e in fleet.events("127.0.0.2") if e["server"] == "8-1" and e["to"] == "READY")
    drained = [e["time"] for e in fleet.events("127.0.0.3") if e["server"] == "8-2" and e["to"] == "DRAINING"]
    assert len(drained) == 1 and drained[0] >= back


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bad_input_exits_2_with_one_paragraph_naming_the_fix(fleet: TwoHosts) -> None:
    args = ("--config", str(fleet.config))
    cases = [
        (("restart", "nope", *args), True, "no server is named 'nope'. The servers are: 8-0, 8-1, 8-2, 7-0"),
        (("rollout", "9", *args), True, "has no group '9'. Its groups are: '8', '7'"),
        (("restart", "8-0", *args), False, f"names the environment variable {KEY_ENV}, which is unset or empty"),
        (
            ("rollout", "8", "--config", str(fleet.other_table("no-port2.toml", None))),
            True,
            "field 'launch.control_port' is not set",
        ),
        (
            ("restart", "8-0", "--config", str(fleet.other_table("unreachable.toml", free_port()))),
            True,
            "the control API of host 127.0.0.2 cannot be read: nothing listens at",
        ),
    ]
    before = {n: s["pid"] for n, s in fleet.servers().items()}
    for argv, key, says in cases:
        done = cli(*argv, cwd=fleet.root, key=key)
        assert done.returncode == 2, (argv, done.stdout, done.stderr)
        assert says in done.stderr and done.stderr.count("\n") == 1, (argv, done.stderr)
    bad = cli("drain", "8-0", "--then", "explode", *args, cwd=fleet.root, key=True)  # typer checks it: its box
    said = " ".join(bad.stderr.replace("│", " ").split())
    assert (
        bad.returncode == 2
        and "Invalid value for '--then': Value error, 'explode' is not one of 'stop', 'restart'" in said
    )
    assert {n: s["pid"] for n, s in fleet.servers().items()} == before


def test_a_refused_key_names_its_variable_and_only_silence_asks_to_start_the_pipeline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No subprocess: the control API's answers are faked at httpx."""
    from model_server.cli import fleet as cf
    from model_server.config import parse_fleet
    from model_server.errors import LaunchError
    from model_server.launcher.redact import Secret

    ports = {"8-0": 1001, "8-1": 1002, "8-2": 1003, "7-0": 1004}
    target = cf.ControlTarget(parse_fleet(table("127.0.0.2", 9100, ports), source="<t>"), 9100, Secret("wrong"))
    refusal = httpx.Response(401, json={"error": "wrong key"})
    monkeypatch.setattr(httpx, "get", lambda *_a, **_k: refusal)
    monkeypatch.setattr(httpx, "post", lambda *_a, **_k: refusal)
    with pytest.raises(LaunchError) as read:
        cf.first_status(target, "127.0.0.2")
    assert f"The key in ${KEY_ENV} here is not that pipeline's" in str(read.value)
    assert "Start the pipeline" not in str(read.value)
    with pytest.raises(LaunchError) as sent:
        cf.post(target, "127.0.0.2", "/servers/8-0/restart")
    assert f"refused POST /servers/8-0/restart (401): wrong key (the key sent is the one in ${KEY_ENV} here)" in str(
        sent.value
    )

    def refused(*_a: object, **_k: object) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(httpx, "get", refused)
    with pytest.raises(LaunchError) as silent:
        cf.first_status(target, "127.0.0.2")
    assert "nothing listens at" in str(silent.value) and "Start the pipeline there" in str(silent.value)
