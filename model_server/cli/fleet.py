"""`model-server drain|restart|start SERVER`, `model-server rollout GROUP`: the control API's write routes.

Each finds the server's host (or the group's hosts) in the table, sends the
route to that host's pipeline with the control key (read from the variable
``launch.control_key_env`` names, never from the command line), then polls
the host's ``GET /status`` and prints every change until the work is done,
has failed, or ``--timeout-s`` has passed. A rollout of a group on several
hosts does one host after another, in table order.

Exit status: 0 done; 1 failed or timed out (a timeout only stops the
watching: the pipeline goes on); 2 bad input, named with its fix in one
paragraph: an unknown server or group, no ``launch.control_port`` in the
table, the key variable unset, a control API that cannot be reached, or a
request the control API refuses (a server not READY, a rollout already
running, a wrong key).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from model_server.cli._app import CONFIG_HELP, app
from model_server.common.control_status import ControlAnswer, get_control_status
from model_server.config import Fleet, ServerSpec, load_fleet
from model_server.errors import ConfigError, LaunchError
from model_server.launcher.redact import Secret

POLL_S = 0.25
REQUEST_TIMEOUT_S = 5.0
TIMEOUT_HELP = (
    "Stop watching after this many seconds (exit 1; the pipeline goes on). Default: long enough for each server "
    "to drain, stop and start (launch.drain_timeout_s + stop_grace_s + startup_timeout_s + 30 s, per server)."
)


@dataclass(frozen=True)
class ControlTarget:
    """The table's control API: its port on every host, and the key (never shown)."""

    fleet: Fleet
    port: int
    key: Secret

    def url(self, host: str, path: str) -> str:
        from model_server.common.urls import server_url

        return server_url(host, self.port, path)


def control_target(fleet: Fleet) -> ControlTarget:
    """The control port and key of the table, or ConfigError saying what to set."""

    launch = fleet.launch
    if launch.control_port is None:
        raise ConfigError(
            f"{fleet.source}: field 'launch.control_port' is not set, so no pipeline of this table serves a control "
            f"API to send the command to. Set launch.control_port and launch.control_key_env in the table, restart "
            f"the pipelines with it, and run this again."
        )
    if not launch.control_key_env:
        raise ConfigError(
            f"{fleet.source}: field 'launch.control_key_env' is not set, and the control API's write routes need a "
            f"key. Set it to the name of an environment variable, export that variable (a long random key) for the "
            f"pipelines and here, restart the pipelines, and run this again."
        )
    fix = (
        f"export {launch.control_key_env}=<the pipelines' control key> here (the same value as for the pipelines), "
        f"and run this again"
    )
    try:
        value = launch.control_key(fix, required=True)
    except ConfigError as err:
        raise ConfigError(f"{fleet.source}: {err}") from None
    assert value is not None  # control_key_env is set (checked above)
    return ControlTarget(fleet, launch.control_port, Secret(value))


def post(target: ControlTarget, host: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """POST ``path`` to ``host``'s control API; its JSON answer (202); LaunchError when unreachable or refused."""
    import httpx

    from model_server.common.urls import bearer_headers

    url = target.url(host, path)
    try:
        response = httpx.post(url, json=body or {}, headers=bearer_headers(target.key.value), timeout=REQUEST_TIMEOUT_S)
    except httpx.HTTPError as err:
        raise LaunchError(
            f"the control API of host {host} ({url}) cannot be reached ({type(err).__name__}: {err}). Is the pipeline "
            f"running there with launch.control_port = {target.port}? Start it (python serve_llm_pipeline.py "
            f"--config {target.fleet.source}), or check the host's address and firewall."
        ) from err
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code != 202 or not isinstance(data, dict):
        said = data.get("error") if isinstance(data, dict) else None
        raise LaunchError(
            f"the control API of host {host} refused POST {path} ({response.status_code}): "
            f"{said or response.text[:300] or 'no reason given'}{_key_hint(target, response.status_code)}"
        )
    return data


def _key_hint(target: ControlTarget, status: int) -> str:
    """A refused key names the variable it came from here (the refusal says whether the pipeline has one)."""
    if status not in (401, 403):
        return ""
    return f" (the key sent is the one in ${target.fleet.launch.control_key_env} here)"


def read_status(target: ControlTarget, host: str) -> ControlAnswer:
    """``GET /status`` of ``host``'s control API (never raising)."""
    return get_control_status(host, target.fleet.launch, target.key.value, REQUEST_TIMEOUT_S)


def first_status(target: ControlTarget, host: str) -> dict[str, Any]:
    """The first read of a host: LaunchError (exit 2) when its control API does not answer."""
    answer = read_status(target, host)
    if answer.data is None:
        raise LaunchError(
            f"the control API of host {host} cannot be read: {answer.problem}{_start_hint(target, answer)}"
        )
    return answer.data


def _start_hint(target: ControlTarget, answer: ControlAnswer) -> str:
    """How to get an answer when nothing did (a refusal already says which key to export)."""
    if answer.status is not None:
        return ""
    return (
        f". Start the pipeline there with launch.control_port = {target.port} (python serve_llm_pipeline.py "
        f"--config {target.fleet.source}), or fix the host's address in the table."
    )


def entry_of(data: dict[str, Any], name: str) -> dict[str, Any] | None:
    servers = data.get("servers")
    if not isinstance(servers, list):
        return None
    return next((s for s in servers if isinstance(s, dict) and s.get("name") == name), None)


class Watch:
    """Polls until ``check`` says done or failed, or the deadline; prints what ``check`` prints."""

    def __init__(self, target: ControlTarget, host: str, deadline_s: float) -> None:
        self.target, self.host, self.deadline_s = target, host, deadline_s
        self._told_unreachable = False

    def until(self, check: Callable[[dict[str, Any]], tuple[bool, str] | None], what: str) -> tuple[bool, str]:
        while True:
            answer = read_status(self.target, self.host)
            data, problem = answer.data, answer.problem
            if data is not None:
                self._told_unreachable = False
                outcome = check(data)
                if outcome is not None:
                    return outcome
            elif not self._told_unreachable:
                typer.echo(f"  (the control API of {self.host} does not answer: {problem}; trying until the deadline)")
                self._told_unreachable = True
            if time.monotonic() >= self.deadline_s:
                return False, f"timed out waiting for {what}. The pipeline goes on with it: see `model-server status`"
            time.sleep(min(POLL_S, max(0.0, self.deadline_s - time.monotonic())))


def _fail(message: str) -> typer.Exit:
    typer.echo(f"model-server: {message}", err=True)
    return typer.Exit(1)


# ---- drain, restart -----------------------------------------------------------------------------------


def _one_server(
    config: Path | None, name: str, verb: str, then: Literal["stop", "restart"], timeout_s: float | None
) -> None:
    from model_server.launcher.rollout import Seen, after_command, per_server_bound_s

    logging.getLogger("httpx").setLevel(logging.WARNING)
    fleet = load_fleet(config)
    spec = fleet.server(name)
    target = control_target(fleet)
    before = entry_of(first_status(target, spec.host), name)
    if before is None:
        raise LaunchError(
            f"the pipeline on host {spec.host} does not run server {name!r} (started with --only?). Start it "
            f"there, or run the pipeline with this server."
        )
    started = time.monotonic()
    bound_s = timeout_s if timeout_s is not None else per_server_bound_s(fleet.launch)
    post(target, spec.host, f"/servers/{name}/{verb}", {"then": then} if verb == "drain" else None)
    old_pid = before.get("pid")
    was = f"{before.get('state')}" + (f", pid {old_pid}" if old_pid else "")
    typer.echo(f"{name} on {spec.host}: {verb} accepted (it was {was})")
    last: dict[str, Any] = {"state": before.get("state"), "left_ready": False, "entry": before}

    def check(data: dict[str, Any]) -> tuple[bool, str] | None:
        # a start's 202 comes after its server is WAITING_GPU: no STOPPED or FAILED from before is seen here
        entry = last["entry"] = entry_of(data, name) or {}
        state = entry.get("state", "?")
        if state != last["state"]:
            typer.echo(f"  {name}: {state}")
            last["state"] = state
        last["left_ready"] = last["left_ready"] or state != "READY"
        return after_command(then, Seen(state, entry.get("pid")), old_pid, bool(last["left_ready"]))

    ok, why = Watch(target, spec.host, started + bound_s).until(check, f"{name} to be {_goal(then)}")
    if not ok:
        raise _fail(f"{verb} of {name}: {why}")
    took = time.monotonic() - started
    if then == "stop":
        typer.echo(f"{name}: STOPPED after its drain ({took:.1f} s). Start it again with: model-server start {name}")
    else:
        new_pid = last["entry"].get("pid")  # the entry the check saw READY: no read after success to fail
        pids = f"pid {old_pid} -> {new_pid}" if old_pid else f"pid {new_pid}"
        typer.echo(f"{name}: READY{' again' if verb != 'start' else ''}, {pids} ({took:.1f} s)")


ServerName = Annotated[str, typer.Argument(help="The server's name in the table.")]
ConfigPath = Annotated[Path | None, typer.Option("--config", "-c", help=CONFIG_HELP)]
TimeoutS = Annotated[float | None, typer.Option("--timeout-s", min=0.1, help=TIMEOUT_HELP)]


def _goal(then: str) -> str:
    return "STOPPED" if then == "stop" else "READY again with a new pid"


@app.command()
def drain(
    server: ServerName,
    then: Annotated[
        Literal["stop", "restart"], typer.Option("--then", help="Once drained: stop (the default) or restart.")
    ] = "stop",
    config: ConfigPath = None,
    timeout_s: TimeoutS = None,
) -> None:
    """Drain a server (it finishes its requests in flight, takes no new ones), then stop or restart it."""
    _one_server(config, server, "drain", then, timeout_s)


@app.command()
def restart(
    server: ServerName,
    config: ConfigPath = None,
    timeout_s: TimeoutS = None,
) -> None:
    """Restart a server through its pipeline: drain it, restart it, wait until it is READY with a new pid."""
    _one_server(config, server, "restart", "restart", timeout_s)


@app.command()
def start(
    server: ServerName,
    config: ConfigPath = None,
    timeout_s: TimeoutS = None,
) -> None:
    """Start a server its pipeline stopped (drained, or FAILED), and wait until it is READY."""
    _one_server(config, server, "start", "restart", timeout_s)


# ---- rollout ------------------------------------------------------------------------------------------


def _check_ready(target: ControlTarget, group: str, host: str, specs: tuple[ServerSpec, ...]) -> None:
    data = first_status(target, host)
    problems = []
    for s in specs:
        entry = entry_of(data, s.name)
        if entry is None:
            problems.append(f"{s.name} is not run by the pipeline there (started with --only?)")
        elif entry.get("state") != "READY":
            problems.append(f"{s.name} is {entry.get('state')}")
    running = (data.get("rollouts") or {}).get(group) if isinstance(data.get("rollouts"), dict) else None
    if isinstance(running, dict) and running.get("state") == "running":
        problems.append(f"a rollout of the group is already running there ({running.get('id')})")
    if problems:
        raise LaunchError(
            f"cannot roll out group {group!r}: on host {host}, {'; '.join(problems)}. Nothing was restarted. Wait "
            f"until every server of the group is READY (model-server status), start or undrain the others, and run "
            f"this again."
        )


def _roll_host(target: ControlTarget, group: str, host: str, deadline_s: float) -> tuple[bool, str, int]:
    """One host's rollout, watched: (ok, why, servers restarted)."""
    plan = post(target, host, f"/groups/{group}/rollout")
    rollout_id = plan.get("id")
    servers = plan.get("servers") or []
    typer.echo(f"host {host}: rollout {rollout_id} started, one at a time: {', '.join(servers)}")
    shown = {"current": None, "restarted": 0}

    def check(data: dict[str, Any]) -> tuple[bool, str] | None:
        rollouts = data.get("rollouts") if isinstance(data.get("rollouts"), dict) else {}
        r = rollouts.get(group)
        if not isinstance(r, dict) or r.get("id") != rollout_id:
            return False, f"the pipeline on {host} no longer shows rollout {rollout_id} (was it restarted?)"
        restarted = r.get("restarted") or []
        for item in restarted[shown["restarted"] :]:
            typer.echo(
                f"  {item.get('server')}: READY again, pid {item.get('old_pid')} -> {item.get('new_pid')} "
                f"({float(item.get('took_s') or 0):.1f} s)"
            )
        shown["restarted"] = len(restarted)
        current = r.get("current") if r.get("state") == "running" else None
        if current and current != shown["current"]:
            typer.echo(f"  {current}: restarting ({len(r.get('done') or []) + 1}/{len(servers)})")
            shown["current"] = current
        if r.get("state") == "done":
            return True, ""
        if r.get("state") in ("failed", "cancelled"):
            return False, f"rollout {rollout_id} on {host} {r.get('state')}: {r.get('why')}"
        return None

    ok, why = Watch(target, host, deadline_s).until(check, f"rollout {rollout_id} on host {host}")
    return ok, why, shown["restarted"]


@app.command()
def rollout(
    group: Annotated[str, typer.Argument(help="The group's name in the table.")],
    config: ConfigPath = None,
    timeout_s: TimeoutS = None,
) -> None:
    """Restart every server of a group, one at a time (each READY again before the next), one host after another."""
    from model_server.launcher.fleet_view import hosts_of
    from model_server.launcher.rollout import per_server_bound_s

    logging.getLogger("httpx").setLevel(logging.WARNING)
    fleet = load_fleet(config)
    specs = fleet.group(group)
    if not specs:
        raise ConfigError(
            f"{fleet.source} has no group '{group}'. Its groups are: {', '.join(repr(g) for g in fleet.groups)}. "
            f"Give one of these."
        )
    target = control_target(fleet)
    hosts = hosts_of(specs)
    for host, here in hosts.items():  # every host first: nothing restarted when one cannot do it
        _check_ready(target, group, host, here)
    started = time.monotonic()
    bound_s = timeout_s if timeout_s is not None else per_server_bound_s(fleet.launch) * len(specs)
    order = "; then ".join(f"{h} ({', '.join(s.name for s in here)})" for h, here in hosts.items())
    typer.echo(f"rollout of group {group}: {len(specs)} server(s) on {len(hosts)} host(s), one at a time: {order}")
    total = 0
    for i, host in enumerate(hosts):
        try:
            ok, why, count = _roll_host(target, group, host, started + bound_s)
        except LaunchError as err:
            if i == 0:
                raise
            raise _fail(f"{err} The hosts before it were rolled out: {', '.join(list(hosts)[:i])}.") from None
        total += count
        if not ok:
            raise _fail(why)
        typer.echo(f"host {host}: done")
    typer.echo(
        f"rollout of group {group} done: {total} server(s) restarted on {len(hosts)} host(s) in "
        f"{time.monotonic() - started:.1f} s"
    )
