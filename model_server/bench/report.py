"""The result of a run: the JSON document ``--output`` writes, and the table the CLI prints.

Shape (every latency in seconds)::

    {"ok", "failed", "sent", "asked_rate", "achieved_rate", "wall_s",
     "ttft_s": {"p50", "p90", "p99", "max", "mean", "count"}, "tpot_s": {...}, "e2e_s": {...},
     "dispatch_lag_s": {...}, "output_tokens", "output_tokens_per_s", "requests_per_s",
     "slo": {"ttft_s", "tpot_s", "attained", "attainment", "goodput_rps", "untimed"},
     "errors": {message: count},
     "faults": [{"at_s", "action", "server", "spec", "undo", "applied_s", "ok", "detail",
                 "client": {"failovers", "resumes", "failed_requests", "breaker", "recovered_after_s", ...} or None}],
     "client": {"failovers": {replica: n}, "breaker_changes": {...}, "breaker_state_at_end": {...}, "resumes", ...},
     "run": {"mode", "target", "arrival", "concurrency", "requests", "prompt_len", "output_len", "seed", ...}}

``client`` (and each fault's ``client``) is there for a group run (through ModelServer) only: what
the client logged, read by :mod:`model_server.bench.clientlog`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from model_server.bench.clientlog import ClientEventLog, fault_effects
from model_server.bench.runner import RunOutcome
from model_server.bench.stats import SloPolicy, summarize
from model_server.errors import BenchError

__all__ = ["build_result", "client_seen_line", "client_totals_line", "result_lines", "result_table", "write_json"]


def build_result(
    outcome: RunOutcome,
    *,
    asked_rate: float | None,
    slo: SloPolicy = SloPolicy(),
    run: dict[str, Any] | None = None,
    client_log: ClientEventLog | None = None,
) -> dict:
    """The numbers of a run plus what was asked, which faults happened and (group runs) what the client saw."""
    result = summarize(outcome.records, asked_rate=asked_rate, slo=slo, wall_s=outcome.wall_s)
    result["faults"] = [a.as_dict() for a in outcome.faults]
    result["faults_not_applied"] = [e.describe() for e in outcome.faults_not_applied]
    if client_log is not None:
        client_log.acquire()
        try:
            events = list(client_log.events)
            result["client"] = client_log.totals()
        finally:
            client_log.release()
        if outcome.start_wall_s is not None:
            failed_at = [r.done_s for r in outcome.records if not r.ok and r.done_s is not None]
            effects = fault_effects(
                result["faults"], events, failed_at, start_wall_s=outcome.start_wall_s, end_s=outcome.wall_s
            )
            for fault, seen in zip(result["faults"], effects):
                fault["client"] = seen
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
        raise BenchError(
            f"--output {file}: cannot write the result ({err.strerror or err}). Give a path in a writable directory."
        ) from err
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
        objectives = f"TTFT <= {slo['ttft_s']} s, TPOT <= {slo['tpot_s']} s"
        lines.append(f"SLO ({objectives}): attained {attainment}, goodput {_num(slo['goodput_rps'])} req/s")
    for fault in result.get("faults", []):
        state = "ok" if fault["ok"] else "NOT APPLIED"
        applied = f"applied at {_num(fault['applied_s'], 2)} s, {state} ({fault['detail'][:80]})"
        lines.append(f"fault {fault['spec']}: {applied}")
        if fault.get("client"):
            lines.append("  " + client_seen_line(fault["server"], fault["client"]))
    for spec in result.get("faults_not_applied", []):
        lines.append(f"fault {spec}: not applied (the run ended first)")
    if "client" in result:
        lines.append(client_totals_line(result["client"]))
    for message, count in result.get("errors", {}).items():
        lines.append(f"error x{count}: {message}")
    return lines


def _per_replica(counts: dict[str, int]) -> str:
    return ", ".join(f"{replica} {n}" for replica, n in counts.items()) or "none"


def _counted(count: int, noun: str) -> str:
    """``3 failovers``, ``1 failover``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def client_seen_line(server: str, seen: dict) -> str:
    """What the client saw of one fault, one line."""
    last = seen.get("last_failover_after_s")
    parts = [_counted(seen["failovers"], "failover") + f" off {server}"]
    if last is not None:
        parts[0] += f" (the last {last:.2f} s after)"
    if seen.get("warnings"):
        parts.append(_counted(seen["warnings"], "other warning") + " naming it")
    parts += [_counted(seen["resumes"], "resumed stream"), _counted(seen["failed_requests"], "failed request")]
    if seen["breaker"]:
        parts.append("breaker " + ", ".join(f"{b['from']}->{b['to']} +{b['after_s']:.2f} s" for b in seen["breaker"]))
    recovered = seen.get("recovered_after_s")
    if not seen.get("seen"):
        window = f"{seen['window_s']:.1f} s"
        verdict = f"the client noticed nothing of it in {window} (no failover, breaker change or warning)"
    elif recovered is None:
        verdict = f"not recovered in {seen['window_s']:.1f} s (its breaker was not closed again)"
    else:
        verdict = f"recovered after {recovered:.2f} s"
    return "client saw: " + "; ".join(parts) + f"; {verdict}"


def client_totals_line(client: dict) -> str:
    """The client's failovers and breaker changes per replica, over the whole run."""
    failovers, breaker_changes = _per_replica(client["failovers"]), _per_replica(client["breaker_changes"])
    line = f"client: failovers {failovers}; breaker changes {breaker_changes}"
    open_at_end = {r: s for r, s in client.get("breaker_state_at_end", {}).items() if s != "closed"}
    if open_at_end:
        line += "; at the end " + ", ".join(f"{r} {s}" for r, s in open_at_end.items())
    return line + f"; resumed streams {client['resumes']}"
