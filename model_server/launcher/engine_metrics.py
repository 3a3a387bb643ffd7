"""What a drain needs from an engine: how many requests it runs now, from its Prometheus ``/metrics``.

SGLang (and the simulator) serve ``/metrics`` only with ``--enable-metrics``,
which the launch command adds unless ``launch.enable_metrics`` is false; an
engine without it answers 404, and a drain then waits its whole timeout.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["RUNNING_METRIC", "read_running_requests", "running_requests"]

RUNNING_METRIC = "sglang:num_running_reqs"


def running_requests(text: str) -> int | None:
    """The sum of ``sglang:num_running_reqs`` over its samples (one per model), or None when it is absent."""
    found = None
    for family in text_string_to_metric_families(text):
        if family.name == RUNNING_METRIC:
            found = (found or 0) + sum(int(sample.value) for sample in family.samples)
    return found


def read_running_requests(url: str, timeout_s: float, key: str | None = None) -> tuple[int | None, str]:
    """(running requests, "") from the engine's /metrics at ``url``, or (None, why) when it cannot tell."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(url, timeout=timeout_s, headers=headers)
    except httpx.HTTPError as err:
        return None, f"{type(err).__name__} from {url}"
    if response.status_code != 200:
        return None, f"status {response.status_code} from {url} (is --enable-metrics on?)"
    try:
        running = running_requests(response.text)
    except ValueError as err:
        return None, f"unreadable metrics from {url}: {err}"
    if running is None:
        return None, f"{url} has no {RUNNING_METRIC}"
    return running, ""
