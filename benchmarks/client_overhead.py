"""Benchmark 1: what ModelServer costs over the plain openai SDK.

One zero-latency simulated server, closed loop at a fixed concurrency,
streaming chat: AsyncModelServer.stream_chat (routing, leases, retry plan,
metrics) against openai.AsyncOpenAI chat.completions.create on the same kind
of shared connection pool. Runs alternate (SDK, ModelServer, SDK, ...) so a
change of machine load hits both; the figures are medians over the rounds.

    python benchmarks/client_overhead.py

At concurrency 1 the latency ratios are the client's own cost; at 8 the two
processes saturate both cores, and throughput and CPU ratios are what count.

The second part is the API most users call: the sync ModelServer from
threads (``chat()``, a whole answer) against the sync ``openai.OpenAI``
client's ``chat.completions.create`` on the same sim, 1 and 8 threads in a
closed loop, alternating in the same way.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import _common
import openai
import psutil

from model_server.bench import (
    LengthRange,
    LoadPlan,
    ModelServerTarget,
    OpenAITarget,
    RequestSource,
    build_result,
    run_load,
)
from model_server.bench.runner import warm_up
from model_server.client import AsyncModelServer, ModelServer
from model_server.config import load_fleet

# 1: the machine is idle between requests, so latency ratios show the client's own cost.
# 8: client and sim saturate both cores; throughput and CPU ratios matter there, and
# latency is mostly queueing (its p50 depends on which coroutine the loop wakes first).
CONCURRENCIES = (1, 8)
REQUESTS = 600
ROUNDS = 3


async def one_run(make_target, concurrency: int) -> dict:
    target = make_target()
    source = RequestSource(prompt_len=LengthRange(32, 32), output_len=LengthRange(16, 16))
    await warm_up(target, source, 8, 10.0)
    me = psutil.Process()
    cpu0 = sum(me.cpu_times()[:2])
    outcome = await run_load(
        target, source, LoadPlan(concurrency=concurrency, requests=REQUESTS, request_timeout_s=30.0)
    )
    cpu = sum(me.cpu_times()[:2]) - cpu0
    await target.aclose()
    result = build_result(outcome, asked_rate=None)
    result["client_cpu_ms_per_request"] = cpu / REQUESTS * 1000
    return result


SYNC_REQUESTS = 600
SYNC_ROUNDS = 3
MESSAGES = [{"role": "user", "content": "word " * 28}]  # about 32 prompt tokens, as above


def sync_run(send, threads: int) -> dict:
    """``threads`` threads call ``send()`` in a closed loop until SYNC_REQUESTS calls are done."""
    for _ in range(8):
        send()
    latencies: list[float] = []
    failed = [0]
    left = [SYNC_REQUESTS]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            began = time.perf_counter()
            try:
                send()
            except Exception:
                with lock:
                    failed[0] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - began)

    me = psutil.Process()
    cpu0 = sum(me.cpu_times()[:2])
    began = time.perf_counter()
    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    wall = time.perf_counter() - began
    cpu = sum(me.cpu_times()[:2]) - cpu0
    latencies.sort()
    return {
        "e2e_p50_ms": latencies[len(latencies) // 2] * 1000,
        "e2e_p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "requests_per_s": len(latencies) / wall,
        "client_cpu_ms_per_request": cpu / SYNC_REQUESTS * 1000,
        "failed": failed[0],
    }


def sync_part(sim, fleet) -> dict:
    sdk = openai.OpenAI(base_url=sim.base_url, api_key="none", max_retries=0, timeout=30.0)
    ms = ModelServer(fleet)
    senders = {
        "openai SDK (sync)": lambda: sdk.chat.completions.create(
            model=sim.model_name, messages=MESSAGES, max_tokens=16, temperature=0
        ),
        "ModelServer (sync)": lambda: ms.chat("8", MESSAGES, max_tokens=16, temperature=0),
    }
    runs = {str(t): {name: [] for name in senders} for t in CONCURRENCIES}
    try:
        for threads in CONCURRENCIES:
            for _ in range(SYNC_ROUNDS):
                for name, send in senders.items():
                    runs[str(threads)][name].append(sync_run(send, threads))
    finally:
        ms.close()
        sdk.close()
    summary, ratios, rows = {}, {}, []
    for threads, by_client in runs.items():
        summary[threads] = {
            name: {key: statistics.median(r[key] for r in results) for key in results[0]}
            for name, results in by_client.items()
        }
        base, ours = summary[threads]["openai SDK (sync)"], summary[threads]["ModelServer (sync)"]
        ratios[threads] = {
            "p50": ours["e2e_p50_ms"] / base["e2e_p50_ms"],
            "p50_delta_ms": ours["e2e_p50_ms"] - base["e2e_p50_ms"],
            "p99": ours["e2e_p99_ms"] / base["e2e_p99_ms"],
            "throughput": ours["requests_per_s"] / base["requests_per_s"],
            "client_cpu": ours["client_cpu_ms_per_request"] / base["client_cpu_ms_per_request"],
        }
        for name, s in summary[threads].items():
            rows.append(
                [
                    threads,
                    name,
                    s["e2e_p50_ms"],
                    s["e2e_p99_ms"],
                    s["requests_per_s"],
                    s["client_cpu_ms_per_request"],
                    s["failed"],
                ]
            )
        r = ratios[threads]
        rows.append([threads, "ratio ModelServer / SDK", r["p50"], r["p99"], r["throughput"], r["client_cpu"], None])
    _common.table(
        f"sync client overhead: chat() vs chat.completions.create, {SYNC_REQUESTS} requests x {SYNC_ROUNDS} "
        f"rounds per thread count (medians)",
        ["threads", "client", "E2E p50 ms", "E2E p99 ms", "req/s", "client CPU ms/req", "failed"],
        rows,
    )
    return {
        "requests_per_run": SYNC_REQUESTS,
        "rounds": SYNC_ROUNDS,
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }


def main() -> None:
    _common.quiet_logs()
    with ExitStack() as stack:
        (sim,) = _common.start_sims(stack, 1, _common.ZERO_LATENCY)
        fleet_path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "fleet.toml"
        fleet_path.write_text(_common.sim_fleet([sim]), encoding="utf-8")
        fleet = load_fleet(fleet_path)
        makers = {
            "openai SDK": lambda: OpenAITarget(sim.base_url, sim.model_name, timeout_s=30.0, typed=True),
            "ModelServer": lambda: ModelServerTarget(AsyncModelServer(fleet), "8"),
        }
        runs: dict[str, dict[str, list[dict]]] = {str(c): {name: [] for name in makers} for c in CONCURRENCIES}
        started = time.monotonic()
        for concurrency in CONCURRENCIES:
            for _ in range(ROUNDS):
                for name, make in makers.items():
                    runs[str(concurrency)][name].append(asyncio.run(one_run(make, concurrency)))
        sync = sync_part(sim, fleet)
    rows, summary, ratios = [], {}, {}
    for concurrency, by_client in runs.items():
        summary[concurrency] = {}
        for name, results in by_client.items():
            med = lambda f: statistics.median(f(r) for r in results)  # noqa: E731
            summary[concurrency][name] = {
                "e2e_p50_ms": med(lambda r: r["e2e_s"]["p50"] * 1000),
                "e2e_p99_ms": med(lambda r: r["e2e_s"]["p99"] * 1000),
                "ttft_p50_ms": med(lambda r: r["ttft_s"]["p50"] * 1000),
                "requests_per_s": med(lambda r: r["requests_per_s"]),
                "client_cpu_ms_per_request": med(lambda r: r["client_cpu_ms_per_request"]),
                "failed": sum(r["failed"] for r in results),
            }
        base, ms = summary[concurrency]["openai SDK"], summary[concurrency]["ModelServer"]
        ratios[concurrency] = {
            "p50": ms["e2e_p50_ms"] / base["e2e_p50_ms"],
            "p99": ms["e2e_p99_ms"] / base["e2e_p99_ms"],
            "throughput": ms["requests_per_s"] / base["requests_per_s"],
            "client_cpu": ms["client_cpu_ms_per_request"] / base["client_cpu_ms_per_request"],
        }
        for name, s in summary[concurrency].items():
            rows.append(
                [
                    concurrency,
                    name,
                    s["e2e_p50_ms"],
                    s["e2e_p99_ms"],
                    s["ttft_p50_ms"],
                    s["requests_per_s"],
                    s["client_cpu_ms_per_request"],
                    s["failed"],
                ]
            )
        r = ratios[concurrency]
        rows.append(
            [concurrency, "ratio ModelServer / SDK", r["p50"], r["p99"], None, r["throughput"], r["client_cpu"], None]
        )
    _common.table(
        f"client overhead: 1 zero-latency sim, {REQUESTS} streamed requests x {ROUNDS} rounds per concurrency (medians)",
        ["concurrency", "client", "E2E p50 ms", "E2E p99 ms", "TTFT p50 ms", "req/s", "client CPU ms/req", "failed"],
        rows,
    )
    _common.save(
        "client_overhead",
        {
            "concurrencies": list(CONCURRENCIES),
            "requests_per_run": REQUESTS,
            "rounds": ROUNDS,
            "wall_s": time.monotonic() - started,
            "summary": summary,
            "ratios": ratios,
            "runs": runs,
            "sync": sync,
        },
    )


if __name__ == "__main__":
    main()
