"""Benchmark 4: how long building a group takes as it grows (N = 1, 4, 8, 16 replicas).

Building a group probes every replica with a small request. The original
script probed servers one after another; ModelServer probes them
concurrently. For each N: the wall time of ModelServer(fleet).warmup()
(threads), of AsyncModelServer(fleet).warmup() (asyncio), and of probing the
N replicas one at a time (the original's order), each as a ratio to the
one-replica build. Medians of REPEATS builds, every one from a new client.

    python benchmarks/group_build.py
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import _common

from model_server.client import ModelServer
from model_server.client.async_driver import AsyncModelServer
from model_server.client.probe import probe_group
from model_server.config import load_fleet

SIZES = (1, 4, 8, 16)
REPEATS = 5
SIM_ARGS = ("--ttft-ms", "20", "--tpot-ms", "2", "--ttft-per-prompt-token-ms", "0")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


async def async_build(fleet) -> None:
    async with AsyncModelServer(fleet) as client:
        await client.warmup(["8"])


def sync_build(fleet) -> None:
    client = ModelServer(fleet)
    try:
        client.warmup(["8"])
    finally:
        client.close()


def sequential_probe(fleet) -> None:
    for spec in fleet.servers:
        (result,) = probe_group([spec], fleet.client.initial_latency_s)
        if getattr(result, "error", None):
            raise RuntimeError(f"probe of {spec.name} failed: {result}")


def main() -> None:
    _common.quiet_logs()
    started = time.monotonic()
    medians: dict[str, dict[int, float]] = {
        "ModelServer (threads)": {},
        "AsyncModelServer": {},
        "one at a time (original)": {},
    }
    with ExitStack() as stack:
        sims = _common.start_sims(stack, max(SIZES), SIM_ARGS)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for n in SIZES:
            path = tmp / f"fleet{n}.toml"
            path.write_text(_common.sim_fleet(sims[:n], client={"initial_latency_s": 5.0}), encoding="utf-8")
            fleet = load_fleet(path)
            sync_build(fleet)  # first use: imports, connections
            samples = {name: [] for name in medians}
            for _ in range(REPEATS):
                samples["ModelServer (threads)"].append(timed(lambda: sync_build(fleet)))
                samples["AsyncModelServer"].append(timed(lambda: asyncio.run(async_build(fleet))))
                samples["one at a time (original)"].append(timed(lambda: sequential_probe(fleet)))
            for name, values in samples.items():
                medians[name][n] = statistics.median(values)
    rows, ratios = [], {}
    for name, by_n in medians.items():
        ratios[name] = {n: by_n[n] / by_n[1] for n in SIZES}
        rows.append([name, *(by_n[n] * 1000 for n in SIZES), *(ratios[name][n] for n in SIZES[1:])])
    _common.table(
        f"group build: probing N replicas (sims with 20 ms TTFT), median of {REPEATS}",
        ["build", *(f"N={n} ms" for n in SIZES), *(f"N={n} / N=1" for n in SIZES[1:])],
        rows,
    )
    _common.save(
        "group_build",
        {
            "sizes": list(SIZES),
            "repeats": REPEATS,
            "sim_args": list(SIM_ARGS),
            "wall_s": time.monotonic() - started,
            "median_s": {k: {str(n): v for n, v in d.items()} for k, d in medians.items()},
            "ratio_to_one": {k: {str(n): v for n, v in d.items()} for k, d in ratios.items()},
        },
    )


if __name__ == "__main__":
    main()
