"""The SGLang Model Gateway (``sglang-router``'s ``smg``) in front of the fleet, supervised like an engine.

The gateway routes, retries, health-checks and breaks circuits; it does not
start, heal or drain engines. This package runs it for the groups of the fleet
table and keeps its worker list in step with the pipelines (only READY
replicas, when they serve a control API)::

    (../gateway_table.py: the [[gateways]] section of the table, pydantic, pure; shared with config.py)
    settings.py    entry + table -> the exact settings of one gateway; validation (pure)
    command.py     settings -> the launcher's argv and the gateway's RouterArgs (pure)
    launcher.py    the gateway process: reads its keys from the environment, runs the router
    supervisor.py  one gateway process: spawn, liveness, restart with backoff, stop; GatewayRunner for several
    membership.py  add/remove workers through the gateway's worker API (/workers)
    sync.py        GET /workers parsed (once, for all); READY replicas vs. that list -> what to add and remove (pure)
    sync_loop.py   the thread that follows the control plane while a gateway is READY (with launch.control_port)
    status_read.py what `model-server status` reads of a gateway: GET /liveness and GET /workers, never raising
    status_view.py those answers -> up or why not, its workers by server name, unhealthy and missing ones (pure)

Keys never reach a command line or a log: the launcher process reads them
from the variables the table names, and sglang-router's Python API takes them
there (``RouterArgs.api_key``). Errors: :class:`~model_server.errors.ConfigError`
for the table, :class:`~model_server.errors.LaunchError` for the process and
the worker API. ``sglang_router`` is imported only by the launcher process:
the optional extra ``model-server[gateway]`` installs it.

This package never imports the client (:mod:`model_server.client`).
"""

from __future__ import annotations

from model_server.gateway_table import GatewayPolicy, GatewaySpec

__all__ = ["GatewayPolicy", "GatewaySpec"]
