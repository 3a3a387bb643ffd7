"""`model-server check CONFIG`: validate a fleet table and summarise it."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from model_server.cli._app import CONFIG_HELP, app
from model_server.config import Fleet, load_fleet
from model_server.gateway.settings import validate as validate_gateways
from model_server.launcher.steps import hang_bounds_s


def summary_table(fleet: Fleet) -> Table:
    """Servers per host with their groups and GPUs."""
    table = Table(title=f"{fleet.source}: {len(fleet.servers)} servers, {len(fleet.groups)} groups")
    for column in ("host", "server", "group", "kind", "port", "gpus", "model"):
        table.add_column(column)
    by_host: dict[str, list] = defaultdict(list)
    for s in fleet.servers:
        by_host[s.host].append(s)
    for host, servers in by_host.items():
        for s in servers:
            gpus = ",".join(map(str, s.gpus)) or "-"
            table.add_row(host, s.name, s.group, s.kind.value, str(s.port), gpus, s.model)
    return table


@app.command()
def check(
    config: Path | None = typer.Argument(None, help=CONFIG_HELP),
) -> None:
    """Validate a fleet table; print its servers per host, groups and GPUs (exit 2 if invalid)."""
    fleet = load_fleet(config)
    gateways = validate_gateways(fleet)  # ConfigError (exit 2) naming every [[gateways]] problem
    console = Console()
    console.print(summary_table(fleet))
    for group, servers in fleet.groups.items():
        console.print(f"group {group!r}: {len(servers)} {servers[0].kind.value} replica(s)")
    gpus_per_host: dict[str, int] = defaultdict(int)
    for s in fleet.servers:
        gpus_per_host[s.host] += len(s.gpus)
    for host, n in gpus_per_host.items():
        console.print(f"host {host}: {n} GPU(s) in use")
    if fleet.api_key_env:
        state = "set" if fleet.api_key(required=False) else "NOT set in this shell"
        console.print(f"API key: from ${fleet.api_key_env} ({state})")
    else:
        console.print("API key: none (servers accept any caller)")
    console.print(f"launch engine: {fleet.launch.engine}; GPU inventory: {fleet.gpu_inventory.source}")
    launch = fleet.launch
    soonest, latest = hang_bounds_s(launch)
    console.print(
        f"health: /health_generate every {launch.health_interval_s:g} s with a {launch.health_timeout_s:g} s timeout; "
        f"{launch.health_failures_to_restart} failures in a row mean hung, so a hung server is found "
        f"{soonest:g}-{latest:g} s after it stops answering, and restarted"
    )
    if launch.secret_env:
        console.print(f"secrets redacted from engine logs: the API key and ${', $'.join(launch.secret_env)}")
    for gateway in gateways:
        console.print(gateway.summary())
    console.print("[green]OK[/green]")
