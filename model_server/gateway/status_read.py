"""One read of a gateway for `model-server status`: ``GET /liveness``, then ``GET /workers``, each with a timeout.

Never raises for what the network or the gateway does: what went wrong is a
short phrase in the :class:`~model_server.gateway.status_view.GatewayAnswer`
(its meaning is decided in :mod:`model_server.gateway.status_view`). The
gateway's key, when given, goes only in the ``Authorization`` header of
``GET /workers`` (``/liveness`` needs none); it is in no answer and no message.
"""

from __future__ import annotations

from typing import Any

from model_server.common.http_failure import describe_http_failure
from model_server.common.urls import bearer_headers
from model_server.gateway.status_view import GatewayAnswer

__all__ = ["read_gateway"]


def read_gateway(url: str, key: str | None, timeout_s: float, client: Any = None) -> GatewayAnswer:
    """The gateway at ``url`` (``http://host:port``): is it live, and its worker list.

    Two requests, each with ``timeout_s`` on every phase (connect, each read), so about 2 x ``timeout_s``
    unless a slow gateway trickles its answer.

    ``client``: an ``httpx.Client`` to send with (a test's in-process app); default: one of its own, which
    ignores the environment's proxy settings (the gateway's key must not travel through one).
    """
    import httpx  # noqa: PLC0415  (only when a gateway is read)

    if client is None:
        with httpx.Client(trust_env=False) as own:
            return read_gateway(url, key, timeout_s, own)
    sender = client
    try:
        live = sender.get(url + "/liveness", timeout=timeout_s)
    except httpx.HTTPError as err:
        return GatewayAnswer(url, problem=describe_http_failure(err, timeout_s))
    if live.status_code != 200:
        return GatewayAnswer(url, live.status_code)
    try:
        listed = sender.get(url + "/workers", headers=bearer_headers(key), timeout=timeout_s)
    except httpx.HTTPError as err:
        return GatewayAnswer(url, 200, workers_problem=describe_http_failure(err, timeout_s))
    try:
        data = listed.json()
    except ValueError:
        data = None
    return GatewayAnswer(url, 200, workers_status=listed.status_code, workers_data=data)
