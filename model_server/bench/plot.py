"""``--plot FILE.png``: the latency CDF and latency over time, faults marked.

matplotlib is imported here only, lazily, with the Agg backend (no display).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from model_server.bench.stats import RequestRecord
from model_server.errors import BenchError

__all__ = ["plot_run"]


def plot_run(
    records: Sequence[RequestRecord], faults: Sequence[dict], path: str | Path, title: str = "model-server bench"
) -> Path:
    """Left: CDF of TTFT and E2E; right: E2E of each request by send time, failures as x, faults as lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise BenchError(
            "--plot needs matplotlib, which is not installed. Fix: pip install -e '.[bench]' in the checkout (or "
            "pip install matplotlib)."
        ) from err
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    fig, (cdf, over_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, values in (("TTFT", [r.ttft_s for r in ok]), ("E2E", [r.e2e_s for r in ok])):
        data = sorted(v * 1000 for v in values if v is not None)
        if data:
            cdf.plot(data, [(i + 1) / len(data) for i in range(len(data))], label=label)
    cdf.set_xlabel("latency (ms)")
    cdf.set_ylabel("share of requests")
    cdf.set_title("latency CDF")
    cdf.grid(alpha=0.3)
    cdf.legend()
    over_time.scatter([r.sent_s for r in ok], [(r.e2e_s or 0.0) * 1000 for r in ok], s=4, label="E2E ok")
    if failed:
        over_time.scatter(
            [r.sent_s for r in failed],
            [(r.e2e_s or 0) * 1000 for r in failed],
            s=12,
            marker="x",
            color="red",
            label="failed",
        )
    for fault in faults:
        at = fault.get("applied_s") if fault.get("applied_s") is not None else fault.get("at_s")
        over_time.axvline(at, color="grey", linestyle="--", linewidth=1)
        over_time.annotate(
            fault.get("spec", fault.get("action", "")),
            (at, 1),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
        )
    over_time.set_xlabel("send time (s from start)")
    over_time.set_ylabel("E2E latency (ms)")
    over_time.set_title("latency over time")
    over_time.grid(alpha=0.3)
    over_time.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    file = Path(path)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(file, dpi=110)
    except OSError as err:
        raise BenchError(
            f"--plot {file}: cannot write the image ({err.strerror or err}). Give a path in a writable directory."
        ) from err
    finally:
        plt.close(fig)
    return file
