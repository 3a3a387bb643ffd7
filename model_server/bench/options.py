"""The options of one ``model-server bench`` run, as given: the CLI's defaults are read from here.

Pure and light (no httpx, no openai): the CLI imports it when it starts, so every
``model-server`` command would pay for anything imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BenchOptions"]


@dataclass(frozen=True)
class BenchOptions:
    """Every ``model-server bench`` option, as given."""

    config: Path | None = None
    group: str | None = None
    url: str | None = None
    model: str | None = None
    api_key_env: str | None = None  # --url mode: the NAME of the variable holding the key
    transport: str = "sdk"  # --url mode: "sdk" (openai SDK) or "raw" (the generator's own HTTP/1.1 client)
    rate: float | None = None
    concurrency: int | None = None
    duration_s: float | None = None
    requests: int | None = None
    prompt_len: str = "128"
    output_len: str = "128"
    dataset: Path | None = None
    arrival: str = "poisson"
    cv: float = 1.0
    trace: Path | None = None
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    faults: tuple[str, ...] = ()
    status_file: Path | None = None
    timeout_s: float = 60.0
    seed: int = 0
    warmup_requests: int = 1  # sent before the clock starts, not counted (first-use costs of SDK and pool)
    extra: dict[str, Any] = field(default_factory=dict)
