"""`model-server gateway`: an SGLang Model Gateway per group in front of the fleet, supervised."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from model_server.cli._app import CONFIG_HELP, app

_GROUP_HELP = "Start the gateway of this group (its gateways entry in the table); repeat for more. Default: all."
_PORT_HELP = "The port of the one selected gateway (a group with no entry gets the defaults)."
_DRY_RUN_HELP = "Print each gateway's exact settings and command as JSON; start nothing."


@app.command()
def gateway(
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    group: list[str] | None = typer.Option(None, "--group", "-g", help=_GROUP_HELP),
    port: int | None = typer.Option(None, "--port", min=1, max=65535, help=_PORT_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
) -> None:
    """Run an SGLang Model Gateway (sglang-router) per group, its workers the group's replicas on every host.

    A gateway that exits or stops answering /liveness is restarted with backoff; Ctrl-C or SIGTERM stops them all.

    With [launch] control_port, each gateway's workers follow the pipelines' control APIs: a replica leaves the
    gateway when it is not READY (a drained one before it stops) and comes back when READY (sync_interval_s).

    One gateway per group: its router does not route by model name. Needs sglang-router (the gateway extra).

    Exit status: 0 if every gateway was READY until the stop, 1 otherwise, 2 for a bad table or option.
    """
    from model_server.config import load_fleet
    from model_server.gateway.command import build_command
    from model_server.gateway.settings import select
    from model_server.gateway.supervisor import GatewayRunner

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per liveness probe is noise
    fleet = load_fleet(config)
    chosen = select(fleet, group or (), port)
    if dry_run:
        typer.echo(json.dumps([{**st.describe(), "command": build_command(st).render()} for st in chosen], indent=2))
        return
    raise typer.Exit(GatewayRunner(fleet, chosen).run())
