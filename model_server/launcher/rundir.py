"""Where the pipeline keeps its files: logs, the status file, and the private key files.

Relative paths of the launch policy are taken from the current directory
(run the pipeline from the project root, as the README does). The key files
live in ``<status dir>/secrets`` (mode 0700), one 0600 YAML file per server.
A key file exists only while its engine starts: it is written just before the
spawn and removed once the engine answers (it has read its ``--config`` by
then), when it exits, and when the pipeline stops; a pipeline that starts
removes the ones an earlier run killed by SIGKILL left behind.

:func:`check_writable` runs before anything starts, so an unwritable log or
status directory is named as such, not blamed on the engine.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from model_server.common.atomic import atomic_write_text
from model_server.config import LaunchPolicy
from model_server.errors import LaunchError

__all__ = [
    "check_writable",
    "key_file_path",
    "log_path",
    "remove_key_file",
    "remove_stale_key_files",
    "safe_name",
    "secrets_dir",
    "status_path",
    "write_key_file",
]


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
    try:
        path.unlink(missing_ok=True)
    except OSError as err:  # never fatal: the file is 0600 in a 0700 directory
        import logging  # noqa: PLC0415

        logging.getLogger(__name__).error("cannot remove the API-key file %s: %s", path, err)


def remove_stale_key_files(policy: LaunchPolicy) -> list[Path]:
    """Remove the key files an earlier run left (it was killed before it could); return them."""
    removed = []
    directory = secrets_dir(policy)
    if directory.is_dir():
        for path in directory.glob("*.yaml"):
            remove_key_file(path)
            removed.append(path)
        for path in directory.glob(".*.tmp"):  # an atomic write cut short
            remove_key_file(path)
    return removed


def _probe_dir(directory: Path, field: str, value: str, what: str) -> None:
    try:
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True, mode=0o700 if field == "launch.log_dir" else 0o777)
        fd, name = tempfile.mkstemp(prefix=".model-server-probe-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise LaunchError(
            f"{field} is {value}, and {what} cannot be written in {directory} ({err.strerror or err}). Make that a "
            f"directory this user can write, or set {field} to another path in the fleet table."
        ) from err


def check_writable(policy: LaunchPolicy) -> None:
    """LaunchError naming the field when the log directory or the status file's directory cannot be written."""
    logs = log_path(policy, "x").parent
    _probe_dir(logs, "launch.log_dir", str(logs), "the engine logs")
    status = status_path(policy)
    _probe_dir(status.parent, "launch.status_file", str(status), "the status file")
