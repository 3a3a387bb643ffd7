"""``python -m model_server.gateway.launcher '<json>'``: one SGLang Model Gateway, run in this process.

The supervisor spawns this (through the launcher's trampoline, which arms the
parent-death signal). It reads the gateway's key from the variable the JSON
names, builds sglang-router's ``RouterArgs`` and calls its ``launch_router``,
which blocks until the gateway stops (it handles SIGTERM and SIGINT itself:
a graceful shutdown of up to ``shutdown_grace_period_secs``). So the key goes
from the environment to the router without touching a command line; the
supervisor passes this process's output through a redacting log pump anyway.

Exit status: 0 after a clean stop, 1 if the router failed, 2 for a bad
argument, an unset key variable, or sglang-router missing or too different.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from model_server.gateway.command import parse_payload, router_args
from model_server.gateway.settings import PINNED_VERSION

__all__ = ["main"]

log = logging.getLogger("model_server.gateway.launcher")


def _fail(message: str) -> int:
    log.error("%s", message)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        return _fail(
            "usage: python -m model_server.gateway.launcher '<settings JSON>' (model-server gateway starts it)"
        )
    try:
        data = parse_payload(args[0])
    except ValueError as err:
        return _fail(f"{err}; start gateways with `model-server gateway`, which writes this argument")
    name, env = data.get("name", "gateway"), data.get("api_key_env")
    key = os.environ.pop(env, None) if env else None  # the router's own code has no use for the variable
    if env and not key:
        return _fail(
            f"gateway {name}: the variable {env} that holds its API key is unset or empty here; export it in the "
            f"shell that runs `model-server gateway` (never put the key in the table)"
        )
    try:
        from sglang_router.launch_router import launch_router  # noqa: PLC0415 - the optional extra
        from sglang_router.router_args import RouterArgs  # noqa: PLC0415
        from sglang_router.version import __version__ as version  # noqa: PLC0415
    except ImportError as err:
        return _fail(
            f"gateway {name}: sglang-router is not importable here ({err}). Install it with "
            f"pip install 'model-server[gateway]' (sglang-router=={PINNED_VERSION})"
        )
    if version != PINNED_VERSION:
        log.warning(
            "gateway %s: sglang-router %s is installed; model-server was tested with %s", name, version, PINNED_VERSION
        )
    try:
        router = RouterArgs(**router_args(data, key))
    except (TypeError, ValueError) as err:
        return _fail(
            f"gateway {name}: sglang-router {version} does not take these settings ({err}); install "
            f"sglang-router=={PINNED_VERSION}, the version model-server builds them for"
        )
    del key
    settings = data["router"]
    log.info(
        "gateway %s: sglang-router %s on %s:%s, policy %s, %d worker(s) on its command line, metrics on %s:%s",
        name, version, settings.get("host"), settings.get("port"), settings.get("policy"),
        len(settings.get("worker_urls") or ()), settings.get("prometheus_host"), settings.get("prometheus_port"),
    )  # fmt: skip
    try:
        launch_router(router)
    except Exception:  # noqa: BLE001 - launch_router has logged why ("Error starting router: ...")
        return 1
    log.info("gateway %s: stopped", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
