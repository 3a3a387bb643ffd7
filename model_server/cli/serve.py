"""`model-server serve`: the launch pipeline of this host (== `python serve_llm_pipeline.py`)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from model_server.cli._app import DEFAULT_FLEET_HELP, app

log = logging.getLogger(__name__)

_HOST_IP_HELP = (
    "An address (or name) the table uses for this machine, besides its own interface addresses and hostname."
)
_DRY_RUN_HELP = (
    "Print one shell-quoted command per server of this host, its memory fraction chosen from the GPUs now; "
    "start nothing."
)


@app.command()
def serve(
    config: Path | None = typer.Option(None, "--config", "-c", help=DEFAULT_FLEET_HELP),
    host_ip: list[str] | None = typer.Option(None, "--host-ip", help=_HOST_IP_HELP),
    only: list[str] | None = typer.Option(None, "--only", help="Start only this server (by name); repeat for more."),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
) -> None:
    """Start this host's servers once their GPUs are free, keep them healthy, stop them on Ctrl-C / SIGTERM.

    Exit status: 0 if every server was READY until the stop, 1 otherwise, 2 for a bad table or option.
    With --dry-run: 0, or 1 if a server would be refused now (GPU memory short, an unknown GPU).
    """
    from model_server.common.fleet_choice import Source, resolve_fleet
    from model_server.errors import LaunchError
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
        refused = 0
        for line in dry_run_commands(p):
            if line.command is None:
                refused += 1
                log.error("dry run: server %s would not start: %s", line.server, line.basis)
                continue
            log.info("dry run: server %s: --mem-fraction-static %g (%s)", line.server, line.mem_fraction, line.basis)
            typer.echo(line.command.render())
        raise typer.Exit(1 if refused else 0)
    code = Pipeline(p).run()
    raise typer.Exit(code)
