"""`model-server probe [--config] [--group G]`: probe every replica now, print a latency table."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from model_server.cli._app import CONFIG_HELP, app
from model_server.config import load_fleet


@app.command()
def probe(
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    group: list[str] | None = typer.Option(None, "--group", "-g", help="Only this group (repeatable)."),
    timeout_s: float | None = typer.Option(
        None, "--timeout-s", help="Probe bound in seconds. Default: the table's client.initial_latency_s."
    ),
) -> None:
    """Probe every replica of the table's groups at once (one small request each); exit 1 if a group is down."""
    from model_server.client.probe import probe_group
    from model_server.errors import UnknownGroupError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # the table says it all; no line per request
    fleet = load_fleet(config)
    groups = fleet.groups
    names = list(group) if group else list(groups)
    for name in names:
        if name not in groups:
            raise UnknownGroupError(name, groups, fleet.source)
    specs = [s for name in names for s in groups[name]]
    bound_s = timeout_s if timeout_s is not None else fleet.client.initial_latency_s
    results = probe_group(specs, bound_s, api_key=fleet.api_key(), connect_timeout_s=fleet.client.connect_timeout_s)

    table = Table(title=f"{fleet.source}: probe of {len(specs)} replica(s), bound {bound_s:g} s")
    for column in ("group", "replica", "address", "kind", "latency", "result"):
        table.add_column(column)
    live: dict[str, int] = {name: 0 for name in names}
    for r in results:
        s = r.spec
        if r.ok and r.rejected:
            table.add_row(
                s.group,
                s.name,
                s.address,
                s.kind.value,
                f"{(r.latency_s or 0) * 1000:.1f} ms",
                f"[yellow]up, but refuses the probe: {r.rejected}[/yellow]",
            )
        elif r.ok:
            live[s.group] += 1
            table.add_row(
                s.group, s.name, s.address, s.kind.value, f"{(r.latency_s or 0) * 1000:.1f} ms", "[green]ok[/green]"
            )
        else:
            table.add_row(s.group, s.name, s.address, s.kind.value, "-", f"[red]{r.error}[/red]")
    console = Console()
    console.print(table)
    dead = [name for name, n in live.items() if n == 0]
    for name in names:
        console.print(f"group {name!r}: {live[name]}/{len(groups[name])} replica(s) answering")
    if dead:
        console.print(f"[red]no live replica in group(s): {', '.join(dead)}[/red]")
        raise typer.Exit(1)
