"""`model-server serve`: the launch pipeline of this host (== `python serve_llm_pipeline.py`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer

from model_server.cli._app import DEFAULT_FLEET_HELP, app

log = logging.getLogger(__name__)


@app.command()
def serve(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=DEFAULT_FLEET_HELP),
    host_ip: Optional[List[str]] = typer.Option(
        None, "--host-ip", help="An address (or name) the table uses for this machine, besides its own interface addresses and hostname."
    ),
    only: Optional[List[str]] = typer.Option(None, "--only", help="Start only this server (by name); repeat for more."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print one shell-quoted command per server of this host, start nothing."),
) -> None:
    """Start this host's servers once their GPUs are free, keep them healthy, stop them on Ctrl-C / SIGTERM.

    Exit status: 0 if every server was READY until the stop, 1 otherwise, 2 for a bad table or option.
    """
    from model_server.errors import LaunchError
    from model_server.common.fleet_choice import Source, resolve_fleet
    from model_server.launcher.pipeline import Pipeline, dry_run_commands, plan

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe is noise
    choice = resolve_fleet(config, host_ip or ())
    if choice.path is None:
        raise LaunchError(choice.message)
    if choice.source is Source.SIMULATED:
        log.info("%s", choice.message)  # the first line of the run: what runs, and why
    else:
        log.debug("%s", choice.message)
    p = plan(choice.path, host_ip or (), only or ())
    if dry_run:
        log.info(
            "dry run: --mem-fraction-static assumes idle GPUs (%g); a real run picks it from free memory",
            p.fleet.launch.mem_fraction_policy[0].mem_fraction_static,
        )
        for command in dry_run_commands(p):
            typer.echo(command.render())
        return
    code = Pipeline(p).run()
    raise typer.Exit(code)

