"""The run-state JSON file a driving job watches: set ``is_running`` to false.

The original client flipped ``is_running`` in the job's JSON file when a model
group died, so the job stops feeding work. This does the same, atomically
(write a temporary file in the same directory, then ``os.replace``), keeping
every other key. A missing file is created; a file that is not a JSON object
is left alone and the problem logged, because the caller is already raising
the error that matters (the group is unavailable).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from model_server.common.atomic import atomic_write_text

__all__ = ["mark_not_running", "update_run_state"]

log = logging.getLogger(__name__)


def update_run_state(path: str | os.PathLike[str], **changes: Any) -> bool:
    """Merge ``changes`` into the JSON object at ``path`` atomically. Returns False if it could not."""
    file = Path(path)
    data: dict[str, Any] = {}
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except OSError as err:
        log.error("cannot read run-state file %s (%s); is_running not updated", file, err)
        return False
    if text.strip():
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            log.error("run-state file %s is not valid JSON (%s); left unchanged", file, err)
            return False
        if not isinstance(loaded, dict):
            log.error("run-state file %s holds a JSON %s, not an object; left unchanged", file, type(loaded).__name__)
            return False
        data = loaded
    data.update(changes)
    try:
        atomic_write_text(file, json.dumps(data, indent=2) + "\n")
    except OSError as err:
        log.error("cannot write run-state file %s (%s); is_running not updated", file, err)
        return False
    return True


def mark_not_running(path: str | os.PathLike[str]) -> bool:
    """Set ``is_running: false`` in the run-state file, keeping its other keys."""
    done = update_run_state(path, is_running=False)
    if done:
        log.warning("run-state file %s: is_running set to false", path)
    return done
