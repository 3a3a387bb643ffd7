"""`model-server bench`: load a group (through ModelServer) or one URL, report latency, inject faults.

The client's own log lines (one WARNING per failover or breaker change) go to the run's log file,
not the terminal, and are counted live in the progress display and per fault in the summary;
``--verbose`` puts them back on the terminal.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import typer

from model_server.bench.options import BenchOptions
from model_server.cli._app import DEFAULT_FLEET_HELP, app

_TICK_S = 0.25
_OPTIONS = BenchOptions()  # the defaults of every option below
# Every option's help, by its flag, in the order --help lists them (their defaults are BenchOptions').
_HELP = {
    "--config": DEFAULT_FLEET_HELP,
    "--group": "Load this group of the fleet, through ModelServer.",
    "--url": "Load one server directly: its OpenAI base URL, e.g. http://127.0.0.1:30000/v1.",
    "--model": "With --url: the model name the server answers to.",
    "--api-key-env": "With --url: the NAME of the environment variable holding the API key.",
    "--transport": (
        "With --url: sdk (openai SDK, max_retries=0; ~5 ms CPU per request) or raw (lean HTTP/1.1 client, ~1 ms: "
        "use it above ~100 requests/s on small machines)."
    ),
    "--rate": "Open loop: requests per second.",
    "--concurrency": "Closed loop: requests in flight.",
    "--duration": "Seconds of load (open loop: N = rate x duration).",
    "--requests": "Number of requests.",
    "--prompt-len": "Prompt words: N (fixed) or A:B (uniform).",
    "--output-len": "Max output tokens: N (fixed) or A:B (uniform).",
    "--dataset": 'JSONL, one {"prompt": ..., "output_len": ...} per line (cycled).',
    "--arrival": "Open-loop arrivals: poisson, gamma, constant or trace.",
    "--cv": "--arrival gamma: coefficient of variation of the gaps (>1 bursty).",
    "--trace": "--arrival trace: file of arrival times in seconds, one per line.",
    "--slo-ttft": "SLO: time to first token, seconds.",
    "--slo-tpot": (
        "SLO: time per output token, seconds. Attainment = requests that succeeded within every objective / "
        "requests sent; a one-token answer has no TPOT and cannot miss it."
    ),
    "--fault": (
        "'<time> <action> <server> (value) (for D)', e.g. '10s kill chat-1', '5s 500s chat-2 0.5 for 3s'. Repeatable."
    ),
    "--status-file": "Launch pipeline status file for pids (default: the fleet's).",
    "--timeout": "Per-request timeout, seconds (the whole stream).",
    "--output": "Write the result as JSON here.",
    "--plot": "Write a PNG: latency CDF and latency over time, faults marked.",
    "--seed": "Seed of arrivals and lengths.",
    "--warmup": "Requests sent (and not counted) before the clock starts.",
    "--quiet": "No progress bar.",
    "--verbose": "Show the client's log lines (failovers, breaker changes) on the terminal too.",
    "--log-file": "Where the run's log lines go (default: bench-<date>-<time>.log in the fleet's log_dir, else logs/).",
}


def _option(default: Any, flag: str, *short: str) -> Any:
    """The typer option ``flag`` (and its short form), with its help from _HELP."""
    return typer.Option(default, flag, *short, help=_HELP[flag])


async def _run_with_progress(session, show: bool) -> tuple[dict, object]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from model_server.bench.clientlog import live_status

    run = asyncio.create_task(session.run())
    if not show:
        return await run
    counters = session.progress
    total = session.plan.expected_requests
    duration = session.options.duration_s if total is None else None
    count = MofNCompleteColumn() if total else TextColumn("{task.completed:.0f}/{task.total:.0f}s")
    columns = [TextColumn("[bold]bench"), BarColumn(), count, TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
    loop = asyncio.get_running_loop()
    start = loop.time()
    with Progress(*columns, auto_refresh=False, transient=False) as bar:  # refreshed here: no extra thread
        task = bar.add_task("bench", total=total or duration or 1, status="")
        while not run.done():
            await asyncio.wait({run}, timeout=_TICK_S)
            completed = counters.done if total else min(loop.time() - start, duration or 0)
            ok = counters.done - counters.failed
            client = live_status(session.client_log)
            status = f"ok {ok}  failed {counters.failed}  in flight {counters.in_flight}"
            if client:
                status += f"  | {client}"
            bar.update(task, completed=completed, status=status)
            bar.refresh()
    return await run


@app.command()
def bench(
    config: Path | None = _option(None, "--config", "-c"),
    group: str | None = _option(None, "--group", "-g"),
    url: str | None = _option(None, "--url"),
    model: str | None = _option(None, "--model"),
    api_key_env: str | None = _option(None, "--api-key-env"),
    transport: str = _option(_OPTIONS.transport, "--transport"),
    rate: float | None = _option(None, "--rate"),
    concurrency: int | None = _option(None, "--concurrency"),
    duration: float | None = _option(None, "--duration"),
    requests: int | None = _option(None, "--requests", "-n"),
    prompt_len: str = _option(_OPTIONS.prompt_len, "--prompt-len"),
    output_len: str = _option(_OPTIONS.output_len, "--output-len"),
    dataset: Path | None = _option(None, "--dataset"),
    arrival: str = _option(_OPTIONS.arrival, "--arrival"),
    cv: float = _option(_OPTIONS.cv, "--cv"),
    trace: Path | None = _option(None, "--trace"),
    slo_ttft: float | None = _option(None, "--slo-ttft"),
    slo_tpot: float | None = _option(None, "--slo-tpot"),
    fault: list[str] | None = _option(None, "--fault"),
    status_file: Path | None = _option(None, "--status-file"),
    timeout: float = _option(_OPTIONS.timeout_s, "--timeout"),
    output: Path | None = _option(None, "--output", "-o"),
    plot: Path | None = _option(None, "--plot"),
    seed: int = _option(_OPTIONS.seed, "--seed"),
    warmup: int = _option(_OPTIONS.warmup_requests, "--warmup"),
    quiet: bool = _option(False, "--quiet", "-q"),
    verbose: bool = _option(False, "--verbose", "-v"),
    log_file: Path | None = _option(None, "--log-file"),
) -> None:
    """Benchmark a group or one server: TTFT, TPOT, E2E percentiles, throughput, SLO goodput,
    with faults on a schedule."""
    from rich.console import Console

    from model_server.bench.clientlog import default_log_path, divert_client_log
    from model_server.bench.report import result_lines, result_table, write_json
    from model_server.bench.session import BenchSession

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    options = BenchOptions(
        config=config,
        group=group,
        url=url,
        model=model,
        api_key_env=api_key_env,
        transport=transport,
        rate=rate,
        concurrency=concurrency,
        duration_s=duration,
        requests=requests,
        prompt_len=prompt_len,
        output_len=output_len,
        dataset=dataset,
        arrival=arrival,
        cv=cv,
        trace=trace,
        slo_ttft_s=slo_ttft,
        slo_tpot_s=slo_tpot,
        faults=tuple(fault or ()),
        status_file=status_file,
        timeout_s=timeout,
        seed=seed,
        warmup_requests=warmup,
    )
    session = BenchSession(options)
    console = Console()
    path = log_file or default_log_path(session.fleet.launch.log_dir if session.fleet is not None else "logs")
    with divert_client_log(path, keep_on_terminal=verbose) as diverted:
        result, outcome = asyncio.run(_run_with_progress(session, show=not quiet and console.is_terminal))
    console.print(result_table(result))

    def print_line(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)  # one line each, whatever the width

    for line in result_lines(result):
        print_line(line)
    if diverted.error:
        print_line(f"log: could not write {diverted.path} ({diverted.error}); --log-file chooses another file")
    elif diverted.lines:
        print_line(f"log: {diverted.path} ({diverted.lines} lines: faults, failovers, breaker changes)")
    if output is not None:
        console.print(f"result: {write_json(result, output)}")
    if plot is not None:
        from model_server.bench.plot import plot_run

        console.print(f"plot: {plot_run(outcome.records, result['faults'], plot)}")
