"""`model-server serve`: the launch pipeline of this host (== `python serve_llm_pipeline.py`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer

from model_server.cli._app import CONFIG_HELP, app

log = logging.getLogger(__name__)


@app.command()
def serve(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    host_ip: Optional[List[str]] = typer.Option(
        None, "--host-ip", help="An address (or name) the table uses for this machine, besides its own interface addresses and hostname."
    ),
    only: Optional[List[str]] = typer.Option(None, "--only", help="Start only this server (by name); repeat for more."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print one shell-quoted command per server of this host, start nothing."),
) -> None:
    """Start this host's servers once their GPUs are free, keep them healthy, stop them on Ctrl-C / SIGTERM.

    Exit status: 0 if every server was READY until the stop, 1 otherwise, 2 for a bad table or option.
    """
    from model_server.pipeline import Pipeline, dry_run_commands, plan

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe is noise
    p = plan(config, host_ip or (), only or ())
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

