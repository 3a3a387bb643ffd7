"""Benchmark 2: one replica of four gets 10x slower. What does each routing policy do to p99?

Four simulated replicas; open-loop Poisson load, streaming. For each policy
(`fastest` and `p2c` through AsyncModelServer, and a plain round robin over
the four URLs with the openai SDK), a run with all replicas healthy and, right
after it, one with replica r4 at slow_factor 10 (set through the simulator's
control route). The figure is p99 end-to-end latency degraded / healthy per
policy, the median over ROUNDS rounds (with its min and max); the share of
requests the slow replica served comes from the servers' own counters, read
after the warm-up so its requests do not count.

    python benchmarks/degraded_replica.py
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import _common

from model_server.bench import (
    LengthRange,
    LoadPlan,
    ModelServerTarget,
    RequestSource,
    RoundRobinTarget,
    build_result,
    build_schedule,
    run_load,
)
from model_server.bench.runner import warm_up
from model_server.client.async_driver import AsyncModelServer
from model_server.config import load_fleet

SIM_ARGS = ("--ttft-ms", "20", "--tpot-ms", "2", "--ttft-per-prompt-token-ms", "0")
RATE = 30.0
DURATION_S = 7.0
ROUNDS = 3
SLOW_FACTOR = 10.0
ROUTE = "/v1/chat/completions"


def served(sims) -> list[int]:
    return [s.stats()["by_route"].get(ROUTE, 0) for s in sims]


async def one_run(make_target, seed: int, sims) -> tuple[dict, list[int]]:
    """The result of one run and the requests each replica served during it (warm-up excluded)."""
    target = make_target()
    source = RequestSource(prompt_len=LengthRange(64, 64), output_len=LengthRange(32, 32), seed=seed)
    await warm_up(target, source, 4, 30.0)
    before = await asyncio.to_thread(served, sims)
    schedule = build_schedule("poisson", rate=RATE, requests=int(RATE * DURATION_S), seed=seed)
    outcome = await run_load(target, source, LoadPlan(schedule=schedule, request_timeout_s=60.0))
    counts = [a - b for a, b in zip(await asyncio.to_thread(served, sims), before)]
    await target.aclose()
    return build_result(outcome, asked_rate=RATE), counts


def main() -> None:
    _common.quiet_logs()
    started = time.monotonic()
    rounds: dict[str, list[dict[str, dict]]] = {}
    with ExitStack() as stack:
        sims = _common.start_sims(stack, 4, SIM_ARGS)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        fleets = {}
        for policy in ("fastest", "p2c"):
            path = tmp / f"{policy}.toml"
            path.write_text(
                _common.sim_fleet(sims, client={"routing": policy, "initial_latency_s": 3.0}), encoding="utf-8"
            )
            fleets[policy] = load_fleet(path)
        makers = {
            "fastest": lambda: ModelServerTarget(AsyncModelServer(fleets["fastest"]), "8"),
            "p2c": lambda: ModelServerTarget(AsyncModelServer(fleets["p2c"]), "8"),
            "round robin": lambda: RoundRobinTarget(
                [(f"r{i + 1}", s.base_url) for i, s in enumerate(sims)], sims[0].model_name, timeout_s=60.0, typed=True
            ),
        }
        seed = 0
        for _ in range(ROUNDS):
            for policy, make in makers.items():  # healthy and degraded back to back: machine drift hits both
                pair = {}
                for fleet_state in ("healthy", "degraded"):
                    if fleet_state == "degraded":
                        sims[3].set_faults(slow_factor=SLOW_FACTOR)
                    result, counts = asyncio.run(one_run(make, seed, sims))
                    sims[3].reset_faults()
                    result["served_per_replica"] = counts
                    result["slow_replica_share"] = counts[3] / max(1, sum(counts))
                    result.pop("run", None)
                    pair[fleet_state] = result
                    seed += 1
                rounds.setdefault(policy, []).append(pair)
    rows, summary = [], {}
    for policy, pairs in rounds.items():
        med = lambda f: statistics.median(f(p) for p in pairs)  # noqa: E731
        p99_ratios = [p["degraded"]["e2e_s"]["p99"] / p["healthy"]["e2e_s"]["p99"] for p in pairs]
        summary[policy] = {
            "p99_ratio": statistics.median(p99_ratios),
            "p99_ratio_min": min(p99_ratios),
            "p99_ratio_max": max(p99_ratios),
            "p50_ratio": med(lambda p: p["degraded"]["e2e_s"]["p50"] / p["healthy"]["e2e_s"]["p50"]),
            "healthy_p50_ms": med(lambda p: p["healthy"]["e2e_s"]["p50"] * 1000),
            "healthy_p99_ms": med(lambda p: p["healthy"]["e2e_s"]["p99"] * 1000),
            "degraded_p50_ms": med(lambda p: p["degraded"]["e2e_s"]["p50"] * 1000),
            "degraded_p99_ms": med(lambda p: p["degraded"]["e2e_s"]["p99"] * 1000),
            "slow_replica_share": med(lambda p: p["degraded"]["slow_replica_share"]),
            "failed": sum(p["healthy"]["failed"] + p["degraded"]["failed"] for p in pairs),
        }
        s = summary[policy]
        rows.append(
            [
                policy,
                s["healthy_p50_ms"],
                s["healthy_p99_ms"],
                s["degraded_p50_ms"],
                s["degraded_p99_ms"],
                s["p99_ratio"],
                f"{s['p99_ratio_min']:.2f}-{s['p99_ratio_max']:.2f}",
                f"{s['slow_replica_share'] * 100:.1f}%",
                s["failed"],
            ]
        )
    _common.table(
        f"degraded replica: 4 sims, r4 x{SLOW_FACTOR:g} slower, Poisson {RATE:g} req/s, {DURATION_S:g} s per run, median of {ROUNDS} rounds",
        [
            "policy",
            "healthy p50 ms",
            "healthy p99 ms",
            "degraded p50 ms",
            "degraded p99 ms",
            "p99 degraded/healthy",
            "p99 ratio min-max",
            "served by slow r4",
            "failed",
        ],
        rows,
    )
    _common.save(
        "degraded_replica",
        {
            "rate": RATE,
            "duration_s": DURATION_S,
            "rounds": ROUNDS,
            "slow_factor": SLOW_FACTOR,
            "sim_args": list(SIM_ARGS),
            "wall_s": time.monotonic() - started,
            "summary": summary,
            "rounds_detail": rounds,
        },
    )


if __name__ == "__main__":
    main()
