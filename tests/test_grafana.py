"""grafana/: the dashboard JSON imports (its shape is Grafana's), and every query names a metric that is exported.

"Exported" is checked against the exporters themselves, not a list: the
pipeline's registry (launcher/metrics.py), a client's (client/metrics.py)
and the simulated engine's (sim/metrics.py, SGLang 0.5.23's names), each fed
once so every series exists, then scraped. Each ``sglang:`` name must also be
one SGLang 0.5.23 defines (its ``metrics_collector.py``), when its environment
is there (.ci/run makes it). Labels a query groups or filters by must be the
metric's own, Prometheus's (``instance``, ``job``, ``le``), or the scrape
config's (grafana/prometheus.yml), whose engine and gateway targets are
configs/local.toml's. The gateway's ``smg_`` names and their labels are
checked against a real gateway's /metrics, after traffic, in
tests/test_gateway_live.py (tests/_grafana_queries.py's :func:`gateway_queries` is what it
checks).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from _grafana_queries import (
    GATEWAY_PREFIX,
    METRIC,
    PROMETHEUS_LABELS,
    ROOT,
    SCRAPE,
    all_queries,
    dashboard,
    queries,
    scrape_labels,
    scraped,
    used_labels,
)
from prometheus_client import CollectorRegistry, generate_latest

from model_server.config import load_fleet
from model_server.gateway.settings import resolve
from model_server.launcher.events_file import Transition
from model_server.launcher.gpu_memory import GpuReading
from model_server.launcher.metrics import PipelineMetrics
from model_server.launcher.status_file import ServerStatus
from model_server.sim.metrics import SimMetrics

PANEL_TYPES = {"row", "timeseries", "stat", "bargauge", "heatmap", "table", "state-timeline", "gauge", "text"}
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range", "__all"}


def _exported() -> dict[str, set[str]]:
    pipeline = PipelineMetrics(
        lambda: [ServerStatus("chat-1", "8", "127.0.0.1", 1, state="READY")],
        lambda: [GpuReading(0, 1024, 81920)],
    )
    pipeline.on_transition(Transition(0.0, "chat-1", "WAITING_GPU", "STARTING", ""))
    pipeline.on_transition(Transition(1.0, "chat-1", "STARTING", "READY", ""))
    pipeline.observe_probe("chat-1", 0.9, ok=True)

    from model_server.client.breaker import BreakerState
    from model_server.client.metrics import ClientMetrics

    registry = CollectorRegistry()
    client = ClientMetrics(registry)
    client.attempt("8", "chat-1")
    client.failure("8", "chat-1", "timeout")
    client.failover("8", "chat-1")
    client.resume("8", "chat-1")
    client.stall("8", "chat-1", "first_token")
    client.latency("8", "chat-1", 0.1)
    replica = SimpleNamespace(breaker=BreakerState.OPEN, latency_s=0.02)  # as an EndpointSnapshot has them
    client.watch(lambda: {"8": {"chat-1": replica}})

    sim = SimMetrics("llama-8b", max_total_num_tokens=1000, context_len=4096)
    sim.first_token(0.05, streaming=True, queue_s=0.0)
    sim.tokens(3, 0.01, first=True)
    sim.finished(prompt_tokens=5, output_tokens=3, e2e_s=0.1, tpot_s=0.01, streaming=True)
    exported: dict[str, set[str]] = {}
    for text in (pipeline.exposition(), generate_latest(registry), sim.render(running=1, queued=0, used_tokens=8)):
        for name, labels in scraped(text.decode()).items():
            exported.setdefault(name, set()).update(labels)
    return exported


def _sglang_names() -> set[str] | None:
    """The metric names SGLang 0.5.23 defines, read from its source in the SGLang environment; None without one."""
    given = os.environ.get("MODEL_SERVER_SGLANG_PYTHON")
    python = Path(given) if given else ROOT / ".venv-sglang" / "bin" / "python"
    if not python.exists():
        if os.environ.get("MODEL_SERVER_REQUIRE_SGLANG") == "1":
            pytest.fail(f"MODEL_SERVER_REQUIRE_SGLANG=1 and no SGLang environment at {python}")
        return None
    code = "import importlib.util as u; print(list(u.find_spec('sglang').submodule_search_locations)[0])"
    where = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=30, check=True)
    source = Path(where.stdout.strip()) / "srt" / "observability" / "metrics_collector.py"
    return set(re.findall(r'name="(sglang:[a-z0-9_]+)"', source.read_text()))


def _base(name: str) -> str:
    return re.sub(r"_(bucket|sum|count|total|created)$", "", name)


def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    d = dashboard()
    assert d["title"] and d["uid"] == "model-server-fleet" and isinstance(d["schemaVersion"], int)
    assert d["schemaVersion"] >= 36 and "id" not in d  # an export for import: Grafana gives it an id
    inputs = {i["name"]: i for i in d["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource" and inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    required = {(r["type"], r["id"]) for r in d["__requires"]}
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) > 10
    for p in d["panels"]:
        assert p["type"] in PANEL_TYPES and p["title"], p
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0 and pos["y"] >= 0, p["title"]
        if p["type"] == "row":
            continue
        assert ("panel", p["type"]) in required, p["type"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}" and t["expr"].strip(), p["title"]
    cells = [
        (p["gridPos"]["y"], x)
        for p in d["panels"]
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
    ]
    assert len(cells) == len(set(cells)), "two panels start in the same place of a row"
    defined = {v["name"] for v in d["templating"]["list"]}
    for title, expr in queries(d) + [("variable " + v["name"], v["definition"]) for v in d["templating"]["list"]]:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), (title, expr)
        assert expr.count("[") == expr.count("]"), (title, expr)
        used = set(re.findall(r"\$(\w+)", expr)) - GRAFANA_VARIABLES
        assert used <= defined, (title, used - defined)


def test_every_query_names_metrics_our_exporters_or_sglang_export_with_labels_they_have() -> None:
    exported = _exported()
    sglang = _sglang_names()
    given = scrape_labels()
    named: set[str] = set()
    for title, expr in all_queries(dashboard()):
        metrics = set(METRIC.findall(expr))
        assert metrics, (title, expr)
        named |= {_base(m) for m in metrics}
        if any(m.startswith(GATEWAY_PREFIX) for m in metrics):
            assert all(m.startswith(GATEWAY_PREFIX) for m in metrics), f"{title}: mixes the gateway's and others'"
            continue  # the gateway's names and labels: against a real gateway, in test_gateway_live.py
        labels: set[str] = set(PROMETHEUS_LABELS)
        for m in metrics:
            assert m in exported, f"{title}: {m} is exported by none of the pipeline, the client, the engine"
            labels |= exported[m]
            if m.startswith("sglang:"):
                labels |= given
                if sglang is not None:
                    assert _base(m) in sglang or m in sglang, f"{title}: SGLang 0.5.23 has no metric {m}"
        used = used_labels(expr)
        assert used <= labels, f"{title}: labels {sorted(used - labels)} are on none of {sorted(metrics)}"
    wanted = {  # what the issues ask the dashboard to show
        "model_server_server_state", "model_server_server_restarts", "model_server_gpu_memory_used_bytes",
        "model_server_client_failovers", "model_server_client_failures", "sglang:num_running_reqs",
        "sglang:num_queue_reqs", "sglang:time_to_first_token_seconds", "sglang:inter_token_latency_seconds",
        "sglang:token_usage", "sglang:cache_hit_rate",
        "smg_router_requests", "smg_router_request_duration_seconds", "smg_worker_retries", "smg_worker_health",
        "smg_worker_cb_state",
    }  # fmt: skip
    assert wanted <= named, wanted - named


def test_the_scrape_config_example_scrapes_the_local_fleet() -> None:
    config = yaml.safe_load(SCRAPE.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"model-server-pipelines", "sglang-engines", "model-server-clients", "sglang-gateways"}
    fleet = load_fleet(ROOT / "configs" / "local.toml")
    engines = {
        (c["targets"][0], c["labels"]["server"], c["labels"]["group"]) for c in jobs["sglang-engines"]["static_configs"]
    }
    assert engines == {(f"{s.host}:{s.port}", s.name, s.group) for s in fleet.servers}
    pipelines = [t for c in jobs["model-server-pipelines"]["static_configs"] for t in c["targets"]]
    assert pipelines == [f"127.0.0.1:{fleet.launch.control_port}"]
    gateways = {
        (c["targets"][0], c["labels"]["gateway"], c["labels"]["group"])
        for c in jobs["sglang-gateways"]["static_configs"]
    }
    settings = [resolve(fleet, g) for g in fleet.gateways]
    assert settings, "configs/local.toml has no [[gateways]] entry for the gateway job to scrape"
    assert gateways == {
        (f"{g.router['prometheus_host']}:{g.router['prometheus_port']}", g.name, g.group) for g in settings
    }
