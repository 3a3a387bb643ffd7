"""When each request of an open-loop run is sent: Poisson, gamma, constant or a trace.

A schedule is a tuple of offsets in seconds from the start of the run. Random
schedules are seeded and *normalised*: the N gaps are drawn from the chosen
distribution and then scaled so that they sum to exactly N / rate. The shape of
the gaps (their burstiness) is random; the offered rate is the asked rate
exactly, so a measured rate can be compared with it at any N. For Poisson
arrivals this is the textbook construction of a Poisson process conditioned on
N arrivals in [0, N / rate].
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from model_server.errors import BenchError

__all__ = ["ArrivalKind", "ArrivalSchedule", "build_schedule", "read_trace"]


class ArrivalKind(str, Enum):
    poisson = "poisson"  # exponential gaps (CV 1)
    gamma = "gamma"  # gamma gaps with a chosen coefficient of variation (CV > 1: bursty)
    constant = "constant"  # equal gaps (CV 0)
    trace = "trace"  # arrival times read from a file


@dataclass(frozen=True)
class ArrivalSchedule:
    """Send offsets (seconds from the start), non-decreasing; the last one is N / rate."""

    kind: ArrivalKind
    offsets_s: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.offsets_s)

    @property
    def duration_s(self) -> float:
        return self.offsets_s[-1] if self.offsets_s else 0.0

    @property
    def rate(self) -> float:
        """The offered rate: requests / time of the last arrival."""
        return len(self.offsets_s) / self.duration_s if self.duration_s > 0 else math.inf


def _normalised(gaps: list[float], rate: float) -> tuple[float, ...]:
    total = sum(gaps)
    target = len(gaps) / rate
    scale = target / total if total > 0 else 0.0
    offsets: list[float] = []
    t = 0.0
    for gap in gaps:
        t += gap * scale
        offsets.append(t)
    if offsets:
        offsets[-1] = target  # no rounding drift on the point that defines the rate
    return tuple(offsets)


def read_trace(path: str | Path) -> tuple[float, ...]:
    """Arrival times (seconds, any origin) from a file: one number per line, or the first CSV column.

    Blank lines, ``#`` comments and a non-numeric header line are skipped; the
    times are sorted. At least two are needed to define a rate.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as err:
        raise BenchError(
            f"trace file {file}: cannot read it ({err.strerror or err}). Give an existing text file with one "
            "arrival time in seconds per line."
        ) from err
    times: list[float] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        field = line.split(",", 1)[0].strip()
        try:
            value = float(field)
        except ValueError:
            if not times and number == 1:
                continue  # a header line
            raise BenchError(
                f"trace file {file}, line {number}: {field!r} is not a number. Each line must start with an "
                "arrival time in seconds."
            ) from None
        if not math.isfinite(value):
            raise BenchError(
                f"trace file {file}, line {number}: {field!r} is not a finite time. Give arrival times in seconds."
            )
        times.append(value)
    if len(times) < 2:
        raise BenchError(
            f"trace file {file}: it holds {len(times)} arrival time(s); give at least two (one per line, in seconds)."
        )
    times.sort()
    if times[-1] == times[0]:
        raise BenchError(
            f"trace file {file}: all arrival times are equal, so it has no rate. Give times in seconds that spread "
            "over an interval."
        )
    return tuple(times)


def build_schedule(
    kind: ArrivalKind | str,
    *,
    rate: float | None,
    requests: int | None,
    cv: float = 1.0,
    seed: int = 0,
    trace: tuple[float, ...] | None = None,
) -> ArrivalSchedule:
    """The send offsets of an open-loop run.

    ``rate`` (requests/s) and ``requests`` (how many) define random schedules.
    A trace keeps its own gaps; ``rate`` then rescales it and ``requests``
    keeps its first N arrivals.
    """
    kind = ArrivalKind(kind)
    if requests is not None and requests < 1:
        raise BenchError(f"--requests is {requests}: give at least 1 request.")
    if rate is not None and not (rate > 0 and math.isfinite(rate)):
        raise BenchError(f"--rate is {rate}: give a positive number of requests per second.")
    if cv < 0 or not math.isfinite(cv):
        raise BenchError(
            f"--cv is {cv}: the coefficient of variation of the gaps must be >= 0 (1 is Poisson, > 1 bursty)."
        )
    if kind is ArrivalKind.trace:
        if not trace:
            raise BenchError("--arrival trace needs --trace FILE: a file of arrival times in seconds, one per line.")
        times = list(trace[:requests] if requests else trace)
        if len(times) < 2:
            raise BenchError("the trace keeps fewer than two arrivals after --requests: ask for at least 2.")
        span = times[-1] - times[0]
        mean_gap = span / (len(times) - 1)
        # The first arrival comes one mean gap after the start, as in the random
        # schedules, so N / last offset is the trace's own rate.
        gaps = [mean_gap] + [b - a for a, b in zip(times, times[1:])]
        own_rate = len(gaps) / sum(gaps)
        return ArrivalSchedule(kind, _normalised(gaps, rate or own_rate))
    if rate is None or requests is None:
        raise BenchError(
            f"--arrival {kind.value} needs a rate (--rate) and a number of requests (--requests or --duration)."
        )
    rng = random.Random(seed)
    if kind is ArrivalKind.constant or (kind is ArrivalKind.gamma and cv == 0):
        gaps = [1.0] * requests
    elif kind is ArrivalKind.poisson:
        gaps = [rng.expovariate(1.0) for _ in range(requests)]
    else:
        shape = 1.0 / (cv * cv)
        gaps = [rng.gammavariate(shape, 1.0 / shape) for _ in range(requests)]
    return ArrivalSchedule(kind, _normalised(gaps, rate))
