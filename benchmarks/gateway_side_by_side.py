"""Benchmark: the plain openai SDK, ModelServer and the SGLang Model Gateway side by side on the same sims (issue 14).

Three simulated chat replicas (r1..r3, group "8") started and watched by the
real launch pipeline (`python serve_llm_pipeline.py --config <fleet>`, a
subprocess) with its control API on, so a kill -9 or a hang is healed and the
gateways' membership sync has something to follow; and
`python -m model_server gateway --config <fleet>` (a subprocess) running
four gateways of the same group, all from the same table:

- gw-sync: sync_interval_s = 1 (its workers are the READY replicas), the
  gateway's default policy (cache_aware) and health checks derived from [launch];
- gw-sync-p2: the same with policy = "power_of_two" (only in the slow-replica row);
- gw-static: sync_interval_s = 0 (a static worker list), health checks derived
  from [launch] (every 1 s, 2 failures);
- gw-bare: sync_interval_s = 0 and the gateway's own defaults for every knob the
  table would otherwise set (health checks every 60 s, 3 failures; 5 attempts;
  breaker at 10 failures for 60 s; 1800 s request timeout): a bare gateway.

The paths compared, one run, the same sims:

- sdk-r1: the plain openai SDK (AsyncOpenAI, max_retries=0, timeout 15 s)
  pointed at replica r1 only; sdk-r1-retry: the same with the SDK's default
  max_retries (2), in the fault rows;
- ModelServer: AsyncModelServer in-process on the table (listening to the
  control API every 1 s, as by default);
- gw-*: the plain openai SDK (max_retries=0, timeout 15 s) pointed at a gateway.

Measured, non-streamed chat of 32 tokens (the sims: TTFT 20 ms, 2 ms a token):

- latency p50/p99 at concurrency 1 (the paths alternate request by request),
  and the latency added relative to sdk-r1; and the time to first token of
  30 streamed chats a path (a bonus: streams through the gateway work);
- throughput (req/s) at concurrency 8 (closed loop, 2 rounds per path,
  alternating), with the CPU per request of this process (the client) and of
  the gateway's process;
- p50/p99 at 20 req/s (Poisson, 15 s a path) with r1 made 10x slower
  (POST /sim/faults slow_factor), the share of requests r1 served and how
  many took over 0.5 s;
- failed requests, requests over 1 s, p99 and max latency at 20 req/s
  (Poisson, 12 s, the same arrivals for every path) through
  kill -9 of r1 and through SIGSTOP of r1 (SIGCONT 8 s later unless the
  pipeline has replaced it by then; it is always continued, even on error),
  and when r1 left and rejoined the path (the gateway's GET /workers, the
  client's view of the control plane) against the pipeline's states.

The faulted or slowed replica is always r1, the one sdk-r1 sends to: a client
pointed at one replica has no failover, and that is the point of comparing.
No key is used anywhere (the sims, the gateways and the control API's reads
on loopback need none). The pipeline may restart r1 40 times (12 faults in a
few minutes exceed the other benchmarks' 10). About 4.5 minutes on 2 cores.

    python benchmarks/gateway_side_by_side.py [--no-bare] [--c1-requests 100] [--keep-logs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
import httpx
import openai
import psutil
from sglang_router.router_args import RouterArgs

from model_server.bench import build_schedule
from model_server.bench.stats import summarize_values
from model_server.client.async_driver import AsyncModelServer
from model_server.common.processes import listening_pid
from model_server.common.urls import same_url
from model_server.config import load_fleet
from model_server.gateway.settings import GatewaySettings, validate
from model_server.sim.process import free_port

ROOT = Path(__file__).resolve().parent.parent
GROUP = "8"
NAMES = ["r1", "r2", "r3"]
TARGET = "r1"  # the replica sdk-r1 sends to, and the one slowed, killed and stopped
MODEL = "chat"
MAX_TOKENS = 32
REQUEST_TIMEOUT_S = 15.0  # the SDK's timeout; every call of every path is also bounded by it (+1 s)
C1_REQUESTS, C1_WARMUP = 100, 10  # per path, at concurrency 1
C1_STREAMS = 30  # streamed chats per path at concurrency 1 (time to first token)
C8, C8_S, C8_ROUNDS = 8, 4.0, 2  # closed loop: concurrency, seconds a round, rounds per path
SLOW_FACTOR, SLOW_RATE, SLOW_S = 10.0, 20.0, 15.0
FAULT_RATE, FAULT_BEFORE_S, FAULT_AFTER_S = 20.0, 2.0, 10.0
STOP_FOR_S = 8.0  # SIGCONT the stopped replica this long after the SIGSTOP, if the pipeline has not replaced it
SETTLE_S = 40.0  # before each fault: every replica READY and a healthy worker of every gateway, at most
SIM_ARGS = _common.PIPELINE_SIM_ARGS
# 12 faults of r1 in a few minutes: more than PIPELINE_LAUNCH's budget (10 restarts in 300 s, then FAILED)
LAUNCH = {**_common.PIPELINE_LAUNCH, "max_restarts": 40}
CLIENT = _common.PIPELINE_CLIENT
COMMON_GATEWAY = {"startup_timeout_s": 45, "restart_backoff_initial_s": 0.1, "restart_backoff_max_s": 0.5}
BARE = {  # the gateway's own defaults for every knob settings.py would derive from the table
    k: getattr(RouterArgs, k)
    for k in (
        "retry_max_retries",
        "retry_initial_backoff_ms",
        "retry_max_backoff_ms",
        "cb_failure_threshold",
        "cb_timeout_duration_secs",
        "health_check_interval_secs",
        "health_failure_threshold",
        "request_timeout_secs",
    )
}
GATEWAYS: dict[str, dict[str, Any]] = {
    "gw-sync": {"sync_interval_s": 1},
    "gw-sync-p2": {"sync_interval_s": 1, "policy": "power_of_two"},
    "gw-static": {"sync_interval_s": 0},
    "gw-bare": {"sync_interval_s": 0, **BARE},
}
STEADY_PATHS = ["sdk-r1", "ModelServer", "gw-sync"]
SLOW_PATHS = ["sdk-r1", "ModelServer", "gw-sync", "gw-sync-p2"]
FAULT_PATHS = ["sdk-r1", "sdk-r1-retry", "ModelServer", "gw-sync", "gw-static", "gw-bare"]
FAULTS = ["kill", "stop"]


@dataclass
class Rec:
    sent_s: float  # from the start of its run
    e2e_s: float | None = None
    ok: bool = False
    error: str | None = None


@dataclass
class Route:
    """One way of sending a chat request, and the gateway it goes through (if any)."""

    name: str
    call: Callable[[int], Awaitable[None]]
    gateway: str | None = None
    stream: Callable[[], Awaitable[float]] | None = None  # one streamed chat; its time to the first text


@dataclass
class Stack:
    """The pipeline and the gateway runner (subprocesses), their HTTP clients, and what they started."""

    tmp: Path
    fleet_path: Path
    pipeline: subprocess.Popen[bytes] | None = None
    gateways: subprocess.Popen[bytes] | None = None
    control: httpx.AsyncClient | None = None
    http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=5.0, trust_env=False))
    urls: dict[str, str] = field(default_factory=dict)  # replica -> its URL
    gateway_ports: dict[str, int] = field(default_factory=dict)
    seen: dict[int, float] = field(default_factory=dict)  # pid -> create time of every process they started
    stopped: dict[int, float] = field(default_factory=dict)  # SIGSTOPped by us, until continued

    def note_children(self) -> None:
        for proc in (self.pipeline, self.gateways):
            if proc is None:
                continue
            with contextlib.suppress(psutil.Error):
                for p in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        self.seen.setdefault(p.pid, p.create_time())

    async def servers(self) -> dict[str, dict]:
        assert self.control is not None
        answer = await self.control.get("/status")
        answer.raise_for_status()
        return {s["name"]: s for s in answer.json()["servers"]}

    async def members(self, gateway: str) -> dict[str, bool] | None:
        """The gateway's workers as replica name -> healthy; None while it does not answer."""
        try:
            answer = await self.http.get(f"http://127.0.0.1:{self.gateway_ports[gateway]}/workers")
            workers = answer.json()["workers"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        out: dict[str, bool] = {}
        for w in workers if isinstance(workers, list) else []:
            if not isinstance(w, dict):
                continue
            for name, url in self.urls.items():
                if same_url(str(w.get("url", "")), url):
                    out[name] = bool(w.get("is_healthy"))
        return out

    def check_alive(self) -> None:
        for what, proc in (("the pipeline", self.pipeline), ("model-server gateway", self.gateways)):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} exited ({proc.returncode}); its output is in {self.tmp}")


def same_process(pid: int, created: float) -> psutil.Process | None:
    with contextlib.suppress(psutil.Error):
        p = psutil.Process(pid)
        if abs(p.create_time() - created) < 0.01:
            return p
    return None


def resume_stopped(stack: Stack) -> list[int]:
    """SIGCONT every process we stopped that is still the same process; the pids continued."""
    continued = []
    for pid, created in list(stack.stopped.items()):
        p = same_process(pid, created)
        if p is not None:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGCONT)
                continued.append(pid)
        stack.stopped.pop(pid, None)
    return continued


async def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float = 30.0) -> int | None:
    """SIGTERM, then SIGKILL to its process group after ``grace_s``."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)
    return proc.returncode


def table_text(tmp: Path, control_port: int, ports: list[int], gateway_ports: dict[str, tuple[int, int]]) -> str:
    launch = dict(
        LAUNCH, control_port=control_port, log_dir=str(tmp / "logs"), status_file=str(tmp / "run" / "status.json")
    )
    text = _common.fleet_text(
        [(n, p, "sim/llama-8b", MODEL) for n, p in zip(NAMES, ports)], client=CLIENT, launch=launch, group=GROUP,
        args=SIM_ARGS,
    )  # fmt: skip
    # give each server its own simulated GPU
    text = text.replace(f'served_model_name = "{MODEL}"\n', f'served_model_name = "{MODEL}"\ngpus = [GPU]\n')
    for i in range(len(NAMES)):
        text = text.replace("gpus = [GPU]", f"gpus = [{i}]", 1)
    for name, knobs in GATEWAYS.items():
        port, metrics = gateway_ports[name]
        entry = {"name": name, "group": GROUP, "port": port, "prometheus_port": metrics, **COMMON_GATEWAY, **knobs}
        text += "[[gateways]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in entry.items()) + "\n"
    return text


async def start_stack(tmp: Path) -> tuple[Stack, dict[str, GatewaySettings]]:
    ports: set[int] = set()
    while len(ports) < 4 + 2 * len(GATEWAYS):
        ports.add(free_port())
    free = sorted(ports)
    control_port, replica_ports = free[0], free[1:4]
    rest = free[4:]
    gateway_ports = {name: (rest[2 * i], rest[2 * i + 1]) for i, name in enumerate(GATEWAYS)}
    fleet_path = tmp / "fleet.toml"
    fleet_path.write_text(table_text(tmp, control_port, replica_ports, gateway_ports), encoding="utf-8")
    settings = {st.name: st for st in validate(load_fleet(fleet_path))}
    stack = Stack(tmp, fleet_path)
    stack.urls = {n: f"http://127.0.0.1:{p}" for n, p in zip(NAMES, replica_ports)}
    stack.gateway_ports = {name: p for name, (p, _m) in gateway_ports.items()}
    stack.control = httpx.AsyncClient(base_url=f"http://127.0.0.1:{control_port}", timeout=5.0, trust_env=False)
    env = {k: v for k, v in os.environ.items() if k != "MODEL_SERVER_CONTROL_KEY"}  # no key: reads need none
    with open(tmp / "pipeline.out", "ab") as out:
        stack.pipeline = subprocess.Popen(
            [sys.executable, str(ROOT / "serve_llm_pipeline.py"), "--config", str(fleet_path)], cwd=tmp, stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env,
        )  # fmt: skip
    try:
        await wait_until(stack, lambda: all_ready(stack), 90.0, "r1..r3 READY under the pipeline")
        with open(tmp / "gateway.out", "ab") as out:
            stack.gateways = subprocess.Popen(
                [sys.executable, "-m", "model_server", "gateway", "--config", str(fleet_path)], cwd=tmp, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env,
            )  # fmt: skip
        await wait_until(stack, lambda: all_members(stack), 90.0, "every gateway with r1..r3 as healthy workers")
    except BaseException:
        await close_stack(stack)
        raise
    return stack, settings


async def close_stack(stack: Stack) -> dict[str, int | None]:
    resume_stopped(stack)
    stack.note_children()
    codes = {"gateway": await stop_process(stack.gateways), "pipeline": await stop_process(stack.pipeline)}
    for pid, created in stack.seen.items():  # anything left behind, if still the same process
        p = same_process(pid, created)
        if p is not None:
            with contextlib.suppress(psutil.Error):
                p.kill()
    for client in (stack.control, stack.http):
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
    return codes


async def all_ready(stack: Stack) -> bool:
    try:
        servers = await stack.servers()
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return all(servers.get(n, {}).get("state") == "READY" for n in NAMES)


async def all_members(stack: Stack, gateways: list[str] | None = None) -> bool:
    for name in gateways or list(GATEWAYS):
        members = await stack.members(name)
        if members is None or not all(members.get(n) for n in NAMES):
            return False
    return True


async def wait_until(stack: Stack, check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Seconds until ``check()`` held; RuntimeError (saying what the pipeline and the gateways had) after ``timeout_s``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        stack.check_alive()
        stack.note_children()
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    try:
        states: Any = {n: s.get("state") for n, s in (await stack.servers()).items()}
    except (httpx.HTTPError, ValueError, KeyError) as err:
        states = repr(err)
    members = {g: await stack.members(g) for g in stack.gateway_ports}
    raise RuntimeError(
        f"not within {timeout_s:g} s: {what}; the pipeline says {states}, the gateways' workers are {members}; "
        f"the logs are in {stack.tmp}"
    )


# ---- the load ---------------------------------------------------------------------------------------------

_numbers = itertools.count()


def messages() -> list[dict[str, str]]:
    # A different start for every request: the gateway's cache_aware policy then balances (a shared prefix would
    # send every request to one worker, which is not what is compared here).
    return [{"role": "user", "content": f"question {next(_numbers)}: " + "lorem " * 20}]


def sdk_route(name: str, base_url: str, max_retries: int, gateway: str | None = None) -> tuple[Route, Any]:
    client = openai.AsyncOpenAI(
        base_url=base_url + "/v1", api_key="unused", max_retries=max_retries, timeout=REQUEST_TIMEOUT_S,
        http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
    )  # fmt: skip

    async def call(_i: int) -> None:
        reply = await client.chat.completions.create(
            model=MODEL, messages=messages(), max_tokens=MAX_TOKENS, temperature=0.0
        )
        if not (reply.choices and reply.choices[0].message.content):
            raise RuntimeError(f"an empty reply: {reply}")

    async def stream() -> float:
        started = time.monotonic()
        first = None
        chunks = await client.chat.completions.create(
            model=MODEL, messages=messages(), max_tokens=MAX_TOKENS, temperature=0.0, stream=True
        )
        async for chunk in chunks:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.monotonic() - started
        if first is None:
            raise RuntimeError("a stream with no text")
        return first

    return Route(name, call, gateway, stream), client


def model_server_route(client: AsyncModelServer) -> Route:
    async def call(_i: int) -> None:
        reply = await client.chat(GROUP, messages(), max_tokens=MAX_TOKENS, temperature=0.0)
        if not (reply.choices and reply.choices[0].message.content):
            raise RuntimeError(f"an empty reply: {reply}")

    async def stream() -> float:
        started = time.monotonic()
        first = None
        async for piece in client.stream_chat(GROUP, messages(), max_tokens=MAX_TOKENS, temperature=0.0):
            if first is None and piece:
                first = time.monotonic() - started
        if first is None:
            raise RuntimeError("a stream with no text")
        return first

    return Route("ModelServer", call, stream=stream)


async def timed(route: Route, i: int, epoch: float) -> Rec:
    started = time.monotonic()
    rec = Rec(started - epoch)
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S + 1):
            await route.call(i)
        rec.ok = True
    except Exception as err:  # noqa: BLE001 - every failed request is a figure, not a crash
        rec.error = f"{type(err).__name__}: {' '.join(str(err).split())[:110]}"
    rec.e2e_s = time.monotonic() - started
    return rec


async def open_loop(route: Route, rate: float, duration_s: float, seed: int, epoch: float) -> list[Rec]:
    """Poisson arrivals at ``rate`` for ``duration_s`` from ``epoch``; every request awaited (each is bounded)."""
    schedule = build_schedule("poisson", rate=rate, requests=math.ceil(rate * duration_s * 2) + 10, seed=seed)
    tasks: list[asyncio.Task[Rec]] = []
    try:
        for i, offset in enumerate(schedule.offsets_s):
            if offset >= duration_s:
                break
            delay = epoch + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(timed(route, i, epoch)))
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def summary(recs: list[Rec]) -> dict[str, Any]:
    e2e = summarize_values(r.e2e_s for r in recs if r.ok)
    errors: dict[str, int] = {}
    for r in recs:
        if not r.ok:
            errors[r.error or "?"] = errors.get(r.error or "?", 0) + 1
    return {
        "sent": len(recs),
        "failed": sum(not r.ok for r in recs),
        "p50_s": e2e.p50,
        "p99_s": e2e.p99,
        "max_s": e2e.max,
        "slower_than_half_s": sum(1 for r in recs if r.ok and (r.e2e_s or 0) > 0.5),
        "slower_than_1s": sum(1 for r in recs if r.ok and (r.e2e_s or 0) > 1.0),
        "errors": errors,
    }


def cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with contextlib.suppress(psutil.Error):
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    return 0.0


# ---- the measurements -------------------------------------------------------------------------------------


async def concurrency_1(routes: dict[str, Route], n: int) -> dict[str, Any]:
    """Each path in turn, one request at a time; the first C1_WARMUP of each not counted."""
    recs: dict[str, list[Rec]] = {name: [] for name in routes}
    epoch = time.monotonic()
    for i in range(C1_WARMUP + n):
        for name, route in routes.items():
            rec = await timed(route, i, epoch)
            if i >= C1_WARMUP:
                recs[name].append(rec)
    out = {name: summary(r) for name, r in recs.items()}
    base = out["sdk-r1"]
    for s in out.values():
        for q in ("p50", "p99"):
            s[f"added_{q}_s"] = None if s[f"{q}_s"] is None else s[f"{q}_s"] - base[f"{q}_s"]
    ttfts: dict[str, list[float]] = {name: [] for name in routes}
    stream_failed = dict.fromkeys(routes, 0)
    for _i in range(C1_STREAMS):
        for name, route in routes.items():
            assert route.stream is not None
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S + 1):
                    ttfts[name].append(await route.stream())
            except Exception:  # noqa: BLE001 - counted
                stream_failed[name] += 1
    for name, values in ttfts.items():
        ttft = summarize_values(values)
        out[name]["streams"] = {"sent": C1_STREAMS, "failed": stream_failed[name], "ttft_p50_s": ttft.p50,
                                "ttft_p99_s": ttft.p99}  # fmt: skip
    return out


async def concurrency_8(routes: dict[str, Route], stack: Stack) -> dict[str, Any]:
    """Closed loop at C8 for C8_S a round, the paths alternating, C8_ROUNDS rounds each."""
    totals = {name: {"ok": 0, "failed": 0, "wall_s": 0.0, "client_cpu_s": 0.0, "gateway_cpu_s": 0.0} for name in routes}
    latencies: dict[str, list[Rec]] = {name: [] for name in routes}
    me = os.getpid()
    for _round in range(C8_ROUNDS):
        for name, route in routes.items():
            gateway_pid = listening_pid(stack.gateway_ports[route.gateway]) if route.gateway else None
            recs: list[Rec] = []
            start = time.monotonic()
            stop_at = start + C8_S
            cpu0, gw0 = cpu_s(me), cpu_s(gateway_pid)

            async def worker(
                route: Route = route, recs: list[Rec] = recs, stop_at: float = stop_at, start: float = start
            ) -> None:
                i = 0
                while time.monotonic() < stop_at:
                    recs.append(await timed(route, i, start))
                    i += 1

            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(C8))), C8_S + REQUEST_TIMEOUT_S + 5)
            t = totals[name]
            t["wall_s"] += time.monotonic() - start
            t["client_cpu_s"] += cpu_s(me) - cpu0
            t["gateway_cpu_s"] += cpu_s(gateway_pid) - gw0
            t["ok"] += sum(r.ok for r in recs)
            t["failed"] += sum(not r.ok for r in recs)
            latencies[name] += recs
    out = {}
    for name, t in totals.items():
        s = summary(latencies[name])
        out[name] = {
            "req_per_s": t["ok"] / t["wall_s"],
            "ok": t["ok"],
            "failed": t["failed"],
            "p50_s": s["p50_s"],
            "p99_s": s["p99_s"],
            "client_cpu_ms_per_req": 1000 * t["client_cpu_s"] / max(1, t["ok"]),
            "gateway_cpu_ms_per_req": 1000 * t["gateway_cpu_s"] / max(1, t["ok"]) if routes[name].gateway else None,
        }
    return out


async def sim_chats(stack: Stack) -> dict[str, int]:
    out = {}
    for name, url in stack.urls.items():
        answer = await stack.http.get(url + "/sim/stats")
        out[name] = answer.json()["by_route"].get("/v1/chat/completions", 0)
    return out


async def slow_replica(routes: dict[str, Route], stack: Stack) -> dict[str, Any]:
    """Per path: r1 SLOW_FACTOR x slower, SLOW_RATE req/s for SLOW_S, then r1 back to normal."""
    out = {}
    faults = stack.urls[TARGET] + "/sim/faults"
    for name, route in routes.items():
        before = await sim_chats(stack)
        pid_before = (await stack.servers())[TARGET]["pid"]
        seen: dict[str, int] = {}  # "state" or "state, worker or not" -> samples, every 0.25 s
        stop = asyncio.Event()

        async def sample(route: Route = route, seen: dict[str, int] = seen, stop: asyncio.Event = stop) -> None:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    key = (await stack.servers())[TARGET]["state"]
                    if route.gateway:
                        members = await stack.members(route.gateway) or {}
                        key += ", a healthy worker" if members.get(TARGET) else ", not a healthy worker"
                    seen[key] = seen.get(key, 0) + 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)

        sampler = asyncio.create_task(sample())
        (await stack.http.post(faults, json={"slow_factor": SLOW_FACTOR})).raise_for_status()
        try:
            recs = await open_loop(route, SLOW_RATE, SLOW_S, 1000, time.monotonic())
        finally:
            stop.set()
            await asyncio.wait([sampler], timeout=5)
            (await stack.http.post(faults, json={"slow_factor": 1.0})).raise_for_status()
        after = await sim_chats(stack)
        served = {n: after[n] - before[n] for n in NAMES}
        s = summary(recs)
        s["served_by"] = served
        s["share_slow"] = served[TARGET] / max(1, sum(served.values()))
        s["r1_seen"] = seen
        s["r1_same_process"] = (await stack.servers())[TARGET]["pid"] == pid_before
        out[name] = s
        await wait_until(stack, lambda: r1_drained(stack), 30, f"{TARGET} running and queuing no request")
    return out


async def r1_drained(stack: Stack) -> bool:
    """Whether the slowed replica has answered all it took: its /sim/stats shows none running and none queued."""
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        stats = (await stack.http.get(stack.urls[TARGET] + "/sim/stats")).json()
        return stats["running"] == 0 and stats["queued"] == 0
    return False


class Watch:
    """During a fault: when r1 left READY and came back (pipeline), and left and rejoined the path."""

    def __init__(self, stack: Stack, route: Route, client: AsyncModelServer, old_pid: int) -> None:
        self.stack, self.route, self.client, self.old_pid = stack, route, client, old_pid
        self.fault_at: float | None = None
        self.first: dict[str, float] = {}

    def mark(self, key: str) -> None:
        if self.fault_at is not None and key not in self.first:
            self.first[key] = round(time.monotonic() - self.fault_at, 3)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.fault_at is not None:
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    s = (await self.stack.servers())[TARGET]
                    if s["state"] != "READY":
                        self.mark("pipeline_not_ready_s")
                    elif s["pid"] != self.old_pid:
                        self.mark("pipeline_ready_again_s")
                if self.route.gateway:
                    members = await self.stack.members(self.route.gateway)
                    if members is not None and not members.get(TARGET):
                        self.mark("path_out_s")
                    elif members is not None and "path_out_s" in self.first:
                        self.mark("path_back_s")
                elif self.route.name == "ModelServer":
                    state = self.client.pipeline_states().get(TARGET)
                    if state != "READY":
                        self.mark("path_out_s")
                    elif "path_out_s" in self.first:
                        self.mark("path_back_s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)


async def settle(stack: Stack, client: AsyncModelServer) -> float:
    async def everything_back() -> bool:
        return (
            await all_ready(stack)
            and await all_members(stack)
            and client.pipeline_states() == dict.fromkeys(NAMES, "READY")
        )

    what = "every replica READY, a healthy worker of every gateway, and READY in the client's view"
    return await wait_until(stack, everything_back, SETTLE_S, what)


async def fault_episode(route: Route, fault: str, stack: Stack, client: AsyncModelServer, seed: int) -> dict[str, Any]:
    settled_s = await settle(stack, client)
    server = (await stack.servers())[TARGET]
    pid = server["pid"]
    created = psutil.Process(pid).create_time()
    watch = Watch(stack, route, client, pid)
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch.run(stop))
    epoch = time.monotonic()
    load = asyncio.create_task(open_loop(route, FAULT_RATE, FAULT_BEFORE_S + FAULT_AFTER_S, seed, epoch))
    continued = None
    try:
        await asyncio.sleep(FAULT_BEFORE_S)
        watch.fault_at = time.monotonic()
        if fault == "kill":
            os.kill(pid, signal.SIGKILL)
        else:
            stack.stopped[pid] = created
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(STOP_FOR_S)
            continued = bool(resume_stopped(stack))  # False: the pipeline had replaced it already
        recs = await asyncio.wait_for(load, FAULT_AFTER_S + REQUEST_TIMEOUT_S + 10)
    finally:
        resume_stopped(stack)
        stop.set()
        await asyncio.wait([watcher], timeout=5)
        if not load.done():
            load.cancel()
    fault_at_s = FAULT_BEFORE_S
    s = summary(recs)
    s["failed_before_fault"] = sum(not r.ok for r in recs if r.sent_s < fault_at_s)
    s["timeline_s"] = watch.first
    s["settled_before_s"] = round(settled_s, 3)
    if fault == "stop":
        s["sigcont_found_it_stopped"] = continued
    return s


# ---- output -----------------------------------------------------------------------------------------------


def gateway_knobs(st: GatewaySettings) -> dict[str, Any]:
    r = st.router
    return {
        "policy": st.policy,
        "membership_sync": f"every {st.control.interval_s:g} s" if st.control else "off (static list)",
        "health_check_interval_secs": r["health_check_interval_secs"],
        "health_failure_threshold": r["health_failure_threshold"],
        "health_check_timeout_secs": st.worker_health["health_check_timeout_secs"],
        "health_success_threshold": st.worker_health["health_success_threshold"],
        "retry_max_retries": r["retry_max_retries"],
        "retry_backoff_ms": [r["retry_initial_backoff_ms"], r["retry_max_backoff_ms"]],
        "cb_failure_threshold": r["cb_failure_threshold"],
        "cb_timeout_duration_secs": r["cb_timeout_duration_secs"],
        "request_timeout_secs": r["request_timeout_secs"],
        "defaults_from_table": sorted(k for k in st.sources if k in r),
    }


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def print_tables(results: dict[str, Any]) -> None:
    knobs = results["gateways"]
    _common.table(
        "the gateways (all in front of r1..r3, one `model-server gateway` process)",
        ["gateway", "policy", "membership sync", "health checks", "attempts", "breaker", "request timeout s"],
        [
            [
                name,
                k["policy"],
                k["membership_sync"],
                f"every {k['health_check_interval_secs']} s, {k['health_check_timeout_secs']} s timeout, "
                f"out after {k['health_failure_threshold']}, back after {k['health_success_threshold']}",
                k["retry_max_retries"],
                f"{k['cb_failure_threshold']} failures, {k['cb_timeout_duration_secs']} s",
                k["request_timeout_secs"],
            ]
            for name, k in knobs.items()
        ],
    )
    c1, c8, slow = results["concurrency_1"], results["concurrency_8"], results["slow_replica"]
    steady_names = list(dict.fromkeys([*c1, *slow]))
    rows = []
    for name in steady_names:
        a, b, s = c1.get(name), c8.get(name), slow.get(name)
        rows.append(
            [
                name,
                f"{ms(a['p50_s'])} / {ms(a['p99_s'])}" if a else "-",
                f"{a['added_p50_s'] * 1000:+.1f} / {a['added_p99_s'] * 1000:+.1f}" if a else "-",
                f"{ms(a['streams']['ttft_p50_s'])} / {ms(a['streams']['ttft_p99_s'])}" if a else "-",
                b["req_per_s"] if b else None,
                f"{ms(b['p50_s'])} / {ms(b['p99_s'])}" if b else "-",
                (
                    f"{b['client_cpu_ms_per_req']:.2f}"
                    + (f" + {b['gateway_cpu_ms_per_req']:.2f}" if b["gateway_cpu_ms_per_req"] is not None else "")
                )
                if b
                else "-",
                f"{ms(s['p50_s'])} / {ms(s['p99_s'])}" if s else "-",
                f"{s['share_slow'] * 100:.0f} %" if s else "-",
                f"{s['failed']} / {s['slower_than_half_s']}" if s else "-",
            ]
        )
    _common.table(
        f"steady state: chat, {MAX_TOKENS} tokens (sims: TTFT 20 ms, 2 ms a token); sdk-r1 = the openai SDK to r1 only",
        [
            "path",
            "c=1 p50/p99 ms",
            "added vs sdk-r1 ms",
            "c=1 streams TTFT p50/p99 ms",
            f"c={C8} req/s",
            f"c={C8} p50/p99 ms",
            "CPU ms/req client + gateway",
            f"r1 {SLOW_FACTOR:g}x slower: p50/p99 ms",
            "served by r1",
            "failed / > 0.5 s",
        ],
        rows,
    )
    faults = results["faults"]
    rows = []
    for name in FAULT_PATHS:
        row: list[Any] = [name]
        for fault in FAULTS:
            f = faults.get(fault, {}).get(name)
            if f is None:
                row += ["-", "-", "-", "-"]
                continue
            t = f["timeline_s"]
            row += [
                f"{f['failed']}/{f['sent']}",
                f["slower_than_1s"],
                f"{ms(f['p99_s'])} / {ms(f['max_s'])}",
                f"{_common.fmt(t.get('path_out_s'))} / {_common.fmt(t.get('path_back_s'))}"
                if name not in ("sdk-r1", "sdk-r1-retry")
                else "-",
            ]
        rows.append(row)
    k, s = faults.get("kill", {}), faults.get("stop", {})
    ready_k = sorted(v["timeline_s"].get("pipeline_ready_again_s") or 0 for v in k.values())
    ready_s = sorted(v["timeline_s"].get("pipeline_ready_again_s") or 0 for v in s.values())
    _common.table(
        f"faults on r1 at {FAULT_RATE:g} req/s for {FAULT_BEFORE_S + FAULT_AFTER_S:g} s (fault at {FAULT_BEFORE_S:g} s); "
        f"the pipeline had r1 READY again after {_common.fmt(ready_k[0] if ready_k else None)}-"
        f"{_common.fmt(ready_k[-1] if ready_k else None)} s (kill -9), {_common.fmt(ready_s[0] if ready_s else None)}-"
        f"{_common.fmt(ready_s[-1] if ready_s else None)} s (SIGSTOP). r1 out / back: seconds from the fault until r1 "
        f"left / rejoined the gateway's healthy workers (GET /workers), or the client's view of the control plane",
        [
            "path",
            "kill -9: failed",
            "kill -9: > 1 s",
            "kill -9: p99/max ms",
            "kill -9: r1 out / back s",
            "SIGSTOP: failed",
            "SIGSTOP: > 1 s",
            "SIGSTOP: p99/max ms",
            "SIGSTOP: r1 out / back s",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--no-bare", action="store_true", help="skip the fault rows of gw-bare (the gateway's defaults)"
    )
    parser.add_argument("--c1-requests", type=int, default=C1_REQUESTS, help="requests per path at concurrency 1")
    parser.add_argument("--keep-logs", action="store_true", help="keep the pipeline's and the gateways' logs")
    args = parser.parse_args()
    fault_paths = [p for p in FAULT_PATHS if not (args.no_bare and p == "gw-bare")]
    _common.quiet_logs()
    started = time.monotonic()
    load_at_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-side-by-side-"))
    results: dict[str, Any] = {}

    async def everything() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # cleans up as Ctrl-C does
        _common.console.print("[dim]starting the pipeline (r1..r3) and four gateways ...[/dim]")
        stack, settings = await start_stack(tmp)
        closers: list[Any] = []
        client: AsyncModelServer | None = None
        try:
            results["startup_s"] = round(time.monotonic() - started, 3)
            results["gateways"] = {name: gateway_knobs(st) for name, st in settings.items()}
            fleet = load_fleet(stack.fleet_path)
            client = AsyncModelServer(fleet)
            await asyncio.wait_for(client.warmup([GROUP]), 30)
            await settle(stack, client)
            routes: dict[str, Route] = {}
            for name, url, retries, gateway in [
                ("sdk-r1", stack.urls[TARGET], 0, None),
                ("sdk-r1-retry", stack.urls[TARGET], openai.DEFAULT_MAX_RETRIES, None),
                *((g, f"http://127.0.0.1:{stack.gateway_ports[g]}", 0, g) for g in GATEWAYS),
            ]:
                routes[name], sdk = sdk_route(name, url, retries, gateway)
                closers.append(sdk)
            routes["ModelServer"] = model_server_route(client)

            _common.console.print(f"[dim]concurrency 1: {args.c1_requests} requests a path, alternating ...[/dim]")
            results["concurrency_1"] = await concurrency_1({n: routes[n] for n in STEADY_PATHS}, args.c1_requests)
            _common.console.print(f"[dim]concurrency {C8}: {C8_ROUNDS} x {C8_S:g} s a path, alternating ...[/dim]")
            results["concurrency_8"] = await concurrency_8({n: routes[n] for n in STEADY_PATHS}, stack)
            _common.console.print(
                f"[dim]r1 {SLOW_FACTOR:g}x slower: {SLOW_RATE:g} req/s for {SLOW_S:g} s a path ...[/dim]"
            )
            results["slow_replica"] = await slow_replica({n: routes[n] for n in SLOW_PATHS}, stack)
            results["faults"] = {}
            for fi, fault in enumerate(FAULTS):
                results["faults"][fault] = {}
                for name in fault_paths:
                    _common.console.print(
                        f"[dim]{'kill -9' if fault == 'kill' else 'SIGSTOP'} of r1 under {name} ...[/dim]"
                    )
                    results["faults"][fault][name] = await fault_episode(routes[name], fault, stack, client, seed=fi)
            await settle(stack, client)
        finally:
            resume_stopped(stack)
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.aclose(), 10)
            for sdk in closers:
                with contextlib.suppress(Exception):
                    await sdk.close()
            results["exit_codes"] = await close_stack(stack)

    try:
        asyncio.run(everything())
    except BaseException:
        partial = tmp / "partial_results.json"
        partial.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        _common.console.print(f"[red]did not run to the end; the logs and {partial.name} are kept in {tmp}[/red]")
        raise
    if args.keep_logs:
        _common.console.print(f"the logs are kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print_tables(results)
    _common.save(
        "gateway_side_by_side",
        {
            "max_tokens": MAX_TOKENS,
            "request_timeout_s": REQUEST_TIMEOUT_S,
            "sdk_max_retries": {"sdk-r1": 0, "sdk-r1-retry": openai.DEFAULT_MAX_RETRIES, "gw-*": 0},
            "concurrency_1_requests": args.c1_requests,
            "concurrency_8_settings": {"concurrency": C8, "seconds_a_round": C8_S, "rounds": C8_ROUNDS},
            "slow": {"factor": SLOW_FACTOR, "rate": SLOW_RATE, "seconds": SLOW_S, "replica": TARGET},
            "fault": {
                "rate": FAULT_RATE,
                "before_s": FAULT_BEFORE_S,
                "after_s": FAULT_AFTER_S,
                "sigcont_after_s": STOP_FOR_S,
                "replica": TARGET,
                "paths": fault_paths,
            },
            "sim_args": SIM_ARGS,
            "launch": LAUNCH,
            "client": CLIENT,
            "sglang_router": _router_version(),
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": os.getloadavg(),
            "wall_s": time.monotonic() - started,
            **results,
        },
    )


def _router_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang-router")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    main()
