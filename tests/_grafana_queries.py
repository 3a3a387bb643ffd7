"""The dashboard's queries and the labels they use: what tests/test_grafana.py and tests/test_gateway_live.py check.

grafana/model-server-fleet.json's PromQL, the metric names and labels each one reads, and the labels the scrape
config (grafana/prometheus.yml) gives its targets.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "model-server-fleet.json"
SCRAPE = ROOT / "grafana" / "prometheus.yml"
METRIC = re.compile(r"\b(sglang:[a-z0-9_]+|model_server_[a-z0-9_]+|smg_[a-z0-9_]+)\b")
GATEWAY_PREFIX = "smg_"  # sglang-router's names: checked against a real gateway in test_gateway_live.py
PROMETHEUS_LABELS = {"instance", "job"}


def scraped(text: str) -> dict[str, set[str]]:
    """Every sample name in a Prometheus text, with the labels it carries."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target."""
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", ())]


def all_queries(board: dict) -> list[tuple[str, str]]:
    """(title, PromQL) of every target and every variable's query."""
    variables = [("variable " + v["name"], v["definition"]) for v in board["templating"]["list"]]
    return queries(board) + variables


def used_labels(expr: str) -> set[str]:
    """The labels a query filters or groups by (and a label_values() reads)."""
    used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        used |= {x.strip() for x in group.split(",") if x.strip()}
    for match in re.findall(r"label_values\([^,]+,\s*(\w+)\)", expr):
        used.add(match)
    return used


def scrape_labels(job: str | None = None) -> set[str]:
    """The labels grafana/prometheus.yml gives its targets (of one job, or of all)."""
    jobs = yaml.safe_load(SCRAPE.read_text())["scrape_configs"]
    return {label for j in jobs if job is None or j["job_name"] == job
            for c in j["static_configs"] for label in c.get("labels", {})}  # fmt: skip


def gateway_queries() -> list[tuple[str, str, set[str]]]:
    """(title, PromQL, its smg_ metric names) of every query of the dashboard that reads a gateway's metrics."""
    out = []
    for title, expr in all_queries(dashboard()):
        names = {m for m in METRIC.findall(expr) if m.startswith(GATEWAY_PREFIX)}
        if names:
            out.append((title, expr, names))
    return out
