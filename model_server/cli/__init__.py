"""`model-server`: one typer app; each command lives in its own module here.

Every module of this package whose name does not start with ``_`` is imported
and registers its commands on :data:`model_server.cli._app.app`. The CLI may
print; the library logs. A :class:`ModelServerError` becomes one paragraph on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys

from model_server.cli._app import app
from model_server.errors import ModelServerError

__all__ = ["app", "main"]

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        app(args=argv, prog_name="model-server")
    except ModelServerError as err:
        print(f"model-server: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
