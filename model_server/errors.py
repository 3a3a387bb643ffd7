"""The root of model-server's exceptions.

Each half of the project hangs its own tree under this one base, so an
application can catch everything model-server raises with one ``except``::

    ModelServerError
    ├── ConfigError            the fleet table is wrong (config.py)
    ├── LaunchError            the launch pipeline cannot go on (supervisor.py)
    └── ClientError            the client's tree (client.py docstring)

Every message is one paragraph that names the thing that is wrong and the fix;
the CLI prints it and exits with status 2.
"""

from __future__ import annotations

__all__ = ["ClientError", "ConfigError", "LaunchError", "ModelServerError"]


class ModelServerError(Exception):
    """Base of every error model-server raises on purpose."""


class ConfigError(ModelServerError, ValueError):
    """The fleet table (or an option that overrides it) is invalid."""


class LaunchError(ModelServerError):
    """The launch pipeline cannot start or keep a server (tree in supervisor.py)."""


class ClientError(ModelServerError):
    """The client could not serve a request (tree in client.py)."""
