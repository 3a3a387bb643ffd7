"""The typer application every command module registers on, and the options of the root command."""

from __future__ import annotations

import typer

from model_server.config import CONFIG_ENV

app = typer.Typer(
    name="model-server",
    help="Fault-tolerant manager for fleets of SGLang servers: launch, watch, probe, simulate, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

CONFIG_HELP = f"Fleet table (TOML). Default: ${CONFIG_ENV}, else configs/servers.toml."
DEFAULT_FLEET_HELP = (
    f"Fleet table (TOML). Default: ${CONFIG_ENV}; else configs/servers.toml if this machine is one of its "
    f"hosts; else, with no NVIDIA GPU here, the simulated fleet configs/local.toml."
)


def _print_version(value: bool) -> None:
    if value:
        import model_server  # the code that runs (with an editable install, the work tree's)

        typer.echo(f"model-server {model_server.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version of model-server and exit."
    ),
) -> None:
    """Fault-tolerant manager for fleets of SGLang servers."""
