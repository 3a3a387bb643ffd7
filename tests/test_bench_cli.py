"""`model-server bench` end to end: real CLI processes against simulated servers on loopback."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_server.sim.process import SimProcess

FAST = ("--ttft-ms", "2", "--tpot-ms", "0.5", "--ttft-per-prompt-token-ms", "0")


def _bench(*args: str, timeout_s: float = 90.0) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "model_server", "bench", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)


URL = ["--url", "http://127.0.0.1:9/v1"]  # nothing listens there: every run below stops before it sends
OPEN = [*URL, "--model", "m", "--rate", "5", "--requests", "5"]  # a complete open-loop run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "10", "--requests", "5"], "give the target: --group NAME"),
        ([*URL, "--rate", "10", "--requests", "5"], "--url needs --model NAME"),
        ([*URL, "--model", "m", "--requests", "5"], "give the load: --rate R"),
        ([*OPEN, "--concurrency", "2"], "not both"),
        ([*OPEN, "--prompt-len", "0"], "--prompt-len is '0'"),
        ([*OPEN, "--fault", "soon kill x"], "not a duration"),
        ([*OPEN, "--fault", "1s kill other"], "The servers are: 127.0.0.1:9"),
        ([*OPEN, "--arrival", "trace"], "needs --trace FILE"),
        ([*OPEN, "--api-key-env", "MS_BENCH_UNSET_KEY"], "MS_BENCH_UNSET_KEY, which is unset"),
    ],
)
def test_bad_options_exit_2_with_one_clear_paragraph(args, message):
    done = _bench(*args, timeout_s=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(90)
def test_url_run_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    with SimProcess(args=FAST) as sim:
        done = _bench(
            "--url",
            sim.base_url,
            "--model",
            sim.model_name,
            "--transport",
            "raw",
            "--rate",
            "40",
            "--requests",
            "60",
            "--prompt-len",
            "8:16",
            "--output-len",
            "4:8",
            "--slo-ttft",
            "5",
            "--seed",
            "3",
            "--fault",
            f"0.5s 500s 127.0.0.1:{sim.port} 1 for 0.8s",
            "--output",
            str(out),
            "--plot",
            str(png),
        )
        assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["sent"] == 60 and result["ok"] + result["failed"] == 60
    assert result["failed"] >= 1 and any("500" in e for e in result["errors"])
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        assert {"p50", "p90", "p99", "max"} <= set(result[key]) and result[key]["p50"] > 0
    assert result["achieved_rate"] == pytest.approx(40, rel=0.25)
    assert [f["action"] for f in result["faults"]] == ["errors", "errors"] and all(f["ok"] for f in result["faults"])
    assert result["run"]["mode"] == "open" and result["run"]["transport"] == "raw"
    assert result["slo"]["attained"] == result["ok"]  # a 5 s TTFT objective every answer meets
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "TTFT" in done.stdout and "requests: ok" in done.stdout


def _fleet(path: Path, sims: list[SimProcess]) -> Path:
    entries = "".join(
        f'\n[[servers]]\nname = "r{i}"\ngroup = "8"\nkind = "completion"\nhost = "127.0.0.1"\nport = {s.port}\n'
        f'model = "{s.model_path}"\nserved_model_name = "{s.model_name}"\n'
        for i, s in enumerate(sims)
    )
    path.write_text("[client]\ninitial_latency_s = 2.0\nrequest_timeout_floor_s = 5\n" + entries, encoding="utf-8")
    return path


@contextlib.contextmanager
def _two_replicas(tmp_path: Path, args: tuple[str, ...]) -> Iterator[tuple[Path, SimProcess, SimProcess]]:
    """A fleet table of two simulated replicas of group "8" (model "chat"), and the replicas."""
    with SimProcess(served_model_name="chat", args=args) as a, SimProcess(served_model_name="chat", args=args) as b:
        yield _fleet(tmp_path / "fleet.toml", [a, b]), a, b


def _group_bench(fleet: Path, *args: str) -> subprocess.CompletedProcess:
    """``model-server bench`` of group 8 at concurrency 4."""
    return _bench("--config", str(fleet), "--group", "8", "--concurrency", "4", *args)


@pytest.mark.timeout(90)
def test_group_run_through_model_server(tmp_path):
    out = tmp_path / "g.json"
    with _two_replicas(tmp_path, FAST) as (fleet, a, b):
        done = _group_bench(fleet, "--requests", "40", "--output-len", "6", "--output", str(out))
        assert done.returncode == 0, done.stderr
        served = sum(sim.stats()["by_route"].get("/v1/chat/completions", 0) for sim in (a, b))
    result = json.loads(out.read_text())
    assert (result["ok"], result["failed"]) == (40, 0), result["errors"]
    assert result["run"]["mode"] == "closed" and result["run"]["concurrency"] == 4
    assert result["tpot_s"]["count"] == 40 and result["e2e_s"]["p50"] > 0
    assert served >= 40


# ~0.15 s an answer: streams in flight at a kill
PACED = ("--ttft-ms", "5", "--tpot-ms", "5", "--ttft-per-prompt-token-ms", "0")


@pytest.mark.timeout(120)
def test_a_kill_keeps_client_warnings_off_the_terminal_and_sums_them_up(tmp_path):
    out, log = tmp_path / "k.json", tmp_path / "bench.log"
    with _two_replicas(tmp_path, PACED) as (fleet, a, _):
        done = _group_bench(
            fleet, "--duration", "4", "--output-len", "24", "--fault", "1.5s kill r0", "--output", str(out),
            "--log-file", str(log),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert a.wait_exit(10) is not None  # the kill happened
    assert "WARNING" not in done.stdout + done.stderr
    result = json.loads(out.read_text())
    client = result["client"]
    assert client["failovers"].get("r0", 0) + client["breaker_changes"].get("r0", 0) >= 1, (client, log.read_text())
    kill = result["faults"][0]
    assert kill["spec"] == "1.5s kill r0" and kill["ok"] and kill["client"]["seen"]
    lines = done.stdout.splitlines()
    fault_line = lines.index(next(x for x in lines if x.startswith("fault 1.5s kill r0")))
    assert lines[fault_line + 1].startswith("  client saw: ")
    assert any(x.startswith("client: failovers ") and "r0" in x for x in lines)
    assert f"log: {log} (" in done.stdout
    text = log.read_text()
    assert "WARNING model_server.client: " in text and "fault 1.5s kill r0" in text


@pytest.mark.timeout(90)
def test_verbose_puts_the_client_warnings_back_on_the_terminal(tmp_path):
    log = tmp_path / "bench.log"
    with _two_replicas(tmp_path, PACED) as (fleet, _, _):
        done = _group_bench(
            fleet, "--duration", "2", "--output-len", "8", "--fault", "0.5s 500s r0 1 for 1s",
            "--fault", "0.5s 500s r1 1 for 1s", "--log-file", str(log), "--verbose",
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "WARNING model_server.client: " in done.stderr
    assert "WARNING model_server.client: " in log.read_text()
