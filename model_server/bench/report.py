"""The result of a run: the JSON document ``--output`` writes, and the table the CLI prints.

Shape (every latency in seconds)::

    {"ok", "failed", "sent", "asked_rate", "achieved_rate", "wall_s",
     "ttft_s": {"p50", "p90", "p99", "max", "mean", "count"}, "tpot_s": {...}, "e2e_s": {...},
     "dispatch_lag_s": {...}, "output_tokens", "output_tokens_per_s", "requests_per_s",
     "slo": {"ttft_s", "tpot_s", "attained", "attainment", "goodput_rps", "untimed"},
     "errors": {message: count}, "faults": [{"at_s", "action", "server", "applied_s", "ok", "detail"}],
     "run": {"mode", "target", "arrival", "concurrency", "requests", "prompt_len", "output_len", "seed", ...}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from model_server.bench.errors import BenchError
from model_server.bench.runner import RunOutcome
from model_server.bench.stats import SloPolicy, summarize

__all__ = ["build_result", "result_lines", "result_table", "write_json"]


def build_result(outcome: RunOutcome, *, asked_rate: float | None, slo: SloPolicy = SloPolicy(), run: dict[str, Any] | None = None) -> dict:
    """The numbers of a run plus what was asked and which faults happened."""
    result = summarize(outcome.records, asked_rate=asked_rate, slo=slo, wall_s=outcome.wall_s)
    result["faults"] = [a.as_dict() for a in outcome.faults]
    result["faults_not_applied"] = [e.describe() for e in outcome.faults_not_applied]
    result["run"] = dict(run or {})
    return result


def write_json(result: dict, path: str | Path) -> Path:
    """Write atomically (a reader never sees half a file)."""
    file = Path(path)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, file)
    except OSError as err:
        raise BenchError(f"--output {file}: cannot write the result ({err.strerror or err}). Give a path in a writable directory.") from err
    return file


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def result_table(result: dict, title: str = "model-server bench") -> Table:
    """Latency percentiles (ms) per metric; :func:`result_lines` gives the counts and rates."""
    table = Table(title=title)
    for column in ("metric", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E"), ("dispatch_lag_s", "send lag")):
        s = result[key]
        table.add_row(label, _ms(s["p50"]), _ms(s["p90"]), _ms(s["p99"]), _ms(s["max"]), _ms(s["mean"]))
    return table


def result_lines(result: dict) -> list[str]:
    """Counts, rates, SLO, faults and errors, one line each."""
    slo = result["slo"]
    lines = [
        f"requests: ok {result['ok']}, failed {result['failed']}, sent {result['sent']}",
        f"rate: asked {_num(result['asked_rate'])}/s, achieved {_num(result['achieved_rate'])}/s; "
        f"throughput {_num(result['requests_per_s'])} req/s, {_num(result['output_tokens_per_s'], 0)} output tokens/s",
    ]
    if slo["ttft_s"] is not None or slo["tpot_s"] is not None:
        attainment = "-" if slo["attainment"] is None else f"{slo['attainment'] * 100:.1f}%"
        lines.append(f"SLO (TTFT <= {slo['ttft_s']} s, TPOT <= {slo['tpot_s']} s): attained {attainment}, goodput {_num(slo['goodput_rps'])} req/s")
    for fault in result.get("faults", []):
        state = "ok" if fault["ok"] else "NOT APPLIED"
        lines.append(f"fault {fault['spec']}: applied at {_num(fault['applied_s'], 2)} s, {state} ({fault['detail'][:80]})")
    for spec in result.get("faults_not_applied", []):
        lines.append(f"fault {spec}: not applied (the run ended first)")
    for message, count in result.get("errors", {}).items():
        lines.append(f"error x{count}: {message}")
    return lines
