"""The embedded default: which fleet table runs with no --config (model_server/common/fleet_choice.py).

The rule is a pure function, tested on every combination of facts; the facts
are read from a real machine in a few in-process tests; and two real-process
tests run ``python serve_llm_pipeline.py`` with no flags: here (no GPU) it
brings up the simulated fleet and stops cleanly on SIGTERM, and with a fake
NVML that sees a GPU it refuses, naming both fixes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from _waiting import wait_for

from model_server.common import fleet_choice
from model_server.common.fleet_choice import (
    FleetFacts,
    Source,
    choose_fleet,
    default_fleet_path,
    gather_facts,
    nvml_sees_gpu,
)
from model_server.config import CONFIG_ENV, load_fleet

ROOT = Path(__file__).resolve().parent.parent
TABLE = Path("configs") / "servers.toml"
LOCAL = Path("configs") / "local.toml"


def facts(**kw) -> FleetFacts:
    base = {"table": TABLE, "simulated": LOCAL, "table_hosts": ("192.0.2.11",), "this_machine": ("10.1.2.3", "box")}
    return FleetFacts(**{**base, **kw})


# ---- the rule (pure) ----------------------------------------------------------------


@pytest.mark.parametrize("for_client", [False, True])
@pytest.mark.parametrize("in_table", [False, True])
@pytest.mark.parametrize("gpu", [False, True])
def test_a_named_table_wins_over_the_machine(gpu, in_table, for_client):
    given = choose_fleet(
        facts(config=Path("my.toml"), env_config="env.toml", host_in_table=in_table, gpu_present=gpu),
        for_client=for_client,
    )
    assert (given.path, given.source) == (Path("my.toml"), Source.GIVEN)
    env = choose_fleet(facts(env_config="env.toml", host_in_table=in_table, gpu_present=gpu), for_client=for_client)
    assert (env.path, env.source) == (Path("env.toml"), Source.ENV)


@pytest.mark.parametrize("for_client", [False, True])
@pytest.mark.parametrize("gpu", [False, True])
def test_a_host_of_the_table_runs_the_table(gpu, for_client):
    choice = choose_fleet(facts(host_in_table=True, gpu_present=gpu), for_client=for_client)
    assert (choice.path, choice.source) == (TABLE, Source.TABLE)


@pytest.mark.parametrize("for_client", [False, True])
def test_no_gpu_and_not_in_the_table_runs_the_simulated_fleet_and_says_so(for_client):
    choice = choose_fleet(facts(), for_client=for_client)
    assert (choice.path, choice.source, choice.refused) == (LOCAL, Source.SIMULATED, False)
    assert choice.message == (
        "no GPU here and this host is not in configs/servers.toml: running the simulated fleet configs/local.toml; "
        "pass --config to choose"
    )


def test_a_gpu_machine_not_in_the_table_is_refused_with_both_fixes():
    choice = choose_fleet(facts(gpu_present=True))
    assert choice.refused and choice.source is Source.REFUSED and choice.path is None
    m = choice.message
    assert m.startswith("configs/servers.toml: this machine has an NVIDIA GPU but is not a host of this table")
    assert "The table's hosts are 192.0.2.11; this machine is 10.1.2.3, box" in m
    assert "put this machine's address in the 'host'" in m and "--host-ip" in m  # fix 1: the table
    assert (
        f"--config FILE or ${CONFIG_ENV}" in m and "--config configs/local.toml for the simulated fleet" in m
    )  # fix 2


def test_the_client_on_a_gpu_machine_not_in_the_table_still_reads_the_table():
    choice = choose_fleet(facts(gpu_present=True), for_client=True)
    assert (choice.path, choice.source) == (TABLE, Source.TABLE) and CONFIG_ENV in choice.message


# ---- the facts of a machine (in process) ---------------------------------------------


def _table_in(directory: Path, host: str) -> Path:
    text = (ROOT / "configs" / "servers.toml").read_text(encoding="utf-8").replace('"192.0.2.11"', f'"{host}"')
    (directory / "configs").mkdir()
    (directory / "configs" / "servers.toml").write_text(text, encoding="utf-8")
    return directory / "configs" / "servers.toml"


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(fleet_choice, "nvml_sees_gpu", lambda: False)


def test_a_named_table_does_not_look_at_the_machine(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("looked at the machine")

    monkeypatch.setattr(fleet_choice, "nvml_sees_gpu", boom)
    monkeypatch.setattr(fleet_choice, "_table_facts", boom)
    assert gather_facts("x.toml", environ={}) == FleetFacts(config=Path("x.toml"))
    assert gather_facts(None, environ={CONFIG_ENV: "e.toml"}) == FleetFacts(env_config="e.toml")


def test_facts_come_from_the_table_in_the_current_directory(tmp_path, monkeypatch, no_gpu):
    monkeypatch.chdir(tmp_path)
    _table_in(tmp_path, "192.0.2.200")
    f = gather_facts(None, environ={CONFIG_ENV: ""})  # an empty variable is no table
    assert (f.table, f.simulated, f.host_in_table, f.gpu_present) == (TABLE, LOCAL, False, False)
    assert f.table_hosts == ("192.0.2.200",) and f.this_machine
    assert gather_facts(None, ["192.0.2.200"], environ={}).host_in_table  # --host-ip counts


def test_loopback_hosts_make_this_machine_a_host(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _table_in(tmp_path, "127.0.0.1")
    monkeypatch.setattr(fleet_choice, "nvml_sees_gpu", lambda: pytest.fail("a host of the table needs no GPU check"))
    assert choose_fleet(gather_facts(None, environ={})).source is Source.TABLE


def test_a_broken_default_table_is_reported_not_skipped(tmp_path, monkeypatch, no_gpu):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "servers.toml").write_text("[[servers]\n", encoding="utf-8")
    with pytest.raises(Exception, match="malformed TOML"):
        gather_facts(None, environ={})


def test_nvml_seen_through_the_gpu_inventory(monkeypatch):
    import types

    class Mem:
        used, total = 0, 80 * 1024**3

    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None
    fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetCount = lambda: 1
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetMemoryInfo = lambda h: Mem()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    nvml_sees_gpu.cache_clear()
    try:
        assert nvml_sees_gpu() is True
        nvml_sees_gpu.cache_clear()
        fake.nvmlDeviceGetCount = lambda: 0
        assert nvml_sees_gpu() is False
        nvml_sees_gpu.cache_clear()

        def fail() -> None:
            raise RuntimeError("NVML Shared Library Not Found")

        fake.nvmlInit = fail
        assert nvml_sees_gpu() is False
    finally:
        nvml_sees_gpu.cache_clear()


def test_default_fleet_path_follows_the_rule_and_logs_once_at_debug(tmp_path, monkeypatch, no_gpu, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    _table_in(tmp_path, "192.0.2.200")
    monkeypatch.setattr(fleet_choice, "_logged", set())
    with caplog.at_level(logging.DEBUG, logger="model_server.common.fleet_choice"):
        assert default_fleet_path() == LOCAL
        assert default_fleet_path() == LOCAL
        monkeypatch.setenv(CONFIG_ENV, "mine.toml")
        assert default_fleet_path() == Path("mine.toml")
    lines = [r for r in caplog.records if r.name == "model_server.common.fleet_choice"]
    assert [r.levelno for r in lines] == [logging.DEBUG, logging.DEBUG]
    assert "running the simulated fleet configs/local.toml" in lines[0].getMessage()
    assert "mine.toml" in lines[1].getMessage()


# ---- `python serve_llm_pipeline.py` with no flags (real processes) ---------------------


def _env(first_on_path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    if first_on_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(first_on_path), env.get("PYTHONPATH", "")) if p)
    return env


def _this_machine_serves_the_default_table() -> bool:
    return gather_facts(None, environ={}).host_in_table


def _port_busy(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


FAKE_NVML = """
class _Mem:
    used = 0
    total = 80 * 1024 ** 3

def nvmlInit():
    pass

def nvmlShutdown():
    pass

def nvmlDeviceGetCount():
    return 1

def nvmlDeviceGetHandleByIndex(i):
    return i

def nvmlDeviceGetMemoryInfo(handle):
    return _Mem()
"""


@pytest.mark.timeout(60)
def test_no_flags_on_a_gpu_machine_not_in_the_table_is_refused(tmp_path):
    if _this_machine_serves_the_default_table():
        pytest.skip("this machine is a host of configs/servers.toml: no refusal to see")
    fake = tmp_path / "fake_nvml"
    fake.mkdir()
    (fake / "pynvml.py").write_text(FAKE_NVML, encoding="utf-8")  # a simulated GPU inventory: NVML sees one GPU
    done = subprocess.run(
        [sys.executable, str(ROOT / "serve_llm_pipeline.py")], cwd=tmp_path, env=_env(first_on_path=fake),
        capture_output=True, text=True, timeout=50,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    err = done.stderr
    assert "Traceback" not in err and "simulated fleet configs/local.toml;" not in err
    assert "this machine has an NVIDIA GPU but is not a host of this table" in err
    assert "--host-ip" in err and "--config" in err and "local.toml for the simulated fleet" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "logs").exists()  # refused before anything started


def _alive(pids: set[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _status(path: Path, pid: int) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("servers", {}) if data.get("pipeline", {}).get("pid") == pid else {}


def _readme_quick_start_call() -> list[str]:
    """The `python -c ...` client call that README.md's quick start tells a new user to run."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = text[text.index("## Quick start") : text.index("## Install")]
    line = next(text for text in quick.splitlines() if text.startswith("python -c "))
    argv = shlex.split(line)
    return [sys.executable, *argv[1:]]


def _readme_gateway_commands() -> tuple[list[str], list[str]]:
    """README.md's `model-server gateway` command (the table made absolute) and its openai SDK call through it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("<!-- gateway:commands -->") : text.index("## The fault matrix")]
    start = shlex.split(
        next(ln for ln in section.splitlines() if ln.startswith("model-server gateway ")), comments=True
    )
    call = shlex.split(next(ln for ln in section.splitlines() if ln.startswith("python -c ")))
    table = str(ROOT / "configs" / "local.toml")
    return [sys.executable, "-m", "model_server", *[table if a == "configs/local.toml" else a for a in start[1:]]], [
        sys.executable,
        *call[1:],
    ]


def _gateway_serves(port: int, workers: int) -> bool:
    """The gateway at ``port`` answers and lists ``workers`` healthy workers."""
    try:
        listed = httpx.get(f"http://127.0.0.1:{port}/workers", timeout=2).json()["workers"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return sum(bool(w.get("is_healthy")) for w in listed) == workers


# README's gateway steps run inside the quick-start test (on its fleet), where the gateway extra is installed or
# required; elsewhere test_the_readme_gateway_steps_run_here says, skipped, that they were not run.
README_GATEWAY_STEPS = (
    importlib.util.find_spec("sglang_router") is not None or os.environ.get("MODEL_SERVER_REQUIRE_GATEWAY") == "1"
)
NOT_RUN = "sglang_router is not importable: README's gateway steps were not run"


def test_the_readme_gateway_steps_run_here() -> None:
    start, call = _readme_gateway_commands()  # README has them, whether or not they run here
    assert start[3] == "gateway" and call[1] == "-c", (start, call)
    if not README_GATEWAY_STEPS:
        pytest.skip(f"{NOT_RUN} (pip install 'model-server[gateway]', or MODEL_SERVER_REQUIRE_GATEWAY=1)")


def _readme_gateway_steps(fleet, tmp_path: Path) -> None:
    """README's "One URL for the fleet": `model-server gateway` on the running local fleet, then an OpenAI client."""
    if not README_GATEWAY_STEPS:
        print(f"\n{NOT_RUN}: see test_the_readme_gateway_steps_run_here")  # in the test's output; that test is skipped
        return
    busy = [f"{g.name} (127.0.0.1:{g.port})" for g in fleet.gateways if _port_busy("127.0.0.1", g.port)]
    assert not busy, f"the local fleet's gateway ports are in use: {busy}"
    start, call = _readme_gateway_commands()
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        gateway = subprocess.Popen(start, cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: gateway.poll() is not None
            or all(_gateway_serves(g.port, len(fleet.group(g.group))) for g in fleet.gateways),
            60.0, lambda: f"both gateways serving their groups:\n{log.read_text(errors='replace')[-3000:]}", 0.2,
        )  # fmt: skip
        assert gateway.poll() is None, f"`model-server gateway` exited:\n{log.read_text(errors='replace')[-3000:]}"
        reply = subprocess.run(call, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
        assert reply.returncode == 0 and reply.stdout.strip(), reply.stderr[-3000:]
        embed = next(g for g in fleet.gateways if g.group == "7")
        vectors = httpx.post(
            f"http://127.0.0.1:{embed.port}/v1/embeddings", json={"model": "gte-7b", "input": "Hello!"}, timeout=10
        ).json()["data"]
        assert len(vectors) == 1 and len(vectors[0]["embedding"]) > 0
        gateway.send_signal(signal.SIGINT)  # Ctrl-C
        assert gateway.wait(timeout=40) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_no_flags_without_a_gpu_serves_the_simulated_fleet_and_stops_clean(tmp_path):
    if _this_machine_serves_the_default_table():
        pytest.skip("this machine is a host of configs/servers.toml: no flags runs that table here")
    if nvml_sees_gpu():
        pytest.skip("this machine has an NVIDIA GPU: no flags is refused here (tested above)")
    fleet = load_fleet(ROOT / "configs" / "local.toml")
    busy = [f"{s.name} ({s.host}:{s.port})" for s in fleet.servers if _port_busy(s.host, s.port)]
    busy += [f"{g.name} (127.0.0.1:{g.port})" for g in fleet.gateways if _port_busy("127.0.0.1", g.port)]
    if busy:
        pytest.skip(f"the simulated fleet's fixed ports are in use: {', '.join(busy)}")
    names = [s.name for s in fleet.servers]
    log = tmp_path / "pipeline.log"
    status_file = tmp_path / fleet.launch.status_file  # relative paths are taken from the working directory
    seen: set[int] = set()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "serve_llm_pipeline.py")],
            cwd=tmp_path,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def tree() -> None:
        try:
            seen.update(p.pid for p in psutil.Process(proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass

    try:

        def all_ready() -> bool:
            tree()
            assert proc.poll() is None, (
                f"the pipeline exited ({proc.returncode}):\n{log.read_text(errors='replace')[-4000:]}"
            )
            return all(_status(status_file, proc.pid).get(n, {}).get("state") == "READY" for n in names)

        wait_for(  # each sim refuses connections until loaded; 2 busy cores
            all_ready,
            90.0,
            lambda: f"READY: {_status(status_file, proc.pid)}\n{log.read_text(errors='replace')[-4000:]}",
            0.2,
        )
        tree()
        # The README's quick start, in its order: the client call of its second shell, as printed there.
        call = _readme_quick_start_call()
        reply = subprocess.run(call, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
        assert reply.returncode == 0 and reply.stdout.strip(), reply.stderr[-3000:]
        _readme_gateway_steps(fleet, tmp_path)  # its next section: the same fleet behind one URL per group
        tree()
        first = log.read_text(errors="replace").splitlines()[0]
        assert (
            "INFO" in first
            and "no GPU here and this host is not in" in first
            and "running the simulated fleet" in first
        )
        assert first.rstrip().endswith("pass --config to choose")
        assert (tmp_path / "logs").is_dir() and status_file.is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, log.read_text(errors="replace")[-4000:]
        wait_for(lambda: not _alive(seen), 20.0, lambda: f"no process left after the stop: {_alive(seen)}", 0.1)
    finally:
        tree()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in seen:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
