"""Benchmark 5: is the load generator itself accurate at 200 requests/s on this machine?

Open-loop Poisson arrivals at 200/s for 6 s against one zero-latency
simulated server, through each transport of `model-server bench --url`:
`raw` (the generator's own HTTP/1.1 client) and `sdk` (openai AsyncOpenAI).
Reported: achieved rate (sent / time of the last send) and its steady-state
ratio, the send lag (sent - scheduled) percentiles, and the CPU each side
spends per request. The generator is accurate when the achieved rate is
within 2% of the asked one.

    python benchmarks/generator_accuracy.py
"""

from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack

import _common
import psutil

from model_server.bench import (
    LengthRange,
    LoadPlan,
    OpenAITarget,
    RequestSource,
    build_result,
    build_schedule,
    run_load,
)
from model_server.bench.runner import warm_up
from model_server.bench.targets import RawTarget

RATE = 200.0
REQUESTS = 1200


async def one_run(sim, make) -> dict:
    target = make()
    source = RequestSource(prompt_len=LengthRange(16, 16), output_len=LengthRange(4, 4))
    await warm_up(target, source, 4, 10.0)
    me, server = psutil.Process(), psutil.Process(sim.pid)
    c0, s0 = sum(me.cpu_times()[:2]), sum(server.cpu_times()[:2])
    schedule = build_schedule("poisson", rate=RATE, requests=REQUESTS, seed=1)
    outcome = await run_load(target, source, LoadPlan(schedule=schedule, request_timeout_s=30.0))
    c1, s1 = sum(me.cpu_times()[:2]), sum(server.cpu_times()[:2])
    await target.aclose()
    result = build_result(outcome, asked_rate=RATE)
    result["client_cpu_ms_per_request"] = (c1 - c0) / REQUESTS * 1000
    result["server_cpu_ms_per_request"] = (s1 - s0) / REQUESTS * 1000
    return result


def main() -> None:
    _common.quiet_logs()
    started = time.monotonic()
    results = {}
    with ExitStack() as stack:
        (sim,) = _common.start_sims(stack, 1, _common.ZERO_LATENCY)
        makers = {
            "raw": lambda: RawTarget(sim.base_url, sim.model_name, timeout_s=30.0),
            "sdk": lambda: OpenAITarget(sim.base_url, sim.model_name, timeout_s=30.0),
        }
        for name, make in makers.items():
            results[name] = asyncio.run(one_run(sim, make))
    rows = []
    for name, r in results.items():
        lag = r["dispatch_lag_s"]
        rows.append(
            [
                name,
                r["achieved_rate"],
                f"{(r['achieved_rate'] / RATE - 1) * 100:+.2f}%",
                r["steady_rate_ratio"],
                _common.ms(lag["p50"]),
                _common.ms(lag["p99"]),
                _common.ms(lag["max"]),
                _common.ms(r["e2e_s"]["p50"]),
                r["client_cpu_ms_per_request"],
                r["server_cpu_ms_per_request"],
                r["failed"],
            ]
        )
    _common.table(
        f"generator accuracy: Poisson {RATE:g} req/s x {REQUESTS} against a zero-latency sim",
        [
            "transport",
            "achieved /s",
            "vs asked",
            "steady ratio",
            "lag p50 ms",
            "lag p99 ms",
            "lag max ms",
            "E2E p50 ms",
            "client CPU ms/req",
            "sim CPU ms/req",
            "failed",
        ],
        rows,
    )
    _common.save(
        "generator_accuracy",
        {
            "rate": RATE,
            "requests": REQUESTS,
            "wall_s": time.monotonic() - started,
            "results": {k: {x: y for x, y in v.items() if x != "run"} for k, v in results.items()},
        },
    )


if __name__ == "__main__":
    main()
