"""model-server: a fault-tolerant manager for fleets of SGLang LLM servers.

Two halves share one fleet table (:mod:`model_server.config`): the launch
pipeline (``model-server serve``) and the client (:class:`ModelServer`).
Importing this package never imports torch or sglang.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from model_server.config import Fleet, ServerSpec, load_fleet
from model_server.errors import (
    BenchError,
    ClientError,
    ConfigError,
    GroupUnavailableError,
    InvalidRequestError,
    LaunchError,
    ModelServerError,
    RequestRejectedError,
    SimError,
    StreamInterruptedError,
    UnexpectedAnswerError,
    UnknownGroupError,
)

__version__ = "0.1.0"

_CLIENT_NAMES = ("AsyncChatStream", "AsyncModelServer", "ChatStream", "ModelServer")

__all__ = [
    "AsyncChatStream",
    "AsyncModelServer",
    "BenchError",
    "ChatStream",
    "ClientError",
    "ConfigError",
    "Fleet",
    "GroupUnavailableError",
    "InvalidRequestError",
    "LaunchError",
    "ModelServer",
    "ModelServerError",
    "RequestRejectedError",
    "ServerSpec",
    "SimError",
    "StreamInterruptedError",
    "UnexpectedAnswerError",
    "UnknownGroupError",
    "__version__",
    "load_fleet",
]

if TYPE_CHECKING:  # pragma: no cover
    from model_server.client import AsyncChatStream, AsyncModelServer, ChatStream, ModelServer


def __getattr__(name: str) -> Any:
    # The client pulls in the openai SDK; load it only when asked for.
    if name in _CLIENT_NAMES:
        from model_server import client

        return getattr(client, name)
    raise AttributeError(f"module 'model_server' has no attribute {name!r}")
