"""The local fleet behind the real SGLang Model Gateway: `model-server gateway` as a subprocess, in front of
simulated replicas (real `model-server sim` processes on the ports of a copy of configs/local.toml).

The engines require a key (``$MS_GW_WORKER_KEY``) and the gateways have their own (``$MS_GW_GATEWAY_KEY``),
so the supervisor registers the workers through the gateway's worker API; the SIGINT test runs a gateway
with the engines' key, whose workers go on its command line. Skipped, with the reason, where sglang_router
is not importable, unless MODEL_SERVER_REQUIRE_GATEWAY=1 (then it fails).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from _grafana_queries import PROMETHEUS_LABELS, gateway_queries, scrape_labels, scraped, used_labels
from _pipeline_runs import free_port, local_copy
from _waiting import wait_for

from model_server.cli.status import gateway_lines
from model_server.common.processes import listening_pid
from model_server.config import load_fleet
from model_server.gateway.membership import Membership
from model_server.gateway.settings import PINNED_VERSION
from model_server.gateway.status_view import GatewayView
from model_server.launcher import fleet_view
from model_server.sim.process import SimProcess

ROUTER = importlib.util.find_spec("sglang_router") is not None
REQUIRE = os.environ.get("MODEL_SERVER_REQUIRE_GATEWAY") == "1"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not ROUTER and not REQUIRE,
        reason=(
            f"sglang_router is not importable: pip install 'model-server[gateway]' (sglang-router=={PINNED_VERSION})"
        ),
    ),
]

WORKER_KEY = "sk-engines-7f3a9c1e5b"
GATEWAY_KEY = "sk-gateway-2d8e6b4f0a"
KEYS = {"MS_GW_WORKER_KEY": WORKER_KEY, "MS_GW_GATEWAY_KEY": GATEWAY_KEY}
CHAT = ["chat-1", "chat-2", "chat-3"]
EMBED = ["embed-1", "embed-2"]
MESSAGES = [{"role": "user", "content": "Name a colour."}]
GATEWAYS = """
[[gateways]]
group = "8"
port = {chat}
prometheus_port = {chat_metrics}
policy = "round_robin"
api_key_env = "MS_GW_GATEWAY_KEY"
liveness_interval_s = 0.5
liveness_timeout_s = 3
startup_timeout_s = 45
restart_backoff_initial_s = 0.1
restart_backoff_max_s = 0.5
health_check_interval_secs = 1
health_check_timeout_secs = 1

[[gateways]]
group = "7"
port = {embed}
prometheus_port = {embed_metrics}
policy = "round_robin"
api_key_env = "MS_GW_GATEWAY_KEY"
liveness_interval_s = 0.5
startup_timeout_s = 45
"""


def free_ports(n: int) -> list[int]:
    """n different free ports."""
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def free_pair() -> int:
    """A free port whose next port is free too (a gateway's default metrics port is port + 1)."""
    for _ in range(100):
        port = free_port()
        if port < 65535 and listening_pid(port + 1) is None:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise AssertionError("no two consecutive free ports in 100 tries")


@pytest.fixture(scope="module", autouse=True)
def _router_importable() -> None:
    if not ROUTER:  # only with MODEL_SERVER_REQUIRE_GATEWAY=1: the skip above covers the rest
        pytest.fail(
            "MODEL_SERVER_REQUIRE_GATEWAY=1 and sglang_router is not importable: pip install "
            f"sglang-router=={PINNED_VERSION}"
        )


@dataclass
class Fleet:
    table: Path
    tmp: Path
    sims: dict[str, SimProcess]
    chat_port: int
    embed_port: int
    chat_metrics: int
    embed_metrics: int

    def url(self, name: str) -> str:
        return self.sims[name].url

    def chats(self, name: str) -> int:
        return self.sims[name].stats()["by_route"].get("/v1/chat/completions", 0)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("gateway")
    chat_port, embed_port, chat_metrics, embed_metrics = free_ports(4)
    extra = GATEWAYS.format(chat=chat_port, embed=embed_port, chat_metrics=chat_metrics, embed_metrics=embed_metrics)
    table = local_copy(tmp, top='api_key_env = "MS_GW_WORKER_KEY"\n', extra=extra)
    sims: dict[str, SimProcess] = {}
    try:
        for s in load_fleet(table).servers:
            sims[s.name] = SimProcess(
                model_path=s.model, served_model_name=s.served_model_name, port=s.port,
                embedding=s.kind.value == "embedding", api_key=WORKER_KEY, args=("--ttft-ms", "5", "--tpot-ms", "1"),
            ).start(wait=False)  # fmt: skip
        for sim in sims.values():
            sim.wait_ready(30)
        yield Fleet(table, tmp, sims, chat_port, embed_port, chat_metrics, embed_metrics)
    finally:
        for sim in sims.values():
            sim.stop(grace_s=3)


@dataclass
class GatewayRun:
    """One `model-server gateway` subprocess, its output in files."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def ready(self, *names: str) -> bool:
        """Whether the supervisor has said each of these gateways is READY."""
        text = self.err.read_text(errors="replace")
        return all(f"gateway {name}: STARTING -> READY" in text for name in names)

    def tree(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:  # pragma: no cover - a test failed: leave nothing behind
                for p in self.tree():
                    p.kill()
                self.proc.kill()
                self.proc.wait(10)


def start_gateway(fleet: Fleet, *args: str, table: Path | None = None) -> GatewayRun:
    stamp = time.monotonic_ns()
    out, err = fleet.tmp / f"gateway-{stamp}.out", fleet.tmp / f"gateway-{stamp}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "model_server", "gateway", "--config", str(table or fleet.table), *args],
            cwd=fleet.tmp, stdout=o, stderr=e, env={**os.environ, **KEYS},
        )  # fmt: skip
    return GatewayRun(proc, out, err)


def readiness(port: int) -> dict:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readiness", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return {}


def healthy(port: int, n: int) -> bool:
    return readiness(port).get("healthy_workers") == n


def diagnose(fleet: Fleet, run: GatewayRun) -> str:
    """What a failed wait saw: readiness, the command's output, the end of each gateway's log."""
    logs = "\n".join(
        f"--- {log.name}:\n"
        + "\n".join([ln for ln in log.read_text(errors="replace").splitlines() if "http_request{" not in ln][-15:])
        for log in sorted((fleet.tmp / "logs").glob("gateway-*.log"))
    )
    return (
        f"readiness: chat {readiness(fleet.chat_port)}, embed {readiness(fleet.embed_port)}\n"
        f"--- command output:\n{run.output()}\n{logs}"
    )


def sdk(port: int, key: str = GATEWAY_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=20)


@pytest.fixture(scope="module")
def gateways(fleet: Fleet) -> Iterator[GatewayRun]:
    run = start_gateway(fleet)
    try:
        try:
            wait_for(
                lambda: (
                    run.proc.poll() is not None
                    or (
                        run.ready("gateway-8", "gateway-7")
                        and healthy(fleet.chat_port, 3)
                        and healthy(fleet.embed_port, 2)
                    )
                ),
                60,
                "both gateways READY with every worker healthy",
            )
        except AssertionError as err:
            raise AssertionError(f"{err}\n{diagnose(fleet, run)}") from None
        assert run.proc.poll() is None, run.output()
        yield run
    finally:
        run.stop()


def test_chat_streaming_chat_and_embeddings_through_the_plain_openai_sdk(fleet: Fleet, gateways: GatewayRun) -> None:
    chat = sdk(fleet.chat_port).chat.completions.create(
        model="llama-8b", messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 8
    pieces = [c.choices[0].delta.content or "" for c in sdk(fleet.chat_port).chat.completions.create(
        model="llama-8b", messages=MESSAGES, max_tokens=8, temperature=0, stream=True) if c.choices]  # fmt: skip
    assert "".join(pieces) == chat.choices[0].message.content  # the sim is deterministic: same text streamed
    vectors = sdk(fleet.embed_port).embeddings.create(model="gte-7b", input=["first", "second"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 256
    with pytest.raises(openai.AuthenticationError):  # the gateway wants its own key
        sdk(fleet.chat_port, key="wrong").chat.completions.create(model="llama-8b", messages=MESSAGES, max_tokens=1)


def test_the_metrics_endpoint_counts_the_requests(fleet: Fleet, gateways: GatewayRun) -> None:
    text = httpx.get(f"http://127.0.0.1:{fleet.chat_metrics}/metrics", timeout=5).text
    assert re.search(r'smg_router_requests_total\{[^}]*endpoint="chat"[^}]*\} [1-9]', text), text[:2000]
    for name in CHAT:
        assert f'smg_worker_health{{worker="{fleet.url(name)}"}} 1' in text


def test_a_removed_worker_gets_no_requests_and_gets_them_again_once_added_back(
    fleet: Fleet, gateways: GatewayRun
) -> None:
    client = sdk(fleet.chat_port)

    def send(n: int) -> None:
        for i in range(n):
            client.chat.completions.create(
                model="llama-8b", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=2
            )

    with Membership(f"http://127.0.0.1:{fleet.chat_port}", GATEWAY_KEY) as members:
        assert sorted(m.url for m in members.members()) == sorted(fleet.url(n) for n in CHAT)
        assert members.remove(fleet.url("chat-1"), wait_s=20) is True
        before = {n: fleet.chats(n) for n in CHAT}
        send(12)
        after = {n: fleet.chats(n) for n in CHAT}
        assert after["chat-1"] == before["chat-1"]  # removed: not one request
        assert after["chat-2"] + after["chat-3"] - before["chat-2"] - before["chat-3"] == 12
        member = members.add(fleet.url("chat-1"), worker_api_key=WORKER_KEY, wait_s=20)
        assert member is not None and member.healthy and member.model_id == "llama-8b"
        send(12)
        back = fleet.chats("chat-1") - after["chat-1"]
        assert back >= 3  # round robin over three: about a third of 12


def test_no_key_in_any_argv_log_or_status_output(fleet: Fleet, gateways: GatewayRun) -> None:
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or ())
        assert WORKER_KEY not in line and GATEWAY_KEY not in line, f"pid {proc.pid}: a key on its command line"
    mine = [" ".join(p.cmdline()).strip() for p in gateways.tree()]  # the router renames its process once it runs
    assert mine and all(c.startswith("sglang::router") or "-m model_server.gateway.launcher {" in c for c in mine), mine
    texts = {
        "the command's output": gateways.output(),
        "GET /workers": httpx.get(
            f"http://127.0.0.1:{fleet.chat_port}/workers", headers={"Authorization": f"Bearer {GATEWAY_KEY}"}, timeout=5
        ).text,
        "GET /readiness": json.dumps(readiness(fleet.chat_port)),
    }
    for log in (fleet.tmp / "logs").glob("gateway-*.log"):
        texts[log.name] = log.read_text(errors="replace")
    assert {"gateway-8.log", "gateway-7.log"} <= set(texts)
    assert "READY" in texts["the command's output"] and "Starting router" in texts["gateway-8.log"]
    # The router renames its process, so its argv is read where the supervisor logged it, at the spawn; that
    # log is redacted, so a key there would show as the mask.
    starts = re.findall(r"starting gateway-\d: (.*)", texts["gateway-8.log"] + texts["gateway-7.log"])
    assert len(starts) >= 2 and all(" -m model_server.gateway.launcher '{" in line for line in starts), starts
    assert not [line for line in starts if "***" in line], starts
    for what, text in texts.items():
        assert WORKER_KEY not in text and GATEWAY_KEY not in text, f"a key in {what}"


def test_every_gateway_metric_the_dashboard_queries_is_exported_by_the_real_gateway(
    fleet: Fleet, gateways: GatewayRun
) -> None:
    """Each smg_ name of grafana/model-server-fleet.json is a sample of a real gateway's /metrics after traffic (a
    retry included), and each label a query groups or filters by is on it or given by grafana/prometheus.yml."""
    client = sdk(fleet.chat_port)
    fleet.sims["chat-2"].set_faults(error_rate=1.0)
    try:  # round robin over three: one of these meets chat-2, whose 500 the gateway retries on another worker
        for i in range(4):
            client.chat.completions.create(model="llama-8b", messages=[{"role": "user", "content": f"m{i}"}],
                                           max_tokens=2)  # fmt: skip
    finally:
        fleet.sims["chat-2"].reset_faults()
    assert sdk(fleet.embed_port).embeddings.create(model="gte-7b", input="x").data
    queries = gateway_queries()
    assert len(queries) >= 8, queries
    wanted = set().union(*(names for _, _, names in queries))
    exported: dict[str, set[str]] = {}

    def scraped_all() -> bool:  # some series appear with their first event (a health check ticks every second)
        exported.clear()
        for port in (fleet.chat_metrics, fleet.embed_metrics):
            for name, labels in scraped(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text).items():
                exported.setdefault(name, set()).update(labels)
        return wanted <= exported.keys()

    wait_for(scraped_all, 10, lambda: f"sglang-router {PINNED_VERSION} exporting every name the dashboard queries; "
             f"missing {sorted(wanted - exported.keys())}, exported {sorted(exported)}", interval_s=0.2)  # fmt: skip
    given = scrape_labels("sglang-gateways") | PROMETHEUS_LABELS
    assert {"gateway", "group"} <= given
    for title, expr, names in queries:
        labels = set(given).union(*(exported[name] for name in names))
        used = used_labels(expr)
        assert used <= labels, f"{title}: labels {sorted(used - labels)} are on none of {sorted(names)}"


def status(fleet: Fleet, table: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`model-server status` on ``table``, with both keys in its environment; no key in what it says."""
    done = subprocess.run(
        [sys.executable, "-m", "model_server", "status", "--config", str(table), "--timeout-s", "3", *args],
        cwd=fleet.tmp, capture_output=True, text=True, timeout=60, env={**os.environ, **KEYS, "COLUMNS": "200"},
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert "Traceback" not in out and WORKER_KEY not in out and GATEWAY_KEY not in out, out
    return done


def test_status_shows_each_gateway_with_its_workers_and_a_gateway_that_is_down(
    fleet: Fleet, gateways: GatewayRun
) -> None:
    spare = fleet.tmp / "with-a-spare-gateway.toml"
    nobody = free_port()
    spare.write_text(
        fleet.table.read_text() + f'\n[[gateways]]\nname = "gateway-spare"\ngroup = "8"\nport = {nobody}\n'
    )
    done = status(fleet, spare, "--json")
    view = json.loads(done.stdout)
    assert done.returncode == 0, done.stdout  # every server is up: a gateway down is flagged, no failure of theirs
    assert all(s["live"]["ok"] for h in view["hosts"] for s in h["servers"])
    by_name = {g["name"]: g for g in view["gateways"]}
    assert list(by_name) == ["gateway-8", "gateway-7", "gateway-spare"]
    for name, port, servers in (("gateway-8", fleet.chat_port, CHAT), ("gateway-7", fleet.embed_port, EMBED)):
        g = by_name[name]
        assert g["up"] and g["url"] == f"http://127.0.0.1:{port}" and g["workers_problem"] == "", g
        assert sorted((w["server"], w["url"], w["healthy"]) for w in g["workers"]) == [
            (n, fleet.url(n), True) for n in servers
        ]
        assert g["unhealthy"] == [] and g["missing"] == []
    assert by_name["gateway-spare"] == {
        "name": "gateway-spare", "group": "8", "url": f"http://127.0.0.1:{nobody}", "up": False,
        "why": "connection refused: nothing listens there", "workers": [], "workers_problem": "", "unhealthy": [],
        "missing": [],
    }  # fmt: skip
    text = status(fleet, fleet.table)
    assert text.returncode == 0, text.stdout + text.stderr
    line = next(ln for ln in text.stdout.splitlines() if "gateway-8" in ln)
    assert f"http://127.0.0.1:{fleet.chat_port}" in line and "up" in line, text.stdout
    assert all(f"{n} healthy" in line for n in CHAT) and "unhealthy" not in line, line  # in the gateway's order
    assert "5 up, 0 down; gateways: 2 up, 0 down" in text.stdout, text.stdout


def not_probed(spec: object, timeout_s: float) -> fleet_view.Live:
    """The servers' own probes take a second each (the sim's /health_generate): not what this test is about."""
    return fleet_view.Live(True)


def test_status_flags_a_worker_the_gateway_finds_unhealthy_by_its_server_name_until_it_heals(
    fleet: Fleet, gateways: GatewayRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chat-3 stopped (SIGSTOP: it takes connections and never answers): gateway-8's health checks (1 s timeout, 2
    in a row) mark it unhealthy, status names it; continued, it is healthy again. Read as status reads."""
    monkeypatch.setenv("MS_GW_GATEWAY_KEY", GATEWAY_KEY)
    table = load_fleet(fleet.table)
    seen: list[GatewayView] = []

    def gateway_8() -> GatewayView:
        view = fleet_view.read_fleet(table, timeout_s=2.0, probe_one=not_probed)
        seen.append(next(g for g in view.gateways if g.name == "gateway-8"))
        return seen[-1]

    assert gateway_8().ok, seen[-1]
    pid = fleet.sims["chat-3"].pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        flagged = wait_for(lambda: gateway_8().unhealthy == ("chat-3",) and seen[-1], 20,
                           lambda: f"gateway-8 reporting chat-3 unhealthy; last seen {seen[-1]}")  # fmt: skip
    finally:
        os.kill(pid, signal.SIGCONT)
    assert flagged.up and not flagged.ok
    assert sorted(w.server for w in flagged.workers if w.healthy) == ["chat-1", "chat-2"]
    assert gateway_lines(flagged) == [
        "gateway gateway-8 reports chat-3 unhealthy: it sends it no request until its health checks pass"
    ]
    wait_for(lambda: gateway_8().ok, 20, lambda: f"chat-3 healthy again in gateway-8; last seen {seen[-1]}")
    assert all(w.healthy for w in seen[-1].workers) and len(seen[-1].workers) == 3


def test_a_killed_gateway_is_restarted_by_its_supervisor(fleet: Fleet, gateways: GatewayRun) -> None:
    before = listening_pid(fleet.chat_port)
    assert before is not None and before in {p.pid for p in gateways.tree()}
    os.kill(before, signal.SIGKILL)
    wait_for(lambda: (listening_pid(fleet.chat_port) or before) != before and healthy(fleet.chat_port, 3)
             and gateways.output().count("gateway gateway-8: STARTING -> READY") == 2, 45,
             "a new gateway on the chat port, READY, with its 3 workers registered again")  # fmt: skip
    assert "gateway gateway-8: READY -> RESTARTING (the gateway exited (killed by signal 9)" in gateways.output()
    reply = sdk(fleet.chat_port).chat.completions.create(model="llama-8b", messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].message.content
    assert not psutil.pid_exists(before) or psutil.Process(before).status() == psutil.STATUS_ZOMBIE


def test_sigterm_stops_every_gateway_cleanly_and_leaves_no_process(fleet: Fleet, gateways: GatewayRun) -> None:
    tree = gateways.tree()
    assert len(tree) >= 2
    assert gateways.stop(signal.SIGTERM, timeout_s=30) == 0, gateways.output()
    wait_for(
        lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree), 10, "no process left"
    )
    assert listening_pid(fleet.chat_port) is None and listening_pid(fleet.embed_port) is None
    assert "all 2 gateway(s) were READY until the stop" in gateways.output()


def test_sigint_stops_a_gateway_that_shares_the_engines_key(fleet: Fleet) -> None:
    bare = fleet.tmp / "no-gateways.toml"
    bare.write_text(fleet.table.read_text().split("[[gateways]]")[0])  # the servers only: --group and --port pick
    port = free_pair()  # its metrics take port + 1
    run = start_gateway(fleet, "--group", "7", "--port", str(port), table=bare)
    try:
        wait_for(lambda: run.proc.poll() is not None or (run.ready("gateway-7") and healthy(port, 2)), 60,
                 "the embedding gateway READY with both workers")  # fmt: skip
        assert run.proc.poll() is None, run.output()
        vectors = sdk(port, key=WORKER_KEY).embeddings.create(model="gte-7b", input="hello")  # the engines' key, here
        assert len(vectors.data[0].embedding) == 256
        assert "through POST /workers" not in run.output()  # its workers were on its command line
        tree = run.tree()
    finally:
        code = run.stop(signal.SIGINT, timeout_s=30)
    assert code == 0, run.output()
    wait_for(
        lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree), 10, "no process left"
    )
    assert listening_pid(port) is None and "signal SIGINT: stopping 1 gateway(s)" in run.output()
