"""Shared by the benchmark scripts: simulated servers, fleet files, the machine, tables, result files.

Every figure these scripts print is a ratio measured in one run on this
machine's CPU against `model-server sim` (a simulator, not a model): they
compare serving-layer behaviour, never GPU throughput.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from model_server.sim.process import SimProcess

RESULTS = Path(__file__).resolve().parent / "results"
ZERO_LATENCY = ("--ttft-ms", "0", "--tpot-ms", "0", "--ttft-per-prompt-token-ms", "0")

# The benchmarks that run the real launch pipeline (failover, rolling restart): fast sims, fast health checks,
# and a client tuned to the same scale.
PIPELINE_SIM_ARGS = ["--ttft-ms", "20", "--tpot-ms", "2", "--ttft-per-prompt-token-ms", "0", "--health-generate-s", "0"]
PIPELINE_LAUNCH: dict[str, Any] = {
    "engine": "sim",
    "bind_host": "127.0.0.1",
    "gpu_free_threshold_mib": 10000,
    "gpu_poll_interval_s": 0.5,
    "startup_timeout_s": 60,
    "health_interval_s": 1.0,
    "health_timeout_s": 1.0,
    "health_failures_to_restart": 2,
    "restart_backoff_initial_s": 0.2,
    "restart_backoff_max_s": 2,
    "max_restarts": 10,
    "restart_window_s": 300,
    "stop_grace_s": 3,
}
PIPELINE_CLIENT: dict[str, Any] = {
    "initial_latency_s": 2.0,
    "request_timeout_floor_s": 2.0,
    "request_timeout_ceiling_s": 10.0,
    "connect_timeout_s": 1.0,
    "retry_backoff_initial_ms": 20,
    "retry_backoff_max_ms": 500,
    "breaker_failures": 3,
    "breaker_cooldown_s": 2.0,
    "max_retry": 20,
}
console = Console(width=150)


def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = model or line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model or "unknown",
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "load_avg_1m_at_start": os.getloadavg()[0],
    }


def start_sims(
    stack: ExitStack,
    count: int,
    args: Sequence[str] = (),
    served_model_name: str = "chat",
    ready_timeout_s: float = 60.0,
) -> list[SimProcess]:
    """``count`` simulators started in parallel (each stopped when ``stack`` closes)."""
    sims = [SimProcess(served_model_name=served_model_name, args=args) for _ in range(count)]
    for sim in sims:
        stack.callback(sim.stop)
        sim.start(wait=False)
    for sim in sims:
        sim.wait_ready(ready_timeout_s)
    return sims


def fleet_text(
    servers: Iterable[tuple[str, int, str, str]],
    *,
    client: dict[str, Any] | None = None,
    launch: dict[str, Any] | None = None,
    group: str = "8",
    args: Sequence[str] = (),
) -> str:
    """A fleet table: servers as (name, port, model_path, served_model_name) on 127.0.0.1."""

    def section(name: str, values: dict[str, Any] | None) -> str:
        if not values:
            return ""
        return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()) + "\n"

    text = section("launch", launch) + section("client", client)
    if launch and launch.get("engine") == "sim":
        text += '[gpu_inventory]\nsource = "simulated"\ncount = 64\n\n'
    for name, port, model, served in servers:
        text += (
            f'[[servers]]\nname = "{name}"\ngroup = "{group}"\nkind = "completion"\nhost = "127.0.0.1"\nport = {port}\n'
            f'model = "{model}"\nserved_model_name = "{served}"\n'
        )
        if args:
            text += f"args = {json.dumps(list(args))}\n"
        text += "\n"
    return text


def sim_fleet(sims: Sequence[SimProcess], **kwargs: Any) -> str:
    return fleet_text(((f"r{i + 1}", s.port, s.model_path, s.model_name) for i, s in enumerate(sims)), **kwargs)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*(fmt(v) for v in row))
    console.print(t)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return "-" if value is None else str(value)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {
        "benchmark": name,
        "machine": machine(),
        "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": f"python benchmarks/{name}.py",
        "note": "CPU-only ratios against model-server sim (a simulator); not GPU figures",
        **data,
    }
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return path


def quiet_logs() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("model_server").setLevel(logging.ERROR)  # failovers are expected here; the tables count them
