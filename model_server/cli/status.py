"""`model-server status`: the status file of this host's pipeline + a live probe of every server.

The live probes are always shown: a missing, damaged or foreign status file
is named on stderr (what is wrong, where), its valid entries still shown, and
the exit status is the probes' (1 if any server is down).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
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
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    timeout_s: float = typer.Option(
        PROBE_TIMEOUT_S, "--timeout-s", help="Timeout of each live /health_generate probe."
    ),
) -> None:
    """Show the pipeline's status file and probe /health_generate of every server (exit 1 if any is down)."""
    from model_server.common.processes import same_process
    from model_server.launcher import rundir
    from model_server.launcher.status_file import load_status
    from model_server.launcher.steps import health_url
    from model_server.launcher.supervisor import probe_health

    logging.getLogger("httpx").setLevel(logging.WARNING)
    fleet = load_fleet(config)
    path = rundir.status_path(fleet.launch)
    status_file = load_status(path)
    recorded = status_file.servers
    with ThreadPoolExecutor(max_workers=min(32, len(fleet.servers))) as pool:
        started = time.monotonic()
        futures = [pool.submit(probe_health, health_url(s.host, s.port), timeout_s) for s in fleet.servers]
        results = [f.result() for f in futures]
    table = Table(
        title=f"{fleet.source}: {len(fleet.servers)} servers; status file {path}"
        + ("" if status_file.exists else " (none)")
    )
    for column in ("server", "group", "address", "state", "pid", "restarts", "since", "live", "last error"):
        table.add_column(column)
    down = 0
    for spec, (ok, why) in zip(fleet.servers, results):
        entry = recorded.get(spec.name)
        down += not ok
        live = "[green]up[/green]" if ok else f"[red]down[/red] ({escape(why)})"
        table.add_row(
            escape(spec.name),
            escape(spec.group),
            spec.address,
            entry.state if entry else "-",
            str(entry.pid or "-") if entry else "-",
            str(entry.restarts) if entry else "-",
            _ago(entry.since) if entry else "-",
            live,
            escape(entry.last_error[:80]) if entry else "",
        )
    console = Console(width=200)
    console.print(table)
    owner = status_file.pipeline
    if status_file.exists and not status_file.problems:
        alive = same_process(owner.get("pid"), owner.get("create_time"))
        console.print(
            f"pipeline pid {owner.get('pid', '?')}: "
            + ("running" if alive else "not running (the states above are its last)")
        )
    elapsed = time.monotonic() - started
    console.print(f"{len(fleet.servers) - down} up, {down} down (probed in {elapsed:.1f} s)")
    if status_file.problems:
        typer.echo(
            f"model-server status: the status file {path} is damaged ({'; '.join(status_file.problems)}); its "
            f"valid entries are shown above. The pipeline rewrites it when it starts (after you remove it).",
            err=True,
        )
    if down:
        raise typer.Exit(1)
