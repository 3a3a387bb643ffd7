"""`model-server status`: the status file of this host's pipeline + a live probe of every server."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from model_server.cli._app import CONFIG_HELP, app
from model_server.config import load_fleet

PROBE_TIMEOUT_S = 3.0


def _ago(since: float | None) -> str:
    if not since:
        return "-"
    seconds = max(0, int(time.time() - since))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


@app.command()
def status(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    timeout_s: float = typer.Option(PROBE_TIMEOUT_S, "--timeout-s", help="Timeout of each live /health_generate probe."),
) -> None:
    """Show the pipeline's status file and probe /health_generate of every server of the table (exit 1 if any is down)."""
    from model_server import rundir
    from model_server.status import read_status
    from model_server.supervisor import health_url, probe_health

    logging.getLogger("httpx").setLevel(logging.WARNING)
    fleet = load_fleet(config)
    path = rundir.status_path(fleet.launch)
    data = read_status(path) or {"servers": {}}
    recorded = data["servers"]
    with ThreadPoolExecutor(max_workers=min(32, len(fleet.servers))) as pool:
        started = time.monotonic()
        futures = [pool.submit(probe_health, health_url(s.host, s.port), timeout_s) for s in fleet.servers]
        results = [f.result() for f in futures]
    table = Table(title=f"{fleet.source}: {len(fleet.servers)} servers; status file {path}" + ("" if recorded else " (none)"))
    for column in ("server", "group", "address", "state", "pid", "restarts", "since", "live", "last error"):
        table.add_column(column)
    down = 0
    for spec, (ok, why) in zip(fleet.servers, results):
        entry = recorded.get(spec.name, {})
        down += not ok
        live = "[green]up[/green]" if ok else f"[red]down[/red] ({why})"
        table.add_row(
            spec.name,
            spec.group,
            spec.address,
            entry.get("state", "-"),
            str(entry.get("pid") or "-"),
            str(entry.get("restarts", "-")),
            _ago(entry.get("since")),
            live,
            (entry.get("last_error") or "")[:80],
        )
    console = Console(width=200)
    console.print(table)
    elapsed = time.monotonic() - started
    console.print(f"{len(fleet.servers) - down} up, {down} down (probed in {elapsed:.1f} s)")
    if down:
        raise typer.Exit(1)
