"""Where the pipeline keeps its files: logs, the status file, and the private key files.

Relative paths of the launch policy are taken from the current directory
(run the pipeline from the project root, as the README does). The key files
live in ``<status dir>/secrets`` (mode 0700), one 0600 YAML file per server,
and are removed when the pipeline stops.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from model_server.atomic import atomic_write_text
from model_server.config import LaunchPolicy
from model_server.errors import LaunchError

__all__ = ["key_file_path", "log_path", "remove_key_file", "safe_name", "secrets_dir", "status_path", "write_key_file"]


def safe_name(server: str) -> str:
    """A file name for a server name such as ``8@10.0.0.1:8056``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", server) or "server"


def status_path(policy: LaunchPolicy) -> Path:
    return Path(policy.status_file).absolute()


def log_path(policy: LaunchPolicy, server: str) -> Path:
    return Path(policy.log_dir).absolute() / f"{safe_name(server)}.log"


def secrets_dir(policy: LaunchPolicy) -> Path:
    return status_path(policy).parent / "secrets"


def key_file_path(policy: LaunchPolicy, server: str) -> Path:
    return secrets_dir(policy) / f"{safe_name(server)}.yaml"


def write_key_file(path: Path, key: str) -> Path:
    """Write ``api-key: KEY`` readable by this user only (dir 0700, file 0600), replacing an old one."""
    import yaml  # noqa: PLC0415

    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        atomic_write_text(path, yaml.safe_dump({"api-key": key}), mode=0o600)
    except OSError as err:
        raise LaunchError(
            f"cannot write the API-key file {path} ({err.strerror or err}). Make the directory of "
            f"launch.status_file writable."
        ) from err
    return path


def remove_key_file(path: Path) -> None:
    path.unlink(missing_ok=True)
