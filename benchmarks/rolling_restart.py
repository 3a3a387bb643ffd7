"""Benchmark: a rolling restart of a group under load, against the same restarts done as kill -9 (issue 12).

Three simulated replicas of one chat group, started and watched by the real
launch pipeline (`python serve_llm_pipeline.py --config <fleet>`, a
subprocess) with its control API on. Steady open-loop load through
AsyncModelServer: non-streamed chat (the original application's call shape)
plus a few streams. Each scenario runs on a fresh pipeline:

- rollout: at 10 s, ``POST /groups/8/rollout`` (each replica in turn is
  drained, restarted and READY again under a new pid before the next);
- kill -9: at 10 s, kill -9 each replica in turn, the next once the pipeline
  has the previous READY again under a new pid; the client fails over;
- kill -9, client not listening: the same, with ``client.control_refresh_s = 0``
  (the client routes on its own probes and failures only).

In the first two the client reads the control API (every
``client.control_refresh_s``, 1 s, as a user would have it). Reported per
scenario: requests sent, failed requests (the goal for the rollout is 0), p50
and p99 latency before / during / after the restarts (by send time; "during"
runs from the first restart asked to the last replica READY again), the
client's failovers and extra attempts (its Prometheus counters), stream
resumes, and how long the restarts took.

    python benchmarks/rolling_restart.py [--scenarios rollout,kill,kill-blind]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
import httpx
import psutil
from prometheus_client import CollectorRegistry

from model_server.bench import build_schedule
from model_server.bench.stats import summarize_values
from model_server.client.async_driver import AsyncModelServer
from model_server.config import load_fleet
from model_server.sim.process import free_port

ROOT = Path(__file__).resolve().parent.parent
GROUP = "8"
NAMES = ["r1", "r2", "r3"]
RATE = 20.0  # non-streamed chat, the original application's call shape
STREAM_RATE = 2.0  # a few streams alongside
BEFORE_S = 10.0  # load before the first restart
AFTER_S = 10.0  # load after the last replica is READY again
RESTARTS_BOUND_S = 90.0  # all three restarts, at most (the run fails past this)
REQUEST_TIMEOUT_S = 30.0  # per request, on top of the client's own bounds
PROMPT = "lorem " * 60
MAX_TOKENS = 32
KEY_ENV = "MS_BENCH_ROLLING_RESTART_KEY"
SIM_ARGS = _common.PIPELINE_SIM_ARGS
LAUNCH = {
    **_common.PIPELINE_LAUNCH,
    "control_key_env": KEY_ENV,
    "drain_notice_s": 2.0,  # the default: two of the client's reads of the control API
    "drain_timeout_s": 20,
}
CLIENT = _common.PIPELINE_CLIENT  # benchmarks/failover.py's; control_refresh_s stays at its default (1 s)
SCENARIOS = {  # name -> (how the replicas restart, client.control_refresh_s or None for the default)
    "rollout": ("rollout", None),
    "kill": ("kill", None),
    "kill-blind": ("kill", 0.0),
}


@dataclass
class Record:
    sent_s: float
    done_s: float | None = None
    ok: bool = False
    error: str | None = None

    @property
    def e2e_s(self) -> float | None:
        return None if self.done_s is None else self.done_s - self.sent_s


@dataclass
class Pipeline:
    """One pipeline subprocess and everything it started (seen through psutil), killed by :meth:`close`."""

    proc: subprocess.Popen
    api: httpx.AsyncClient
    log_path: Path
    seen: set[int] = field(default_factory=set)

    def note_children(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.seen.update(p.pid for p in psutil.Process(self.proc.pid).children(recursive=True))

    async def servers(self) -> dict[str, dict]:
        answer = await self.api.get("/status")
        answer.raise_for_status()
        return {s["name"]: s for s in answer.json()["servers"]}

    async def rollout(self) -> dict | None:
        answer = await self.api.get("/status")
        answer.raise_for_status()
        return answer.json().get("rollouts", {}).get(GROUP)

    async def wait_ready(self, timeout_s: float, old_pids: dict[str, int | None] | None = None) -> dict[str, dict]:
        """Every server READY (under a pid other than ``old_pids``'), or RuntimeError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        servers: dict[str, dict] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the pipeline exited ({self.proc.returncode}); see {self.log_path}")
            self.note_children()
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                servers = await self.servers()
                if all(
                    servers.get(n, {}).get("state") == "READY"
                    and (old_pids is None or servers[n].get("pid") != old_pids.get(n))
                    for n in (old_pids or NAMES)
                ):
                    return servers
            await asyncio.sleep(0.05)
        raise RuntimeError(f"not READY after {timeout_s:g} s: {servers}; see {self.log_path}")

    async def close(self) -> int | None:
        """SIGTERM (the pipeline stops its engines), SIGKILL after 30 s; then kill anything it left."""
        self.note_children()
        with contextlib.suppress(Exception):
            await self.api.aclose()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, 10)
        for pid in self.seen:
            for kill in (os.killpg, os.kill):  # the engine's group, then one that left it
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(pid, signal.SIGKILL)
        return self.proc.returncode


class StatusWatch:
    """Polls GET /status every 0.1 s during the load; keeps (time, server, state, pid) changes."""

    def __init__(self, pipeline: Pipeline, start: float) -> None:
        self.pipeline, self.start = pipeline, start
        self.changes: list[tuple[float, str, str, int | None]] = []
        self.errors = 0
        self._last: dict[str, tuple[str, int | None]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        polls = 0
        while not stop.is_set():
            try:
                servers = await self.pipeline.servers()
            except (httpx.HTTPError, ValueError, KeyError):
                self.errors += 1
            else:
                now = time.monotonic() - self.start
                for name, s in servers.items():
                    seen = (s.get("state"), s.get("pid"))
                    if self._last.get(name) != seen:
                        self._last[name] = seen
                        self.changes.append((now, name, seen[0], seen[1]))
            polls += 1
            if polls % 5 == 0:
                self.pipeline.note_children()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)

    def out_of_service(self) -> dict[str, float]:
        """Per server, the seconds it spent out of READY during the run (from the polls)."""
        out: dict[str, float] = {}
        left: dict[str, float] = {}
        for t, name, state, _pid in self.changes:
            if state != "READY" and name not in left:
                left[name] = t
            elif state == "READY" and name in left:
                out[name] = out.get(name, 0.0) + t - left.pop(name)
        return {n: round(s, 3) for n, s in sorted(out.items())}


async def start_pipeline(tmp: Path, scenario: str, key: str) -> tuple[Pipeline, Path]:
    control_port = free_port()
    ports = [free_port() for _ in NAMES]
    launch = dict(
        LAUNCH,
        control_port=control_port,
        log_dir=str(tmp / "logs"),
        status_file=str(tmp / "run" / "status.json"),
    )
    text = _common.fleet_text(
        [(n, p, "sim/llama-8b", "chat") for n, p in zip(NAMES, ports)],
        client=CLIENT,
        launch=launch,
        group=GROUP,
        args=SIM_ARGS,
    )
    # give each server its own simulated GPU
    text = text.replace('served_model_name = "chat"\n', 'served_model_name = "chat"\ngpus = [GPU]\n')
    for i in range(len(NAMES)):
        text = text.replace("gpus = [GPU]", f"gpus = [{i}]", 1)
    fleet_path = tmp / f"{scenario}.toml"
    fleet_path.write_text(text, encoding="utf-8")
    log_path = tmp / f"pipeline-{scenario}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "serve_llm_pipeline.py"), "--config", str(fleet_path)],
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, KEY_ENV: key},
        )
    api = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{control_port}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=httpx.Timeout(5.0),
        trust_env=False,
    )
    return Pipeline(proc, api, log_path), fleet_path


async def open_loop(
    call: Any, rate: float, seed: int, start: float, stop: asyncio.Event, records: list[Record], tasks: set
) -> None:
    """Poisson arrivals at ``rate`` from ``start`` until ``stop``; each request its own task (never awaited here)."""
    longest = BEFORE_S + RESTARTS_BOUND_S + AFTER_S + 5
    schedule = build_schedule("poisson", rate=rate, requests=math.ceil(rate * longest), seed=seed)

    async def one(record: Record) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await call()
            record.ok = True
        except Exception as err:  # noqa: BLE001 - every failed request is a figure, not a crash
            record.error = f"{type(err).__name__}: {str(err).strip()[:160]}"
        record.done_s = time.monotonic() - start

    for offset in schedule.offsets_s:
        delay = start + offset - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return
        record = Record(time.monotonic() - start)
        records.append(record)
        task = asyncio.create_task(one(record))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def restart_by_rollout(pipeline: Pipeline) -> dict[str, Any]:
    answer = await pipeline.api.post(f"/groups/{GROUP}/rollout")
    if answer.status_code != 202:
        raise RuntimeError(f"POST /groups/{GROUP}/rollout: HTTP {answer.status_code}: {answer.text}")
    deadline = time.monotonic() + RESTARTS_BOUND_S
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            rollout = await pipeline.rollout()
            if rollout is not None and rollout["state"] != "running":
                if rollout["state"] != "done":
                    raise RuntimeError(f"the rollout ended {rollout['state']}: {rollout['why']}")
                return {
                    "pipeline_elapsed_s": rollout["elapsed_s"],
                    "per_server_s": {r["server"]: r["took_s"] for r in rollout["restarted"]},
                }
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the rollout did not end within {RESTARTS_BOUND_S:g} s; see {pipeline.log_path}")


async def restart_by_kill(pipeline: Pipeline) -> dict[str, Any]:
    per_server: dict[str, float] = {}
    deadline = time.monotonic() + RESTARTS_BOUND_S
    for name in NAMES:
        pid = (await pipeline.servers())[name]["pid"]
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        await pipeline.wait_ready(max(1.0, deadline - time.monotonic()), {name: pid})
        per_server[name] = round(time.monotonic() - killed, 3)
    return {"per_server_s": per_server}


def counters(registry: CollectorRegistry) -> dict[str, Any]:
    """The client's Prometheus counters, summed over replicas (failures also by kind)."""
    totals: dict[str, Any] = {"requests": 0, "failovers": 0, "resumes": 0, "stalls": 0, "failures": {}}
    for metric in registry.collect():
        for sample in metric.samples:
            if not sample.name.endswith("_total"):
                continue
            name = sample.name.removeprefix("model_server_client_").removesuffix("_total")
            if name == "failures":
                kind = sample.labels.get("kind", "?")
                totals["failures"][kind] = totals["failures"].get(kind, 0) + int(sample.value)
            elif name in totals:
                totals[name] += int(sample.value)
    return totals


def answered(client: AsyncModelServer) -> dict[str, int]:
    """Attempts each replica has answered so far (probes not counted)."""
    stats = client.stats()[GROUP]
    return {n: stats[n].successes for n in NAMES}


def window(records: list[Record], lo: float, hi: float) -> dict[str, Any]:
    part = [r for r in records if lo <= r.sent_s < hi]
    e2e = summarize_values(r.e2e_s for r in part if r.ok)
    return {
        "from_s": round(lo, 3),
        "to_s": round(hi, 3),
        "requests": len(part),
        "failed": sum(not r.ok for r in part),
        "e2e_p50_s": e2e.p50,
        "e2e_p99_s": e2e.p99,
        "e2e_max_s": e2e.max,
        "slower_than_1s": sum(1 for r in part if r.ok and (r.e2e_s or 0) > 1.0),
    }


def errors_of(records: list[Record]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = r.error or "unfinished"
            out[key] = out.get(key, 0) + 1
    return out


async def run_scenario(tmp: Path, scenario: str, seed: int, key: str) -> dict[str, Any]:
    how, refresh_s = SCENARIOS[scenario]
    pipeline, fleet_path = await start_pipeline(tmp, scenario, key)
    client: AsyncModelServer | None = None
    tasks: set[asyncio.Task] = set()
    try:
        await pipeline.wait_ready(90.0)
        fleet = load_fleet(fleet_path)
        policy = fleet.client if refresh_s is None else fleet.client.model_copy(update={"control_refresh_s": refresh_s})
        registry = CollectorRegistry()
        client = AsyncModelServer(fleet, policy=policy, metrics_registry=registry)
        await asyncio.wait_for(client.warmup([GROUP]), 30)
        if policy.control_refresh_s > 0:  # the client has heard every replica READY before the load
            deadline = time.monotonic() + 15
            while client.pipeline_states() != dict.fromkeys(NAMES, "READY"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the client did not hear the pipeline: {client.pipeline_states()}")
                await asyncio.sleep(0.05)
        before_pids = {n: s["pid"] for n, s in (await pipeline.servers()).items()}
        messages = [{"role": "user", "content": PROMPT}]

        async def chat() -> None:
            await client.chat(GROUP, messages, max_tokens=MAX_TOKENS, temperature=0.0)

        async def stream() -> None:
            pieces = [p async for p in client.stream_chat(GROUP, messages, max_tokens=MAX_TOKENS, temperature=0.0)]
            if not pieces:
                raise RuntimeError("an empty stream")

        stop = asyncio.Event()
        chats: list[Record] = []
        streams: list[Record] = []
        start = time.monotonic()
        watch = StatusWatch(pipeline, start)
        loads = [
            asyncio.create_task(open_loop(chat, RATE, seed, start, stop, chats, tasks)),
            asyncio.create_task(open_loop(stream, STREAM_RATE, seed + 100, start, stop, streams, tasks)),
            asyncio.create_task(watch.run(stop)),
        ]
        served = [answered(client)]  # answers per replica at each boundary: which replicas served when
        try:
            await asyncio.sleep(BEFORE_S)
            restart_from = time.monotonic() - start
            served.append(answered(client))
            restarts = await (restart_by_rollout(pipeline) if how == "rollout" else restart_by_kill(pipeline))
            restart_to = time.monotonic() - start
            served.append(answered(client))
            after = await pipeline.servers()
            await asyncio.sleep(AFTER_S)
        finally:
            stop.set()
            await asyncio.wait(loads, timeout=5)
        if tasks:  # the requests still in flight: each ends within REQUEST_TIMEOUT_S
            await asyncio.wait(list(tasks), timeout=REQUEST_TIMEOUT_S + 5)
        end = time.monotonic() - start
        served.append(answered(client))
        stats = client.stats()[GROUP]
        chat_failed = sum(not r.ok for r in chats)
        return {
            "scenario": scenario,
            "restarted_by": how,
            "client_control_refresh_s": policy.control_refresh_s,
            "chat": {
                "sent": len(chats),
                "failed": chat_failed,
                "errors": errors_of(chats),
                "windows": {
                    "before": window(chats, 0.0, restart_from),
                    "during": window(chats, restart_from, restart_to),
                    "after": window(chats, restart_to, end + 1),
                },
            },
            "streams": {"sent": len(streams), "failed": sum(not r.ok for r in streams), "errors": errors_of(streams)},
            "client": counters(registry),
            "answered_by_replica": {
                part: {n: served[i + 1][n] - served[i][n] for n in NAMES}
                for i, part in enumerate(("before", "during", "after"))
            },
            "client_stats": {
                n: {"attempts": s.attempts, "successes": s.successes, "failures": s.failures, "timeouts": s.timeouts}
                for n, s in stats.items()
            },
            "restart_from_s": round(restart_from, 3),
            "restart_to_s": round(restart_to, 3),
            "restarts_total_s": round(restart_to - restart_from, 3),
            "restarts": restarts,
            "out_of_ready_s": watch.out_of_service(),
            "state_changes": [(round(t, 3), n, s, p) for t, n, s, p in watch.changes],
            "status_poll_errors": watch.errors,
            "new_pids": all(after[n]["pid"] != before_pids[n] for n in NAMES),
        }
    finally:
        for task in list(tasks):
            task.cancel()
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 10)
        code = await pipeline.close()
        if code not in (0, None):
            print(f"note: the {scenario} pipeline exited {code}; see {pipeline.log_path}", file=sys.stderr)


def pair(w: dict[str, Any]) -> str:
    """p50/p99 of a window, in ms."""
    return " / ".join("-" if w[k] is None else f"{w[k] * 1000:.0f}" for k in ("e2e_p50_s", "e2e_p99_s"))


def print_table(results: dict[str, dict]) -> None:
    rows = []
    for name, r in results.items():
        w = r["chat"]["windows"]
        c = r["client"]
        rows.append(
            [
                name,
                r["chat"]["sent"],
                r["chat"]["failed"],
                f"{r['streams']['failed']}/{r['streams']['sent']}",
                *(pair(w[part]) for part in ("before", "during", "after")),
                _common.ms(w["during"]["e2e_max_s"]),
                c["failovers"],
                c["requests"] - r["chat"]["sent"] - r["streams"]["sent"],
                c["resumes"],
                r["restarts_total_s"],
            ]
        )
    _common.table(
        f"rolling restart: 3 sims under the launch pipeline, chat {RATE:g} req/s + streams {STREAM_RATE:g} req/s; "
        f"restarts from {BEFORE_S:g} s, load {AFTER_S:g} s after",
        [
            "scenario",
            "chat sent",
            "chat failed",
            "streams failed",
            "before p50/p99 ms",
            "during p50/p99 ms",
            "after p50/p99 ms",
            "max during ms",
            "failovers",
            "extra attempts",
            "stream resumes",
            "restarts took s",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)} (default: all)"
    )
    args = parser.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown or not chosen:
        parser.error(f"unknown scenario(s) {unknown}: give some of {', '.join(SCENARIOS)}")
    _common.quiet_logs()
    started = time.monotonic()
    load_at_start = os.getloadavg()
    key = secrets.token_hex(24)
    os.environ[KEY_ENV] = key  # the client sends it on its reads of the control API
    tmp = Path(tempfile.mkdtemp(prefix="bench-rolling-restart-"))
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}

    async def everything() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # cleans up as Ctrl-C does
        for i, scenario in enumerate(chosen):
            _common.console.print(f"[dim]{scenario}: fresh pipeline, {BEFORE_S:g} s of load, restarts, ...[/dim]")
            try:
                results[scenario] = await run_scenario(tmp / scenario, scenario, seed=i, key=key)
            except Exception as err:  # noqa: BLE001 - reported, and the other scenarios still run
                failed[scenario] = f"{type(err).__name__}: {err}"
                _common.console.print(f"[red]{scenario} did not run to the end: {failed[scenario]}[/red]")

    for scenario in chosen:
        (tmp / scenario).mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(everything())
    except BaseException:
        _common.console.print(f"the pipelines' logs are kept in {tmp}")
        raise
    if failed:
        _common.console.print(f"the pipelines' logs are kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if not results:
        sys.exit(1)
    print_table(results)
    for name, r in results.items():
        per = ", ".join(f"{n} {s:.1f} s" for n, s in r["restarts"]["per_server_s"].items())
        _common.console.print(
            f"{name}: restarts {per}; out of READY {r['out_of_ready_s']}; answered by replica after "
            f"{r['answered_by_replica']['after']}; client failures by kind {r['client']['failures'] or '{}'}; "
            f"chat errors {r['chat']['errors'] or '{}'}"
        )
    if failed:  # a partial run does not replace the results file
        _common.console.print(f"[red]not saved: {', '.join(failed)} did not run to the end[/red]")
        sys.exit(1)
    _common.save(
        "rolling_restart",
        {
            "rate": RATE,
            "stream_rate": STREAM_RATE,
            "before_s": BEFORE_S,
            "after_s": AFTER_S,
            "max_tokens": MAX_TOKENS,
            "sim_args": SIM_ARGS,
            "launch": {k: v for k, v in LAUNCH.items() if k != "control_key_env"},
            "client": CLIENT,
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": os.getloadavg(),
            "wall_s": time.monotonic() - started,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
