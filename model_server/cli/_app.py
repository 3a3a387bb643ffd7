"""The typer application every command module registers on."""

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


@app.callback()
def _root() -> None:
    """Fault-tolerant manager for fleets of SGLang servers."""
