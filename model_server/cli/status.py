"""`model-server status`: every host of the table, from its pipeline's control API, else the status file and probes.

One table row per server (state, pid, restarts, since from its pipeline;
``live`` from a direct /health_generate probe), then one line per host saying
where its states came from (``control API``, ``status file + probes``,
``probes only``) and, when not the control API, why not; running or recent
rollouts follow, then one row per ``[[gateways]]`` entry (up, or why not; its
workers and their health as the gateway sees them) with a line for each
worker it reports unhealthy and each READY replica of its group it does not
list. The live probes are always shown: a missing, damaged or foreign status
file is named on stderr (what is wrong, where), its valid entries still
shown. The exit status is the servers': 1 if a server's probe fails. The
rest informs and is no failure: a control API that does not answer (its host
falls back to the status file or the probes), a gateway that is down (the
gateways are optional, run by their own command, often elsewhere: its row
says so in red), a worker the gateway reports unhealthy. The reading itself
is :mod:`model_server.launcher.fleet_view`.
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
from model_server.common.control_status import READ_TIMEOUT_S
from model_server.config import load_fleet
from model_server.gateway.status_view import GatewayView


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


def gateway_lines(g: GatewayView) -> list[str]:
    """What is wrong with a gateway that is up, a sentence each, for people (a gateway down says why in its row)."""
    if not g.up:
        return []
    out = [f"gateway {g.name}: its worker list is unknown: {g.workers_problem}"] if g.workers_problem else []
    for name in g.unhealthy:
        out.append(f"gateway {g.name} reports {name} unhealthy: it sends it no request until its health checks pass")
    for name in g.missing:
        out.append(f"gateway {g.name} does not list {name}, which its pipeline reports READY (not yet added?)")
    return out


def _workers_cell(g: GatewayView) -> str:
    if not g.up:
        return "-"
    if g.workers_problem:
        return "[yellow]unknown[/yellow]"
    if not g.workers:
        return "[red]none[/red]"
    return ", ".join(
        f"{escape(w.label)} " + ("[green]healthy[/green]" if w.healthy else "[red]unhealthy[/red]") for w in g.workers
    )


def _print_gateways(console: Console, gateways: tuple[GatewayView, ...]) -> None:
    table = Table(title=f"{len(gateways)} gateway(s)")
    for column in ("gateway", "group", "url", "state", "workers (as the gateway sees them)"):
        table.add_column(column)
    for g in gateways:
        state = "[green]up[/green]" if g.up else f"[red]down[/red] ({escape(g.why)})"
        table.add_row(escape(g.name), escape(g.group), escape(g.url), state, _workers_cell(g))
    console.print(table)
    for g in gateways:
        for line in gateway_lines(g):
            console.print(f"  [red]{escape(line)}[/red]")


@app.command()
def status(
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    timeout_s: float = typer.Option(
        READ_TIMEOUT_S,
        "--timeout-s",
        min=0.1,
        help="Timeout of each control API read, each live /health_generate probe and each request to a gateway.",
    ),
    host_ip: list[str] | None = typer.Option(
        None, "--host-ip", help="An address the table uses for this machine (its status file is read for that host)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the fleet's view as JSON instead of a table."),
) -> None:
    """Show every host's servers (from its control API, else the status file) and probe each; show each gateway.

    Each gateway of the table shows whether it answers /liveness and its workers with their health as it sees
    them (GET /workers, with its key when the variable its api_key_env names is set), and flags the workers it
    reports unhealthy and the READY replicas of its group it does not list. Exit status 1 if a server is down
    (a gateway down or a worker it reports unhealthy is flagged, and is no failure of the fleet's servers;
    `model-server gateway` runs the gateways). The control key, when the variable launch.control_key_env names
    is set, is sent to read the control APIs of other machines.
    """
    from model_server.launcher.fleet_view import SOURCE_API, SOURCE_FILE, read_fleet

    logging.getLogger("httpx").setLevel(logging.WARNING)
    fleet = load_fleet(config)
    view = read_fleet(fleet, timeout_s=timeout_s, host_ip=host_ip or ())
    down = len(view.down)
    failed = bool(down)  # the servers': a gateway down is flagged in its row (the gateways are optional)
    if as_json:
        typer.echo(json.dumps(view.as_dict(), indent=2))
        raise typer.Exit(1 if failed else 0)
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
    if view.gateways:
        _print_gateways(console, view.gateways)
    summary = f"{len(view.servers) - down} up, {down} down"
    if view.gateways:
        summary += f"; gateways: {len(view.gateways) - len(view.gateways_down)} up, {len(view.gateways_down)} down"
    console.print(f"{summary} (probed in {view.elapsed_s:.1f} s)")
    if view.gateways and len(view.gateways_down) == len(view.gateways):
        console.print(f"  no gateway answers: `model-server gateway --config {escape(fleet.source)}` starts them")
    if damaged:
        typer.echo(
            f"model-server status: the status file {path} is damaged ({'; '.join(dict.fromkeys(damaged))}); its "
            f"valid entries are shown above. The pipeline rewrites it when it starts (after you remove it).",
            err=True,
        )
    if failed:
        raise typer.Exit(1)
