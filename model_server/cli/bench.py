"""`model-server bench`: load a group (through ModelServer) or one URL, report latency, inject faults.

The client's own log lines (one WARNING per failover or breaker change) go to the run's log file,
not the terminal, and are counted live in the progress display and per fault in the summary;
``--verbose`` puts them back on the terminal.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import typer

from model_server.bench.options import BenchOptions
from model_server.cli._app import DEFAULT_FLEET_HELP, app

_TICK_S = 0.25
_OPTIONS = BenchOptions()  # the defaults of every option below
_TRANSPORT_HELP = (
    "With --url: sdk (openai SDK, max_retries=0; ~5 ms CPU per request) or raw (lean HTTP/1.1 client, ~1 ms: "
    "use it above ~100 requests/s on small machines)."
)
_SLO_TPOT_HELP = (
    "SLO: time per output token, seconds. Attainment = requests that succeeded within every objective / "
    "requests sent; a one-token answer has no TPOT and cannot miss it."
)
_FAULT_HELP = (
    "'<time> <action> <server> (value) (for D)', e.g. '10s kill chat-1', '5s 500s chat-2 0.5 for 3s'. Repeatable."
)
_VERBOSE_HELP = "Show the client's log lines (failovers, breaker changes) on the terminal too."
_LOG_FILE_HELP = "Where the run's log lines go (default: bench-<date>-<time>.log in the fleet's log_dir, else logs/)."


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
    config: Path | None = typer.Option(None, "--config", "-c", help=DEFAULT_FLEET_HELP),
    group: str | None = typer.Option(None, "--group", "-g", help="Load this group of the fleet, through ModelServer."),
    url: str | None = typer.Option(
        None, "--url", help="Load one server directly: its OpenAI base URL, e.g. http://127.0.0.1:30000/v1."
    ),
    model: str | None = typer.Option(None, "--model", help="With --url: the model name the server answers to."),
    api_key_env: str | None = typer.Option(
        None, "--api-key-env", help="With --url: the NAME of the environment variable holding the API key."
    ),
    transport: str = typer.Option(_OPTIONS.transport, "--transport", help=_TRANSPORT_HELP),
    rate: float | None = typer.Option(None, "--rate", help="Open loop: requests per second."),
    concurrency: int | None = typer.Option(None, "--concurrency", help="Closed loop: requests in flight."),
    duration: float | None = typer.Option(None, "--duration", help="Seconds of load (open loop: N = rate x duration)."),
    requests: int | None = typer.Option(None, "--requests", "-n", help="Number of requests."),
    prompt_len: str = typer.Option(
        _OPTIONS.prompt_len, "--prompt-len", help="Prompt words: N (fixed) or A:B (uniform)."
    ),
    output_len: str = typer.Option(
        _OPTIONS.output_len, "--output-len", help="Max output tokens: N (fixed) or A:B (uniform)."
    ),
    dataset: Path | None = typer.Option(
        None, "--dataset", help='JSONL, one {"prompt": ..., "output_len": ...} per line (cycled).'
    ),
    arrival: str = typer.Option(
        _OPTIONS.arrival, "--arrival", help="Open-loop arrivals: poisson, gamma, constant or trace."
    ),
    cv: float = typer.Option(
        _OPTIONS.cv, "--cv", help="--arrival gamma: coefficient of variation of the gaps (>1 bursty)."
    ),
    trace: Path | None = typer.Option(
        None, "--trace", help="--arrival trace: file of arrival times in seconds, one per line."
    ),
    slo_ttft: float | None = typer.Option(None, "--slo-ttft", help="SLO: time to first token, seconds."),
    slo_tpot: float | None = typer.Option(None, "--slo-tpot", help=_SLO_TPOT_HELP),
    fault: list[str] | None = typer.Option(None, "--fault", help=_FAULT_HELP),
    status_file: Path | None = typer.Option(
        None, "--status-file", help="Launch pipeline status file for pids (default: the fleet's)."
    ),
    timeout: float = typer.Option(
        _OPTIONS.timeout_s, "--timeout", help="Per-request timeout, seconds (the whole stream)."
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the result as JSON here."),
    plot: Path | None = typer.Option(
        None, "--plot", help="Write a PNG: latency CDF and latency over time, faults marked."
    ),
    seed: int = typer.Option(_OPTIONS.seed, "--seed", help="Seed of arrivals and lengths."),
    warmup: int = typer.Option(
        _OPTIONS.warmup_requests, "--warmup", help="Requests sent (and not counted) before the clock starts."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=_VERBOSE_HELP),
    log_file: Path | None = typer.Option(None, "--log-file", help=_LOG_FILE_HELP),
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
