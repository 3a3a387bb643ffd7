"""How long the launch pipeline takes to heal a replica: kill -9 and SIGSTOP, under two sets of health settings.

    python benchmarks/pipeline_recovery.py [--rounds 3] [--profile local|bench|all]

It runs `python serve_llm_pipeline.py` on a copy of configs/local.toml (its
three chat servers, free ports, files in a temp dir) and, per round, kills one
replica with SIGKILL and stops another with SIGSTOP, reading from the status
file when the pipeline noticed (the server left READY; for SIGSTOP: declared
hung) and when it was READY again, both from the signal. No client load: this
is the pipeline's own time to recover.

Profiles: "local" is configs/local.toml's [launch] section as shipped;
"bench" is benchmarks/failover.py's tighter health settings. The expected
bounds printed next to each figure come from the settings alone (see
:func:`hang_bounds_s`). The figures are for `model-server sim`, which starts in
about a second; a real SGLang server adds its own load time to "READY again".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from model_server.config import load_fleet  # noqa: E402
from model_server.launcher.steps import hang_bounds_s  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHAT = ["chat-1", "chat-2", "chat-3"]
# benchmarks/failover.py's launch settings (health and restart); the sim answers /health_generate at once there
BENCH = {
    "health_interval_s": 1.0,
    "health_timeout_s": 1.0,
    "health_failures_to_restart": 2,
    "restart_backoff_initial_s": 0.2,
    "restart_backoff_max_s": 2,
}
BENCH_SIM_ARGS = ["--health-generate-s", "0"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fleet_copy(tmp: Path, launch: dict[str, float], sim_args: list[str]) -> Path:
    text = (ROOT / "configs" / "local.toml").read_text()
    text = re.sub(r"(?m)^port = \d+$", lambda _m: f"port = {free_port()}", text)
    values = {**launch, "log_dir": str(tmp / "logs"), "status_file": str(tmp / "run" / "status.json")}
    for key, value in values.items():
        line = f"{key} = {json.dumps(value)}"
        text, n = re.subn(rf"(?m)^{key} = .*$", line, text)
        if n == 0:
            text = text.replace("[launch]\n", f"[launch]\n{line}\n", 1)
    if sim_args:
        text = re.sub(
            r"(?m)^args = \[(.*)\]$",
            lambda m: f"args = [{m.group(1)}, {', '.join(json.dumps(a) for a in sim_args)}]",
            text,
        )
    path = tmp / "fleet.toml"
    path.write_text(text)
    return path


def servers(status_file: Path, pipeline_pid: int) -> dict:
    try:
        data = json.loads(status_file.read_text())
    except (OSError, ValueError):
        return {}
    return data["servers"] if data.get("pipeline", {}).get("pid") == pipeline_pid else {}


def wait(status_file: Path, pid: int, predicate, what: str, timeout_s: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = servers(status_file, pid)
        if s and predicate(s):
            return s
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


def one_fault(status_file: Path, pid: int, name: str, sig: int) -> dict:
    """Signal ``name``'s engine; return seconds from the signal to 'left READY' and to 'READY again'."""
    before = wait(status_file, pid, lambda s: all(s[n]["state"] == "READY" for n in CHAT), "all READY")
    old_pid, old_restarts = before[name]["pid"], before[name]["restarts"]
    t0 = time.time()
    os.kill(old_pid, sig)
    left = wait(status_file, pid, lambda s: s[name]["restarts"] > old_restarts, f"{name} restarting")
    back = wait(
        status_file, pid, lambda s: s[name]["state"] == "READY" and s[name]["pid"] != old_pid, f"{name} READY again"
    )
    if sig == signal.SIGSTOP:
        try:
            os.kill(old_pid, signal.SIGCONT)  # already killed by the pipeline; never leave a stopped process
        except ProcessLookupError:
            pass
    return {
        "noticed_s": round(left[name]["since"] - t0, 2),  # the RESTARTING transition
        "ready_again_s": round(back[name]["since"] - t0, 2),
        "cause": left[name]["last_error"][:80],
    }


def run_profile(label: str, launch: dict[str, float], sim_args: list[str], rounds: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-recovery-{label}-"))
    config = fleet_copy(tmp, launch, sim_args)
    policy = load_fleet(config).launch
    log = open(tmp / "pipeline.log", "ab")
    args = [sys.executable, str(ROOT / "serve_llm_pipeline.py"), "--config", str(config)]
    for name in CHAT:
        args += ["--only", name]
    pipeline = subprocess.Popen(args, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    status_file = tmp / "run" / "status.json"
    kills, stops = [], []
    try:
        wait(status_file, pipeline.pid, lambda s: all(s.get(n, {}).get("state") == "READY" for n in CHAT), "all READY")
        for i in range(rounds):
            kills.append(one_fault(status_file, pipeline.pid, CHAT[i % 3], signal.SIGKILL))
            stops.append(one_fault(status_file, pipeline.pid, CHAT[(i + 1) % 3], signal.SIGSTOP))
    finally:
        pipeline.send_signal(signal.SIGTERM)
        try:
            pipeline.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(pipeline.pid, signal.SIGKILL)
    low, high = hang_bounds_s(policy)
    health = {k: getattr(policy, k) for k in ("health_interval_s", "health_timeout_s", "health_failures_to_restart",
                                               "restart_backoff_initial_s", "restart_backoff_max_s")}  # fmt: skip
    return {
        "profile": label,
        "launch": health,
        "sim_args": sim_args,
        "hung_bounds_s": [low, high],
        "kill": kills,
        "stop": stops,
    }


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", choices=["local", "bench", "all"], default="all")
    opts = parser.parse_args()
    local = load_fleet(ROOT / "configs" / "local.toml").launch
    profiles = {
        "local": ({k: getattr(local, k) for k in BENCH}, []),
        "bench": (BENCH, BENCH_SIM_ARGS),
    }
    started = time.monotonic()
    results = [run_profile(p, *profiles[p], opts.rounds) for p in profiles if opts.profile in (p, "all")]
    rows = []
    for r in results:
        h = r["launch"]
        settings = f"every {h['health_interval_s']:g} s, timeout {h['health_timeout_s']:g} s, {h['health_failures_to_restart']} in a row"
        rows.append([r["profile"], settings, spread([k["noticed_s"] for k in r["kill"]]), spread([k["ready_again_s"] for k in r["kill"]]),
                     f"{r['hung_bounds_s'][0]:g}-{r['hung_bounds_s'][1]:g}", spread([s["noticed_s"] for s in r["stop"]]),
                     spread([s["ready_again_s"] for s in r["stop"]])])  # fmt: skip
    _common.table(
        f"pipeline recovery, 3 simulated chat servers, {opts.rounds} round(s) per fault; seconds from the signal, median (min-max)",
        ["profile", "health probes", "kill -9: noticed", "kill -9: READY again", "SIGSTOP: hung expected", "SIGSTOP: declared hung",
         "SIGSTOP: READY again"],
        rows,
    )  # fmt: skip
    _common.save("pipeline_recovery", {"rounds": opts.rounds, "wall_s": time.monotonic() - started, "results": results})


if __name__ == "__main__":
    main()
