"""Pure: a gateway's settings -> the launcher's argv, and the launcher's argv -> sglang_router's RouterArgs.

The gateway is not started with ``smg launch --api-key KEY`` (a key on a
command line is visible to every user in ``ps``): it is started as
``python -m model_server.gateway.launcher '<json>'``, a small process that
reads its key from the environment and hands everything to sglang-router's
Python API. The JSON holds the gateway's settings and the *names* of the key
variables, never a key, so the line ``--dry-run`` prints is the line that runs.

:func:`router_args` is the one place that turns those settings into
``RouterArgs`` keyword arguments; the launcher calls it with the keys it read.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

from model_server.gateway.settings import GatewaySettings
from model_server.launcher.command import LaunchCommand

__all__ = ["LAUNCHER_MODULE", "PAYLOAD_VERSION", "build_command", "parse_payload", "payload", "router_args"]

LAUNCHER_MODULE = "model_server.gateway.launcher"
PAYLOAD_VERSION = 1


def payload(settings: GatewaySettings) -> dict[str, Any]:
    """What the launcher needs: RouterArgs fields without the key, and the name of the key's variable."""
    router = dict(settings.router)
    router["worker_urls"] = list(settings.workers) if settings.workers_on_command_line else []
    return {"v": PAYLOAD_VERSION, "name": settings.name, "router": router, "api_key_env": settings.gateway_key_env}


def build_command(settings: GatewaySettings, python: str = sys.executable) -> LaunchCommand:
    """argv of the gateway's launcher process (one JSON argument, no secret in it)."""
    text = json.dumps(payload(settings), sort_keys=True, separators=(",", ":"))
    return LaunchCommand(
        server=settings.name, argv=(python, "-m", LAUNCHER_MODULE, text), env={"PYTHONUNBUFFERED": "1"}
    )


def parse_payload(text: str) -> dict[str, Any]:
    """The launcher's argument back as a dict; ValueError naming what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"the settings argument is not JSON ({err})") from err
    if not isinstance(data, dict) or data.get("v") != PAYLOAD_VERSION or not isinstance(data.get("router"), dict):
        raise ValueError(f"the settings argument is not version {PAYLOAD_VERSION} of {LAUNCHER_MODULE}'s settings")
    env = data.get("api_key_env")
    if env is not None and not isinstance(env, str):
        raise ValueError("api_key_env in the settings argument is not a variable name")
    return data


def router_args(data: Mapping[str, Any], api_key: str | None) -> dict[str, Any]:
    """RouterArgs keyword arguments: the payload's router settings plus the key the launcher read."""
    kwargs = dict(data["router"])
    if "api_key" in kwargs:
        raise ValueError("the settings argument carries an api_key: a key never travels on a command line")
    kwargs["api_key"] = api_key
    return kwargs
