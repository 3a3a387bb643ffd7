"""One ``model-server bench`` run from its options: target, plan, requests, faults -> result.

The CLI parses flags into :class:`BenchOptions`; everything that turns them
into objects (and every check of how they combine) lives here, so it is
tested without a terminal, and benchmarks reuse it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from model_server.bench.arrivals import ArrivalKind, build_schedule, read_trace
from model_server.bench.clientlog import ClientEventLog
from model_server.bench.faults import FaultEvent, parse_faults
from model_server.bench.injector import FaultInjector, FaultTarget, pid_from_status_file, pid_listening_on
from model_server.bench.lengths import RequestSource, load_dataset, parse_length
from model_server.bench.options import BenchOptions
from model_server.bench.report import build_result
from model_server.bench.runner import LoadPlan, Progress, RunOutcome, run_load, warm_up
from model_server.bench.stats import SloPolicy
from model_server.bench.targets import ModelServerTarget, OpenAITarget, RawTarget, Target
from model_server.common.urls import server_url
from model_server.errors import BenchError

__all__ = ["BenchOptions", "BenchSession", "control_url_of", "url_server_name"]


def _host_and_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def url_server_name(url: str) -> str:
    """The name faults use for the server of ``--url``: its host:port."""
    host, port = _host_and_port(url)
    return f"{host}:{port}"


def control_url_of(url: str) -> str:
    """``http://h:p/v1`` -> ``http://h:p`` (where the simulator's /sim routes live)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _key_from_env(name: str | None) -> str | None:
    if not name:
        return None
    value = os.environ.get(name, "")
    if not value:
        raise BenchError(
            f"--api-key-env names the environment variable {name}, which is unset or empty. Export it (never pass "
            "a key on the command line), or leave the option out for a server without a key."
        )
    return value


class BenchSession:
    """Builds a run from options; ``await session.run()`` returns (result, outcome)."""

    def __init__(self, options: BenchOptions, *, client_factory: Callable[[Any], Any] | None = None) -> None:
        self.options = o = options
        if (o.url is None) == (o.group is None):
            raise BenchError(
                "give the target: --group NAME (a group of the fleet, through ModelServer) or --url URL --model NAME "
                "(one server directly)."
            )
        if o.url is not None and not o.model:
            raise BenchError(
                "--url needs --model NAME: the model name the server answers to (its --served-model-name)."
            )
        if o.url is not None and urlsplit(o.url).scheme not in ("http", "https"):
            raise BenchError(
                f"--url {o.url!r} is not an http(s) URL; give the OpenAI base URL, e.g. http://127.0.0.1:30000/v1."
            )
        if o.transport not in ("sdk", "raw"):
            raise BenchError(
                f"--transport is {o.transport!r}: use sdk (the openai SDK) or raw (the generator's own lean HTTP "
                "client)."
            )
        if o.transport == "raw" and o.url is not None and urlsplit(o.url).scheme != "http":
            raise BenchError(
                f"--transport raw speaks plain http only and --url is {o.url!r}; use --transport sdk for https."
            )
        self.fleet = None
        if o.config is not None or o.group is not None:
            from model_server.common.fleet_choice import default_fleet_path
            from model_server.config import load_fleet

            path = o.config if o.config is not None else default_fleet_path()  # as ModelServer() picks
            self.fleet = load_fleet(path)
            if o.group is not None and not self.fleet.group(o.group):
                raise BenchError(
                    f"{self.fleet.source}: there is no group {o.group!r}. The groups are: "
                    f"{', '.join(self.fleet.groups)}. Use one of these with --group."
                )
        self._client_factory = client_factory
        self.plan = self._plan()
        self.source = self._source()
        self.slo = SloPolicy(o.slo_ttft_s, o.slo_tpot_s)
        self.fault_targets = self._fault_targets()
        self.events: tuple[FaultEvent, ...] = parse_faults(o.faults, servers=list(self.fault_targets))
        self.progress = Progress()
        # What the client logs (failovers, breaker changes, resumes), read during the run: group mode only.
        grouped = o.group is not None and self.fleet
        self.client_log = ClientEventLog([s.name for s in self.fleet.servers]) if grouped else None

    # ---- plan and requests --------------------------------------------------------------

    def _plan(self) -> LoadPlan:
        o = self.options
        if o.duration_s is not None and not o.duration_s > 0:
            raise BenchError(f"--duration is {o.duration_s}: give a positive number of seconds.")
        if o.concurrency is not None:
            if o.rate is not None:
                raise BenchError("give either --rate (open loop) or --concurrency (closed loop), not both.")
            return LoadPlan(
                concurrency=o.concurrency, requests=o.requests, duration_s=o.duration_s, request_timeout_s=o.timeout_s
            )
        kind = ArrivalKind(o.arrival) if o.arrival in ArrivalKind._value2member_map_ else None
        if kind is None:
            raise BenchError(f"--arrival is {o.arrival!r}: use poisson, gamma, constant or trace.")
        if kind is ArrivalKind.trace:
            if o.trace is None:
                raise BenchError(
                    "--arrival trace needs --trace FILE: a file of arrival times in seconds, one per line."
                )
            trace = read_trace(o.trace)
            requests = o.requests
            if requests is None and o.duration_s is not None:
                requests = sum(1 for t in trace if t - trace[0] <= o.duration_s)
            schedule = build_schedule(kind, rate=o.rate, requests=requests, trace=trace)
        else:
            if o.rate is None:
                raise BenchError("give the load: --rate R (open loop, requests/s) or --concurrency N (closed loop).")
            if o.requests is not None and o.duration_s is not None:
                raise BenchError("an open-loop run takes --requests N or --duration S, not both (N = rate x duration).")
            if o.requests is None and o.duration_s is None:
                raise BenchError("give how long: --duration S or --requests N.")
            requests = o.requests if o.requests is not None else max(1, round(o.rate * o.duration_s))
            schedule = build_schedule(kind, rate=o.rate, requests=requests, cv=o.cv, seed=o.seed)
        return LoadPlan(schedule=schedule, request_timeout_s=o.timeout_s)

    def _source(self) -> RequestSource:
        o = self.options
        dataset = load_dataset(o.dataset) if o.dataset is not None else None
        return RequestSource(
            prompt_len=parse_length(o.prompt_len, option="--prompt-len"),
            output_len=parse_length(o.output_len, option="--output-len"),
            dataset=dataset,
            seed=o.seed,
        )

    # ---- target and faults --------------------------------------------------------------

    def _status_file(self) -> Path | None:
        if self.options.status_file is not None:
            return self.options.status_file
        if self.fleet is not None:
            return Path(self.fleet.launch.status_file)
        return None

    def _fault_targets(self) -> dict[str, FaultTarget]:
        o = self.options
        status = self._status_file()
        targets: dict[str, FaultTarget] = {}
        if o.url is not None:
            name = url_server_name(o.url)
            host, port = _host_and_port(o.url)
            key = _key_from_env(o.api_key_env) if o.faults else None
            targets[name] = FaultTarget(name, control_url_of(o.url), lambda: pid_listening_on(host, port), key)
            return targets
        assert self.fleet is not None
        key = self.fleet.api_key(required=False) if o.faults else None
        for spec in self.fleet.servers:

            def pid(spec=spec) -> int | None:
                found = pid_from_status_file(status, spec.name) if status is not None else None
                return found or pid_listening_on(spec.host, spec.port)

            targets[spec.name] = FaultTarget(spec.name, server_url(spec.host, spec.port), pid, key)
        return targets

    def make_target(self) -> Target:
        o = self.options
        if o.url is not None:
            key = _key_from_env(o.api_key_env)
            cls = OpenAITarget if o.transport == "sdk" else RawTarget
            return cls(o.url, o.model or "", api_key=key, timeout_s=o.timeout_s, name=url_server_name(o.url))
        factory = self._client_factory or _default_client_factory
        return ModelServerTarget(factory(self.fleet), o.group or "", name=f"group {o.group}")

    # ---- run --------------------------------------------------------------------------------

    def run_description(self) -> dict[str, Any]:
        o, plan = self.options, self.plan
        return {
            "mode": plan.mode,
            "target": f"group {o.group} ({self.fleet.source})" if o.group is not None and self.fleet else o.url,
            "model": o.model,
            "transport": o.transport if o.url else "ModelServer",
            "arrival": o.arrival if plan.mode == "open" else None,
            "cv": o.cv if plan.mode == "open" and o.arrival == "gamma" else None,
            "concurrency": plan.concurrency,
            "requests": plan.expected_requests,
            "duration_s": o.duration_s,
            "prompt_len": o.prompt_len if o.dataset is None else None,
            "output_len": o.output_len,
            "dataset": str(o.dataset) if o.dataset else None,
            "timeout_s": o.timeout_s,
            "seed": o.seed,
            **o.extra,
        }

    async def run(self) -> tuple[dict, RunOutcome]:
        target = self.make_target()
        injector = FaultInjector(self.events, self.fault_targets) if self.events else None
        reading = self.client_log.attached() if self.client_log is not None else contextlib.nullcontext()
        try:
            await warm_up(target, self.source, self.options.warmup_requests, self.options.timeout_s)
            with reading:  # the run's own, not the warm-up's
                outcome = await run_load(target, self.source, self.plan, injector=injector, progress=self.progress)
        finally:
            await target.aclose()
        asked = self.plan.schedule.rate if self.plan.schedule is not None else None
        run = self.run_description()
        result = build_result(outcome, asked_rate=asked, slo=self.slo, run=run, client_log=self.client_log)
        return result, outcome


def _default_client_factory(fleet: Any) -> Any:
    from model_server.client.async_driver import AsyncModelServer

    return AsyncModelServer(fleet)
