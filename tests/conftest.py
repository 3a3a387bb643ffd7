"""Suite-wide settings.

Hypothesis: random examples on a developer's machine, so new edge cases keep
turning up there; derandomized under CI (``CI`` set, as `.ci/run` is run), so a
landing never hangs on a lucky seed. A failure prints its reproduction blob
either way.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True, database=None)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
