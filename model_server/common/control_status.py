"""A pipeline's ``GET /status``, read and parsed in one place for everyone who listens.

The CLI and the dashboard (:mod:`model_server.launcher.fleet_view`), the
client's control listener and the gateway's worker sync all read a control
API the same way: this module sends the request (never raising for what the
network or the pipeline does, and saying which key to export on a 401/403)
and turns the answer into ``{server: Recorded}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model_server.common.urls import bearer_headers, server_url
from model_server.config import LaunchPolicy

__all__ = [
    "READ_TIMEOUT_S",
    "ControlAnswer",
    "Recorded",
    "get_control_status",
    "parse_control_status",
    "read_timeout_s",
]

READ_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Recorded:
    """A server as its pipeline reports it (control API or status file)."""

    state: str
    pid: int | None = None
    restarts: int = 0
    since: float | None = None
    last_error: str = ""


@dataclass(frozen=True)
class ControlAnswer:
    """What one ``GET /status`` of a control API gave: its JSON, or why there is none."""

    url: str
    data: dict[str, Any] | None = None
    problem: str = ""
    status: int | None = None  # the HTTP status it answered with; None: no answer at all

    def servers(self) -> tuple[dict[str, Recorded], str]:
        """{server: Recorded} from the answer, or ({}, why there is none: no answer, or a malformed one)."""
        return parse_control_status(self.data) if self.data is not None else ({}, self.problem)


def read_timeout_s(interval_s: float) -> float:
    """One read of a control API that is read every ``interval_s`` may take that long, within 1-5 s
    (a busy 2-core pipeline answers slowly; a stuck one must not hold a listener for long)."""
    return min(5.0, max(1.0, interval_s))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_control_status(data: Any) -> tuple[dict[str, Recorded], str]:
    """A control API's ``/status`` JSON as {server: Recorded}, or ({}, what is wrong with it)."""
    if not isinstance(data, dict) or not isinstance(data.get("servers"), list):
        return {}, 'its answer is not a control API status (no "servers" list)'
    out: dict[str, Recorded] = {}
    for i, s in enumerate(data["servers"]):
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("state"), str)):
            return {}, f"its answer's servers[{i}] has no name and state"
        pid = s.get("pid") if _count(s.get("pid")) else None
        since = (
            s.get("since")
            if isinstance(s.get("since"), (int, float)) and not isinstance(s.get("since"), bool)
            else None
        )
        out[s["name"]] = Recorded(
            s["state"], pid, s["restarts"] if _count(s.get("restarts")) else 0, since,
            s["last_error"] if isinstance(s.get("last_error"), str) else "",
        )  # fmt: skip
    return out, ""


def _refusal_fix(status: int, policy: LaunchPolicy, key_sent: bool) -> str:
    if status not in (401, 403):
        return ""
    if not policy.control_key_env:
        return " Set launch.control_key_env in the table (and export that variable for the pipelines and here)"
    if key_sent:
        return f" The key in ${policy.control_key_env} here is not that pipeline's: export the same key as there"
    return f" Export {policy.control_key_env}=<the pipelines' control key> here"


def get_control_status(
    host: str, policy: LaunchPolicy, key: str | None, timeout_s: float = READ_TIMEOUT_S, client: Any = None
) -> ControlAnswer:
    """``GET /status`` of ``host``'s control API; never raises for what the network or the pipeline does.

    ``client``: an ``httpx.Client`` to send it with (a listener's pooled one, a test's in-process app);
    default: a new connection.
    """
    import httpx  # noqa: PLC0415  (only when a fleet is read)

    assert policy.control_port is not None
    url = server_url(host, policy.control_port, "/status")
    try:
        response = (client or httpx).get(url, headers=bearer_headers(key), timeout=timeout_s)
    except httpx.TimeoutException:
        return ControlAnswer(url, problem=f"{url} gave no answer within {timeout_s:g} s")
    except httpx.ConnectError as err:
        if "refused" in str(err).lower():
            return ControlAnswer(
                url, problem=f"nothing listens at {url} (connection refused): no pipeline with the control API there"
            )
        return ControlAnswer(url, problem=f"{url}: cannot connect ({err})")
    except httpx.HTTPError as err:
        return ControlAnswer(url, problem=f"{url}: {type(err).__name__}: {err}")
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code != 200:
        said = data.get("error") if isinstance(data, dict) and isinstance(data.get("error"), str) else ""
        fix = _refusal_fix(response.status_code, policy, key is not None)
        problem = f"{url} answered {response.status_code}{': ' + said if said else ''}.{fix}"
        return ControlAnswer(url, problem=problem, status=response.status_code)
    if not isinstance(data, dict):
        return ControlAnswer(url, problem=f"{url} did not answer JSON: not a model-server control API", status=200)
    return ControlAnswer(url, data, status=200)
