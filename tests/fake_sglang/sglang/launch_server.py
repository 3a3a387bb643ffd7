"""A fake ``python -m sglang.launch_server`` for the launch pipeline's real-process tests.

It takes the flags the launcher passes to SGLang, and behaves the way SGLang
0.5.23 does where the launcher depends on it:

- it reads ``--config FILE.yaml`` (the API key) at startup, and logs its
  resolved settings, API key included, as SGLang does:
  ``server_args=ServerArgs(model_path='...', ..., api_key='KEY', ...)``;
- it refuses connections while "loading" (``--fake-listen-delay-s``), then
  answers 503 on /health* while "warming up" (``--fake-warmup-s``), and its
  /health_generate takes ``--fake-health-s`` (SGLang: about 1 s);
- it can start worker processes (``--fake-workers N``) that, unlike SGLang's,
  do not arm a parent-death signal; ``--fake-server-in-worker`` makes the first
  worker the one that listens on the port, ``--fake-setsid-first-worker`` puts
  that worker in its own session (out of the engine's process group);
- ``--fake-print-env NAME`` prints ``NAME=<value>`` (a secret of the table);
  ``--fake-exit-after-print`` exits with status 3 after the startup lines.

On SIGTERM it prints ``fake engine: SIGTERM`` and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sglang.launch_server")
    p.add_argument("--model-path", required=True)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--mem-fraction-static", type=float)
    p.add_argument("--context-length", type=int)
    p.add_argument("--chunked-prefill-size", type=int)
    p.add_argument("--served-model-name")
    p.add_argument("--enable-metrics", action="store_true")
    p.add_argument("--is-embedding", action="store_true")
    p.add_argument("--enable-p2p-check", action="store_true")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--config")
    p.add_argument("--api-key")
    p.add_argument("--ttft-ms", help="configs/local.toml's simulator flags: accepted and ignored")
    p.add_argument("--tpot-ms", help=argparse.SUPPRESS)
    p.add_argument("--fake-listen-delay-s", type=float, default=0.0)
    p.add_argument("--fake-warmup-s", type=float, default=0.0)
    p.add_argument("--fake-health-s", type=float, default=0.0)
    p.add_argument("--fake-workers", type=int, default=0)
    p.add_argument("--fake-server-in-worker", action="store_true")
    p.add_argument("--fake-setsid-first-worker", action="store_true")
    p.add_argument("--fake-print-env", action="append", default=[])
    p.add_argument("--fake-exit-after-print", action="store_true")
    p.add_argument("--fake-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.config:  # SGLang: the file's options, the command line winning
        if not args.config.endswith((".yaml", ".yml")):
            p.error("--config must be a .yaml or .yml file")
        import yaml

        with open(args.config, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        for key, value in data.items():
            name = key.replace("-", "_")
            if getattr(args, name, None) is None:
                setattr(args, name, value)
    return args


def serve(args: argparse.Namespace) -> None:
    started = time.monotonic()
    warm_until = started + args.fake_warmup_s

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            if self.path.startswith("/health"):
                if time.monotonic() < warm_until:
                    self.send_response(503)
                    self.end_headers()
                    return
                if self.path.startswith("/health_generate"):
                    time.sleep(args.fake_health_s)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(404)
            self.end_headers()

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"fake engine pid {os.getpid()}: listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()


def worker_argv(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "sglang.launch_server", *argv, "--fake-worker"]


def main() -> None:
    argv = sys.argv[1:]
    args = parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: (print(f"fake engine pid {os.getpid()}: SIGTERM", flush=True), os._exit(0)))
    if args.fake_worker:
        print(f"fake engine worker pid {os.getpid()} (pgid {os.getpgid(0)}, sid {os.getsid(0)})", flush=True)
        if args.fake_server_in_worker:
            serve(args)
        while True:
            time.sleep(60)
    settings = {k: v for k, v in vars(args).items() if not k.startswith(("fake_", "ttft", "tpot")) and k != "config"}
    # As SGLang 0.5.23 logs them at startup (the key included):
    fields = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    print(f"[2026-01-01 00:00:00] server_args=ServerArgs({fields})", flush=True)
    sys.stderr.write(f"fake engine: resolved {json.dumps(settings)}\n")
    sys.stderr.write(f"fake engine: partial line with the key {args.api_key}")  # no newline: the next write ends it
    sys.stderr.flush()
    time.sleep(0.05)
    sys.stderr.write(" and its end\n")
    for name in args.fake_print_env:
        sys.stderr.write(f"{name}={os.environ.get(name, '')}\n")
    sys.stderr.flush()
    if args.fake_exit_after_print:
        sys.exit(3)
    workers = []
    for i in range(args.fake_workers):
        wargv = [a for a in argv if a != "--fake-server-in-worker"]
        if i == 0 and args.fake_server_in_worker:
            wargv.append("--fake-server-in-worker")
        setsid = i == 0 and args.fake_setsid_first_worker
        workers.append(subprocess.Popen(worker_argv(wargv), start_new_session=setsid))
    time.sleep(args.fake_listen_delay_s)
    if args.fake_server_in_worker and args.fake_workers:
        while True:
            time.sleep(60)
    serve(args)


if __name__ == "__main__":
    main()
