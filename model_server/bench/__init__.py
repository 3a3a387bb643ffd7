"""Load injection and latency metrics for model-server (``model-server bench``, ``benchmarks/``).

One concern per module: ``arrivals`` (when requests are sent), ``lengths``
(what they ask), ``targets`` (where they go), ``runner`` (the load engine),
``faults``/``injector`` (the fault schedule and its application), ``clientlog``
(what the client logged: failovers, breaker changes, resumes, per replica and
per fault), ``stats`` (TTFT/TPOT/E2E percentiles, SLO, goodput), ``report``
(JSON and table) and ``plot`` (PNG, matplotlib imported lazily).
"""

from __future__ import annotations

from model_server.bench.arrivals import ArrivalKind, ArrivalSchedule, build_schedule, read_trace
from model_server.errors import BenchError
from model_server.bench.faults import FaultAction, FaultEvent, parse_faults
from model_server.bench.injector import FaultInjector, FaultTarget
from model_server.bench.lengths import BenchRequest, LengthRange, RequestSource, load_dataset, parse_length
from model_server.bench.report import build_result, result_table, write_json
from model_server.bench.runner import LoadPlan, Progress, RunOutcome, run_load
from model_server.bench.stats import RequestRecord, SloPolicy, summarize
from model_server.bench.targets import ModelServerTarget, OpenAITarget, RawTarget, RoundRobinTarget, StreamPiece, Target

__all__ = [
    "ArrivalKind",
    "ArrivalSchedule",
    "BenchError",
    "BenchRequest",
    "FaultAction",
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
