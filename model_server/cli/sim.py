"""`model-server sim [SGLang-style flags]`: run the simulated SGLang engine in the foreground.

The flags go untouched to the simulator's own argparse parser, so they behave
exactly like ``sglang.launch_server``'s (``--help`` included; an unknown flag
exits 2 with "unrecognized arguments").
"""

from __future__ import annotations

import typer

from model_server.cli._app import app


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def sim(ctx: typer.Context) -> None:
    """Run a simulated SGLang server (not a model): `model-server sim --model-path X --port P [--help]`."""
    from model_server.sim.serve import serve
    from model_server.sim.settings import parse_sim_args

    serve(parse_sim_args(ctx.args))
