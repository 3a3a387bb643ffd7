"""`model-server status`: every host of the table, from its pipeline's control API, else the status file and probes.

One table row per server (state, pid, restarts, since from its pipeline;
``live`` from a direct /health_generate probe), then one line per host saying
where its states came from (``control API``, ``status file + probes``,
``probes only``) and, when not the control API, why not; running or recent
rollouts follow. The live probes are always shown: a missing, damaged or
foreign status file is named on stderr (what is wrong, where), its valid
entries still shown, and the exit status is the probes' (1 if any server is
down). The reading itself is :mod:`model_server.launcher.fleet_view`.
"""

from __future__ import annotations

import json
import logging
import time
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


def rollout_line(r: dict) -> str:
    """One rollout of ``GET /status``'s ``rollouts``, for people."""
    done = ", ".join(r.get("done") or []) or "none"
    parts = [f"rollout {r.get('id')} of group {r.get('group')}: {r.get('state')}", f"restarted {done}"]
    if r.get("state") == "running" and r.get("current"):
        parts.append(f"now {r['current']}")
    if r.get("left"):
        parts.append(f"left {', '.join(r['left'])}")
    line = "; ".join(parts)
    return line + (f". {r['why']}" if r.get("why") else "")


@app.command()
def status(
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    timeout_s: float = typer.Option(
        PROBE_TIMEOUT_S,
        "--timeout-s",
        min=0.1,
        help="Timeout of each control API read and each live /health_generate probe.",
    ),
    host_ip: list[str] | None = typer.Option(
        None, "--host-ip", help="An address the table uses for this machine (its status file is read for that host)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the fleet's view as JSON instead of a table."),
) -> None:
    """Show every host's servers (from its control API, else the status file) and probe each (exit 1 if any is down).

    The control key, when the variable launch.control_key_env names is set, is sent to read the control APIs of
    other machines.
    """
    from model_server.launcher.fleet_view import SOURCE_API, SOURCE_FILE, read_fleet

    logging.getLogger("httpx").setLevel(logging.WARNING)
    fleet = load_fleet(config)
    view = read_fleet(fleet, timeout_s=timeout_s, host_ip=host_ip or ())
    down = len(view.down)
    if as_json:
        typer.echo(json.dumps(view.as_dict(), indent=2))
        raise typer.Exit(1 if down else 0)
    path = Path(view.status_file) if view.status_file else None
    title = f"{fleet.source}: {len(fleet.servers)} servers on {len(view.hosts)} host(s)"
    if path is not None:
        title += f"; status file {path}" + ("" if path.exists() else " (none)")
    table = Table(title=title)
    for column in ("server", "group", "address", "state", "pid", "restarts", "since", "live", "last error"):
        table.add_column(column)
    for host in view.hosts:
        for s in host.servers:
            entry = s.recorded
            if s.live is None:
                live = "-"
            else:
                live = "[green]up[/green]" if s.live.ok else f"[red]down[/red] ({escape(s.live.why)})"
            table.add_row(
                escape(s.name),
                escape(s.group),
                escape(s.address),
                entry.state if entry else "-",
                str(entry.pid or "-") if entry else "-",
                str(entry.restarts) if entry else "-",
                _ago(entry.since) if entry else "-",
                live,
                escape(entry.last_error[:80]) if entry else "",
            )
    console = Console(width=200)
    console.print(table)
    damaged: list[str] = []
    for host in view.hosts:
        if host.source == SOURCE_API:
            started = host.pipeline.get("started")
            up = f" (pipeline started {_ago(started)})" if isinstance(started, (int, float)) else ""
            console.print(f"host {escape(host.host)}: {SOURCE_API} {escape(host.control_url or '')}{up}")
        else:
            console.print(f"host {escape(host.host)}: {host.source}; control API not used: {escape(host.why)}")
        if host.source == SOURCE_FILE:
            pid, running = host.pipeline.get("pid", "?"), host.pipeline.get("running")
            console.print(
                f"  pipeline pid {pid}: " + ("running" if running else "not running (the states above are its last)")
            )
            damaged.extend(host.status_file_problems)
        for r in host.rollouts.values():
            console.print(f"  {escape(rollout_line(r))}")
    console.print(f"{len(view.servers) - down} up, {down} down (probed in {view.elapsed_s:.1f} s)")
    if damaged:
        typer.echo(
            f"model-server status: the status file {path} is damaged ({'; '.join(dict.fromkeys(damaged))}); its "
            f"valid entries are shown above. The pipeline rewrites it when it starts (after you remove it).",
            err=True,
        )
    if down:
        raise typer.Exit(1)
