"""Benchmark 3: failover under steady load with the launch pipeline running.

Three simulated replicas started and watched by the real launch pipeline
(`python serve_llm_pipeline.py --config <fleet>` as a subprocess). Steady
open-loop load through AsyncModelServer; at 10 s replica r1 gets kill -9, at
20 s replica r2 gets SIGSTOP (hung: it accepts connections and never answers)
and stays stopped until the pipeline's health checks restart it. Reported per
routing policy: failed requests (must be 0), p99 before / during / after, and
the time until each faulted replica is READY again (from the status file).

The main load is non-streamed chat (the original application's call shape;
the client streams it under the hood). A smaller streamed load runs
alongside: a stream cut after its first token is resumed on another replica
(counted apart: a stream the client could not resume would fail). Also
counted: the first-token and stall deadlines that fired on replicas that
were never faulted (each one a wasted attempt; the goal is 0).

    python benchmarks/failover.py
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common

from model_server.bench import (
    FaultInjector,
    FaultTarget,
    LengthRange,
    LoadPlan,
    ModelServerTarget,
    RequestSource,
    build_result,
    build_schedule,
    parse_faults,
    run_load,
)
from model_server.bench.injector import pid_from_status_file
from model_server.bench.stats import summarize_values, within
from model_server.client.async_driver import AsyncModelServer
from model_server.config import load_fleet
from model_server.sim.process import free_port

ROOT = Path(__file__).resolve().parent.parent
RATE = 20.0  # non-streamed chat, the original application's call shape
STREAM_RATE = 5.0  # streamed chat alongside
LOAD_S = 40.0
KILL_AT_S, STOP_AT_S = 10.0, 20.0
SIM_ARGS = _common.PIPELINE_SIM_ARGS
LAUNCH = _common.PIPELINE_LAUNCH
CLIENT = _common.PIPELINE_CLIENT


class StatusWatcher(threading.Thread):
    """Polls the status file every 50 ms; keeps (monotonic time, server, state, pid) changes."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.changes: list[tuple[float, str, str, int | None]] = []
        self._last: dict[str, tuple[str, int | None]] = {}
        self._halt = threading.Event()

    def current(self) -> dict[str, tuple[str, int | None]]:
        return dict(self._last)

    def run(self) -> None:
        while not self._halt.wait(0.05):
            try:
                servers = json.loads(self.path.read_text())["servers"]
            except (OSError, ValueError, KeyError):
                continue
            for name, entry in servers.items():
                now = (entry.get("state"), entry.get("pid"))
                if self._last.get(name) != now:
                    self._last[name] = now
                    self.changes.append((time.monotonic(), name, now[0], now[1]))

    def stop(self) -> None:
        self._halt.set()
        self.join(2)

    def wait_all_ready(self, names: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            cur = self.current()
            if all(cur.get(n, ("", None))[0] == "READY" for n in names):
                return
            time.sleep(0.1)
        raise RuntimeError(f"not all READY after {timeout_s} s: {self.current()}")

    def ready_again(self, name: str, after: float, old_pid: int | None) -> float | None:
        """Seconds from ``after`` until ``name`` is READY under a new pid."""
        for t, n, state, pid in self.changes:
            if n == name and t >= after and state == "READY" and pid != old_pid:
                return t - after
        return None


async def one_run(fleet_path: Path, status_path: Path, watcher: StatusWatcher, policy: str, seed: int) -> dict:
    fleet = load_fleet(fleet_path)
    client = AsyncModelServer(fleet)
    await client.warmup(["8"])
    chat = ModelServerTarget(client, "8", stream=False, close_client=False)
    streams = ModelServerTarget(client, "8", stream=True, close_client=False)
    names = [s.name for s in fleet.servers]
    chosen: list[str] = []

    def busiest_pid() -> int | None:
        """The replica this client has sent the most to (the worst one to lose), not faulted yet."""
        stats = client.stats()["8"]
        name = max((n for n in names if n not in chosen), key=lambda n: stats[n].successes)
        chosen.append(name)
        return pid_from_status_file(status_path, name)

    # looked up on the event loop: it reads the client's live counters (a small status file, no port scan)
    targets = {"busiest": FaultTarget("busiest", None, busiest_pid, lookup_in_thread=False)}
    injector = FaultInjector(parse_faults([f"{KILL_AT_S}s kill busiest", f"{STOP_AT_S}s stop busiest"]), targets)
    pids_before = {n: pid_from_status_file(status_path, n) for n in names}
    source = RequestSource(prompt_len=LengthRange(64, 64), output_len=LengthRange(32, 32), seed=seed)
    plan = LoadPlan(
        schedule=build_schedule("poisson", rate=RATE, requests=int(RATE * LOAD_S), seed=seed), request_timeout_s=60.0
    )
    stream_plan = LoadPlan(
        schedule=build_schedule("poisson", rate=STREAM_RATE, requests=int(STREAM_RATE * LOAD_S), seed=seed + 100),
        request_timeout_s=60.0,
    )
    start = time.monotonic()
    try:
        outcome, stream_outcome = await asyncio.gather(
            run_load(chat, source, plan, injector=injector), run_load(streams, source, stream_plan)
        )
    finally:
        await client.aclose()
    result = build_result(outcome, asked_rate=RATE)
    killed, stopped = chosen
    killed_ready = watcher.ready_again(killed, start + KILL_AT_S, pids_before[killed])
    stopped_ready = watcher.ready_again(stopped, start + STOP_AT_S, pids_before[stopped])
    result["killed"], result["stopped"] = killed, stopped
    recovered_s = max(KILL_AT_S + (killed_ready or LOAD_S), STOP_AT_S + (stopped_ready or LOAD_S))
    windows = {"before": (0.0, KILL_AT_S), "during": (KILL_AT_S, recovered_s), "after": (recovered_s, LOAD_S + 1)}
    result["windows"] = {}
    for label, (lo, hi) in windows.items():
        part = within(outcome.records, lo, hi)
        e2e = summarize_values(r.e2e_s for r in part if r.ok)
        result["windows"][label] = {
            "from_s": lo,
            "to_s": hi,
            "requests": len(part),
            "failed": sum(not r.ok for r in part),
            "e2e_p50_s": e2e.p50,
            "e2e_p99_s": e2e.p99,
            "e2e_max_s": e2e.max,
            "slower_than_1s": sum(1 for r in part if r.ok and r.e2e_s > 1.0),
        }
    streamed = build_result(stream_outcome, asked_rate=STREAM_RATE)
    result["streams"] = {
        "sent": streamed["sent"],
        "failed": streamed["failed"],
        "errors": streamed["errors"],
        "cut_after_first_token": sum(n for e, n in streamed["errors"].items() if "StreamInterruptedError" in e),
    }
    stats = client.stats()["8"]
    result["deadlines_fired_on_healthy"] = sum(s.timeouts for n, s in stats.items() if n not in (killed, stopped))
    result["deadlines_fired_on_stopped"] = stats[stopped].timeouts
    result["killed_ready_again_s"] = killed_ready
    result["stopped_ready_again_s"] = stopped_ready
    result["policy"] = policy
    return result


def main() -> None:
    _common.quiet_logs()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    status_path = tmp / "run" / "status.json"
    launch = dict(LAUNCH, log_dir=str(tmp / "logs"), status_file=str(status_path))
    ports = [free_port() for _ in range(3)]
    results = {}
    pipeline = None
    watcher = StatusWatcher(status_path)
    try:
        for policy_index, policy in enumerate(("fastest", "p2c")):
            fleet_path = tmp / f"{policy}.toml"
            text = _common.fleet_text(
                [(f"r{i + 1}", p, "sim/llama-8b", "chat") for i, p in enumerate(ports)],
                client=dict(CLIENT, routing=policy),
                launch=launch,
                args=SIM_ARGS,
            )
            # give each server its own simulated GPU
            text = text.replace('served_model_name = "chat"\n', 'served_model_name = "chat"\ngpus = [GPU]\n')
            for i in range(3):
                text = text.replace("gpus = [GPU]", f"gpus = [{i}]", 1)
            fleet_path.write_text(text, encoding="utf-8")
            if pipeline is None:
                log = open(tmp / "pipeline.log", "ab")
                pipeline = subprocess.Popen(
                    [sys.executable, str(ROOT / "serve_llm_pipeline.py"), "--config", str(fleet_path)],
                    cwd=tmp,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                watcher.start()
            watcher.wait_all_ready(["r1", "r2", "r3"], 90.0)
            results[policy] = asyncio.run(one_run(fleet_path, status_path, watcher, policy, policy_index))
            watcher.wait_all_ready(["r1", "r2", "r3"], 60.0)
    finally:
        if pipeline is not None:
            pipeline.send_signal(signal.SIGTERM)
            try:
                pipeline.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(pipeline.pid, signal.SIGKILL)
                pipeline.wait(10)
        watcher.stop()
    rows = []
    for policy, r in results.items():
        w = r["windows"]
        rows.append(
            [
                policy,
                r["sent"],
                r["failed"],
                _common.ms(w["before"]["e2e_p99_s"]),
                _common.ms(w["during"]["e2e_p99_s"]),
                _common.ms(w["during"]["e2e_max_s"]),
                w["during"]["slower_than_1s"],
                _common.ms(w["after"]["e2e_p99_s"]),
                f"{r['killed']}: {_common.fmt(r['killed_ready_again_s'])}",
                f"{r['stopped']}: {_common.fmt(r['stopped_ready_again_s'])}",
                f"{r['streams']['cut_after_first_token']}/{r['streams']['sent']}",
                r["streams"]["failed"] - r["streams"]["cut_after_first_token"],
                r["deadlines_fired_on_healthy"],
            ]
        )
    _common.table(
        f"failover: 3 sims under the launch pipeline, chat {RATE:g} req/s + streams {STREAM_RATE:g} req/s for {LOAD_S:g} s; kill -9 the busiest replica at {KILL_AT_S:g} s, SIGSTOP the next busiest at {STOP_AT_S:g} s",
        [
            "policy",
            "chat requests",
            "chat failed",
            "p99 before ms",
            "p99 during ms",
            "max during ms",
            "during >1 s",
            "p99 after ms",
            "killed: READY again s",
            "stopped: READY again s",
            "streams cut mid-answer",
            "streams failed otherwise",
            "deadlines fired on healthy",
        ],
        rows,
    )
    _common.save(
        "failover",
        {
            "rate": RATE,
            "stream_rate": STREAM_RATE,
            "load_s": LOAD_S,
            "kill_at_s": KILL_AT_S,
            "stop_at_s": STOP_AT_S,
            "launch": LAUNCH,
            "client": CLIENT,
            "wall_s": time.monotonic() - started,
            "pipeline_exit": pipeline.returncode if pipeline else None,
            "results": {p: {k: v for k, v in r.items() if k != "run"} for p, r in results.items()},
        },
    )


if __name__ == "__main__":
    main()
