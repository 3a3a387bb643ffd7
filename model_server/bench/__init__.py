"""Load injection and latency metrics for model-server (``model-server bench``, ``benchmarks/``).

One concern per module: ``arrivals`` (when requests are sent), ``lengths``
(what they ask), ``targets`` (where they go), ``runner`` (the load engine),
``faults``/``injector`` (the fault schedule and its application), ``clientlog``
(what the client logged: failovers, breaker changes, resumes, per replica and
per fault), ``stats`` (TTFT/TPOT/E2E percentiles, SLO, goodput), ``report``
(JSON and table), ``plot`` (PNG, matplotlib imported lazily), ``options`` (a
run's options, whose defaults the CLI reads) and ``session`` (options -> run).

The names below are loaded on first use, so importing a light module of this
package (``model_server.bench.options``, ``model_server.bench.chaos``) does not
import httpx or the openai SDK: the CLI imports ``options`` at every start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from model_server.errors import BenchError

__all__ = [
    "ArrivalKind",
    "ArrivalSchedule",
    "BenchError",
    "BenchRequest",
    "FaultEvent",
    "FaultInjector",
    "FaultTarget",
    "LengthRange",
    "LoadPlan",
    "ModelServerTarget",
    "OpenAITarget",
    "Progress",
    "RawTarget",
    "RequestRecord",
    "RequestSource",
    "RoundRobinTarget",
    "RunOutcome",
    "ServerAction",
    "SloPolicy",
    "StreamPiece",
    "Target",
    "build_result",
    "build_schedule",
    "load_dataset",
    "parse_faults",
    "parse_length",
    "read_trace",
    "result_table",
    "run_load",
    "summarize",
    "write_json",
]

_HOMES = {  # name -> the module of this package it lives in
    "arrivals": ("ArrivalKind", "ArrivalSchedule", "build_schedule", "read_trace"),
    "faults": ("FaultEvent", "ServerAction", "parse_faults"),
    "injector": ("FaultInjector", "FaultTarget"),
    "lengths": ("BenchRequest", "LengthRange", "RequestSource", "load_dataset", "parse_length"),
    "report": ("build_result", "result_table", "write_json"),
    "runner": ("LoadPlan", "Progress", "RunOutcome", "run_load"),
    "stats": ("RequestRecord", "SloPolicy", "summarize"),
    "targets": ("ModelServerTarget", "OpenAITarget", "RawTarget", "RoundRobinTarget", "StreamPiece", "Target"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

if TYPE_CHECKING:  # pragma: no cover
    from model_server.bench.arrivals import ArrivalKind, ArrivalSchedule, build_schedule, read_trace
    from model_server.bench.faults import FaultEvent, ServerAction, parse_faults
    from model_server.bench.injector import FaultInjector, FaultTarget
    from model_server.bench.lengths import BenchRequest, LengthRange, RequestSource, load_dataset, parse_length
    from model_server.bench.report import build_result, result_table, write_json
    from model_server.bench.runner import LoadPlan, Progress, RunOutcome, run_load
    from model_server.bench.stats import RequestRecord, SloPolicy, summarize
    from model_server.bench.targets import (
        ModelServerTarget,
        OpenAITarget,
        RawTarget,
        RoundRobinTarget,
        StreamPiece,
        Target,
    )


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
