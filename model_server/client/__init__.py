"""The client half: send completions and embeddings to a group's healthy replicas.

``ModelServer`` (threads) and ``AsyncModelServer`` (asyncio) are two thin
drivers (``sync_driver``, ``async_driver``) over one base (``base``) that holds
every decision: the retry plan (``request_plan``), routing, breakers, deadlines,
resumes and probes are pure modules of their own. The drivers differ only in
how they send, wait and sleep. The exceptions are drawn in :mod:`model_server.errors`.

The drivers are loaded on first use, so importing a pure module of this
package (``model_server.client.routing``, ...) does not import the openai SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from model_server.errors import (
    ClientError,
    GroupUnavailableError,
    InvalidRequestError,
    RequestRejectedError,
    StreamInterruptedError,
    UnexpectedAnswerError,
    UnknownGroupError,
)

__all__ = [
    "AsyncChatStream",
    "AsyncModelServer",
    "ChatStream",
    "ClientError",
    "GroupUnavailableError",
    "InvalidRequestError",
    "ModelServer",
    "RequestRejectedError",
    "StreamInterruptedError",
    "UnexpectedAnswerError",
    "UnknownGroupError",
]

_DRIVERS = {
    "AsyncChatStream": "async_driver",
    "AsyncModelServer": "async_driver",
    "ChatStream": "sync_driver",
    "ModelServer": "sync_driver",
}

if TYPE_CHECKING:  # pragma: no cover
    from model_server.client.async_driver import AsyncChatStream, AsyncModelServer
    from model_server.client.sync_driver import ChatStream, ModelServer


def __getattr__(name: str) -> Any:
    module = _DRIVERS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
