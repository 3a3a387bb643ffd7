"""Latency statistics of a run: per-request records in, the result numbers out.

Pure: a record holds times in seconds from the start of the run, taken with
``time.monotonic()`` by the runner. TTFT is first content token - send, E2E is
done - send, TPOT is (E2E - TTFT) / (output tokens - 1) and exists only for
requests with at least two output tokens. A request whose answer came in one
piece (a non-streaming target: ``timed=False``) has no TTFT and no TPOT (None,
never 0), and cannot meet a TTFT or TPOT objective. Percentiles interpolate linearly
between order statistics (numpy's default), so p50 of [1, 2] is 1.5.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "LatencySummary",
    "RequestRecord",
    "SloPolicy",
    "percentile",
    "steady_rate_ratio",
    "summarize",
    "summarize_values",
    "within",
]


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request; the runner fills it in as the answer streams."""

    index: int
    scheduled_s: float | None = None  # open loop: when the schedule said to send it
    sent_s: float = math.nan  # when the request was handed to the target
    first_token_s: float | None = None
    done_s: float | None = None
    output_tokens: int = 0
    ok: bool = False
    error: str | None = None
    server: str | None = None  # the replica that answered, when the target knows it
    timed: bool = True  # False: the target does not stream, so token times were not measured

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.done_s is None else self.done_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        ttft, e2e = self.ttft_s, self.e2e_s
        if ttft is None or e2e is None or self.output_tokens < 2:
            return None
        return (e2e - ttft) / (self.output_tokens - 1)

    @property
    def dispatch_lag_s(self) -> float | None:
        return None if self.scheduled_s is None else self.sent_s - self.scheduled_s


@dataclass(frozen=True)
class SloPolicy:
    """Service-level objectives; None means "no objective" for that metric."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    def met_by(self, record: RequestRecord) -> bool:
        if not record.ok:
            return False
        if not record.timed and (self.ttft_s is not None or self.tpot_s is not None):
            return False  # no token timing (a non-streamed answer): an objective on it cannot be shown met
        ttft, tpot = record.ttft_s, record.tpot_s
        if self.ttft_s is not None and (ttft is None or ttft > self.ttft_s):
            return False
        # A one-token answer has no TPOT, so it cannot miss a TPOT objective.
        return not (self.tpot_s is not None and tpot is not None and tpot > self.tpot_s)


@dataclass(frozen=True)
class LatencySummary:
    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None
    mean: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "max": self.max,
            "mean": self.mean,
            "count": self.count,
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linear interpolation."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def summarize_values(values: Iterable[float | None]) -> LatencySummary:
    data = sorted(v for v in values if v is not None and not math.isnan(v))
    if not data:
        return LatencySummary(0, None, None, None, None, None)
    return LatencySummary(
        count=len(data),
        p50=percentile(data, 50),
        p90=percentile(data, 90),
        p99=percentile(data, 99),
        max=data[-1],
        mean=sum(data) / len(data),
    )


def within(records: Iterable[RequestRecord], start_s: float, end_s: float) -> list[RequestRecord]:
    """The records sent in [start_s, end_s): for before/during/after comparisons."""
    return [r for r in records if start_s <= r.sent_s < end_s]


def steady_rate_ratio(records: Sequence[RequestRecord], *, edge: float = 0.05, window: int = 25) -> float | None:
    """Achieved / offered rate between the 5th and 95th percentile sends, insensitive to single late sends.

    Open loop only. The send lag (sent - scheduled) is taken as the median of
    ``window`` requests around each end, so one stall of the machine does not
    decide the figure, while a generator that steadily falls behind (lag
    growing through the run) shows as a ratio below 1.
    """
    scheduled = (r for r in records if r.scheduled_s is not None and not math.isnan(r.sent_s))
    timed = sorted(scheduled, key=lambda r: r.scheduled_s)
    if len(timed) < 4 * window:
        return None
    first, last = int(len(timed) * edge), int(len(timed) * (1 - edge)) - 1

    def median_lag(center: int) -> float:
        lo = max(0, center - window // 2)
        lags = sorted(r.sent_s - r.scheduled_s for r in timed[lo : lo + window])
        return percentile(lags, 50)

    offered_span = timed[last].scheduled_s - timed[first].scheduled_s
    achieved_span = offered_span + median_lag(last) - median_lag(first)
    return offered_span / achieved_span if achieved_span > 0 else None


def summarize(
    records: Sequence[RequestRecord],
    *,
    asked_rate: float | None = None,
    slo: SloPolicy = SloPolicy(),
    wall_s: float | None = None,
    top_errors: int = 10,
) -> dict:
    """The result numbers of a run (the JSON shape ``model-server bench`` writes).

    ``achieved_rate`` is requests sent / time of the last send: in an open-loop
    run whose schedule ends at N / rate, it equals the asked rate exactly when
    every request left on time. ``steady_rate_ratio`` is the same comparison
    over the middle 90% of the run, robust to one late send. Throughputs divide
    by ``wall_s`` (start to the last answer, unless given).
    """
    sent = [r for r in records if not math.isnan(r.sent_s)]
    ok = [r for r in sent if r.ok]
    errors = Counter(r.error or "unknown error" for r in sent if not r.ok)
    attained = sum(1 for r in sent if slo.met_by(r))
    output_tokens = sum(r.output_tokens for r in ok)
    last_sent = max((r.sent_s for r in sent), default=0.0)
    if wall_s is None:
        wall_s = max((r.done_s for r in sent if r.done_s is not None), default=last_sent)
    per_s = (lambda n: n / wall_s) if wall_s and wall_s > 0 else (lambda n: None)
    return {
        "sent": len(sent),
        "ok": len(ok),
        "failed": len(sent) - len(ok),
        "asked_rate": asked_rate,
        "achieved_rate": (len(sent) / last_sent) if last_sent > 0 else None,
        "steady_rate_ratio": steady_rate_ratio(sent),
        "wall_s": wall_s,
        "ttft_s": summarize_values(r.ttft_s for r in ok).as_dict(),
        "tpot_s": summarize_values(r.tpot_s for r in ok).as_dict(),
        "e2e_s": summarize_values(r.e2e_s for r in ok).as_dict(),
        "dispatch_lag_s": summarize_values(r.dispatch_lag_s for r in sent).as_dict(),
        "output_tokens": output_tokens,
        "output_tokens_per_s": per_s(output_tokens),
        "requests_per_s": per_s(len(ok)),
        "slo": {
            "ttft_s": slo.ttft_s,
            "tpot_s": slo.tpot_s,
            "attained": attained,
            "attainment": attained / len(sent) if sent else None,
            "goodput_rps": per_s(attained),
            # ok answers without token timing (non-streamed): never counted as meeting a TTFT/TPOT objective
            "untimed": sum(1 for r in ok if not r.timed),
        },
        "errors": dict(errors.most_common(top_errors)),
    }
