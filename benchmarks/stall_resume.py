"""Benchmark 5: a stream whose replica stalls mid-answer, resumed on another replica.

Two simulated replicas, both of which stop sending after 8 tokens of every
stream (`stall_after_tokens`: the connection stays open, nothing more
comes). A 20-token stream therefore stalls twice, wherever it is routed:
each time the stall deadline fires, the stream continues on another replica
from the text received (`continue_final_message`; the continuation starts a
new count of 8), and the caller's iterator goes on; the third segment
finishes. Streams go through ModelServer with the default client policy
but for one knob: the breakers never open (`breaker_failures = 1000`), or
both replicas would be shut out after five stalls. Measured on the caller's
side: the time from the last token before each stall to the first token
after it (p50, p99), and whether every text equals the answer of an
unfaulted replica.

    python benchmarks/stall_resume.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import _common

from model_server.client import ModelServer
from model_server.config import load_fleet

STREAMS = 40
CONCURRENCY = 4
STALL_AFTER = 8
TOKENS = 20
SIM_ARGS = ("--ttft-ms", "40", "--tpot-ms", "4")
CLIENT = {"breaker_failures": 1000}  # everything else: the defaults


def main() -> None:
    _common.quiet_logs()
    started = time.monotonic()
    with ExitStack() as stack:
        sims = _common.start_sims(stack, 2, SIM_ARGS)
        fleet_path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "fleet.toml"
        fleet_path.write_text(_common.sim_fleet(sims, client=CLIENT), encoding="utf-8")
        ms = stack.enter_context(ModelServer(load_fleet(fleet_path)))
        ms.warmup()
        prompts = [[{"role": "user", "content": f"Stream number {i}, please."}] for i in range(STREAMS)]
        expected = [ms.chat("8", p, max_tokens=TOKENS, temperature=0).choices[0].message.content for p in prompts]
        for sim in sims:
            sim.set_faults(stall_after_tokens=STALL_AFTER)

        def one(i: int) -> tuple[list[float], bool, int]:
            arrivals, pieces = [], []
            stream = ms.stream_chat("8", prompts[i], max_tokens=TOKENS, temperature=0)
            for piece in stream:
                pieces.append(piece)
                arrivals.append(time.monotonic())
            stalls = [k for k in range(STALL_AFTER, len(arrivals), STALL_AFTER)][: stream.resumes]
            return [arrivals[k] - arrivals[k - 1] for k in stalls], "".join(pieces) == expected[i], stream.resumes

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(one, range(STREAMS)))
        stall_s = ms.policy.stall_timeout_floor_s
    gaps = sorted(g for gs, _, _ in results for g in gs)
    identical = sum(ok for _, ok, _ in results)
    resumed = sum(r for _, _, r in results)
    p50 = statistics.median(gaps) if gaps else None
    p99 = gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else None
    _common.table(
        f"stall and resume: {STREAMS} streams of {TOKENS} tokens, {CONCURRENCY} at a time; every replica stalls after "
        f"{STALL_AFTER} tokens of a stream; default client policy but breaker_failures = 1000 (stall deadline floor {stall_s:g} s)",
        ["streams", "resumes", "texts identical to unfaulted", "stall -> next chunk p50 ms", "p99 ms", "max ms"],
        [[STREAMS, resumed, identical, _common.ms(p50), _common.ms(p99), _common.ms(gaps[-1] if gaps else None)]],
    )
    _common.save(
        "stall_resume",
        {
            "streams": STREAMS,
            "concurrency": CONCURRENCY,
            "tokens": TOKENS,
            "stall_after_tokens": STALL_AFTER,
            "sim_args": list(SIM_ARGS),
            "client": CLIENT,
            "stall_deadline_floor_s": stall_s,
            "resumes": resumed,
            "identical": identical,
            "stall_to_next_chunk_s": {"p50": p50, "p99": p99, "max": gaps[-1] if gaps else None},
            "wall_s": time.monotonic() - started,
        },
    )


if __name__ == "__main__":
    main()
