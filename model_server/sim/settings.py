"""The simulator's settings: SGLang's flag names plus its own latency and fault flags.

`parse_sim_args` is the only way in. It behaves like ``sglang.launch_server``'s
argparse: an unknown flag exits with status 2 and "unrecognized arguments", and
``--config FILE.yaml`` supplies options as YAML keys (``api-key`` or
``api_key``), the command line winning over the file. That is how the launcher
passes the API key without putting it in ``ps``. As in SGLang, the file must be
named ``*.yaml`` or ``*.yml``, and ``--log-level`` takes any name of a Python
logging level.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from model_server.errors import SimError
from model_server.sim.faults import Faults

__all__ = ["SimError", "SimSettings", "build_parser", "parse_sim_args"]

PROG = "model-server sim"


@dataclass(frozen=True)
class SimSettings:
    """Everything the simulator was started with. Defaults match the contract.

    The one home of the defaults: the flags of `build_parser` read theirs from here
    (and the faults' from `Faults`, which /sim/reset returns to).
    """

    model_path: str
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = field(default=None, repr=False)  # logged at startup like SGLang; never in repr
    admin_api_key: str | None = field(default=None, repr=False)
    is_embedding: bool = False
    # Accepted like SGLang's and reported in /server_info; the memory ones size the simulated KV pool.
    tp_size: int = 1
    mem_fraction_static: float | None = None
    context_length: int | None = None
    chunked_prefill_size: int | None = None
    enable_metrics: bool = False
    max_running_requests: int | None = None  # None: derived from the simulated KV pool (engine.kv_pool)
    max_total_tokens: int | None = None
    log_level: str = "info"
    dtype: str = "auto"
    enable_p2p_check: bool = False
    trust_remote_code: bool = False
    stream_response_default_include_usage: bool = False
    # The simulator's own.
    startup_delay_s: float = 0.0
    health_generate_s: float = 1.0
    ttft_ms: float = 20.0
    ttft_per_prompt_token_ms: float = 0.02
    tpot_ms: float = 2.0
    tpot_growth: float = 0.05
    embedding_dim: int = 256
    seed: int = 0
    # Faults at start (all settable at run time through /sim/faults); off unless given, as Faults() is.
    error_rate: float = Faults.error_rate
    error_status: int = Faults.error_status
    hang: bool = Faults.hang
    slow_factor: float = Faults.slow_factor
    crash_after: int | None = Faults.crash_after
    malformed_rate: float = Faults.malformed_rate
    drop_stream_rate: float = Faults.drop_stream_rate
    stall_after_tokens: int | None = Faults.stall_after_tokens
    crash_after_tokens: int | None = Faults.crash_after_tokens
    hang_before_first_token: bool = Faults.hang_before_first_token

    @property
    def model_name(self) -> str:
        """The name answered on /v1/models and in replies (SGLang: served name, else the path)."""
        return self.served_model_name or self.model_path

    @property
    def effective_context_length(self) -> int:
        return self.context_length or 32768

    def server_args(self) -> dict[str, Any]:
        """The resolved settings under SGLang's names, as SGLang logs them at startup and /server_info
        returns them: the API keys included, in clear (whoever keeps the log must redact them)."""
        data = dataclasses.asdict(self)
        data["served_model_name"] = self.model_name
        data["tokenizer_path"] = self.model_path
        data["context_length"] = self.effective_context_length
        return data


# --- argparse value types: a bad value is an argparse error (exit 2) naming the flag ---


def _checked(convert: Callable[[str], Any], fits: Callable[[Any], bool], name: str, why: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert(text)``, refused with "TEXT {why}" unless it ``fits``.

    ``name`` is what argparse calls the type when ``convert`` itself fails ("invalid port value: 'x'").
    """

    def parse(text: str) -> Any:
        value = convert(text)
        if not fits(value):
            raise argparse.ArgumentTypeError(f"{text} {why}")
        return value

    parse.__name__ = name
    return parse


def _is_log_level(text: str) -> bool:
    return isinstance(getattr(logging, text.upper(), None), int)


_probability = _checked(float, lambda v: 0.0 <= v <= 1.0, "probability", "is not a probability between 0 and 1")
_non_negative_float = _checked(float, lambda v: v >= 0, "number >= 0", "must be a number >= 0")  # NaN fails too
_positive_float = _checked(float, lambda v: v > 0, "number > 0", "must be a number > 0")
_positive_int = _checked(int, lambda v: v >= 1, "integer >= 1", "must be an integer >= 1")
_non_negative_int = _checked(int, lambda v: v >= 0, "integer >= 0", "must be an integer >= 0")
_port = _checked(int, lambda v: 0 <= v <= 65535, "port", "is not a port (0-65535)")
_http_error_status = _checked(
    int, lambda v: 400 <= v <= 599, "HTTP error status", "is not an HTTP error status (400-599)"
)
_log_level = _checked(str, _is_log_level, "log level", "is not a logging level (debug, info, warning, error, critical)")


_SWITCH = "store_true"  # the kind of an on/off flag


class _Flag(NamedTuple):
    """One flag: its name (or names), its argparse ``type`` (None: text; _SWITCH: on/off), help and metavar."""

    names: str | tuple[str, ...]
    kind: Callable[[str], Any] | str | None = None
    help: str | None = None
    metavar: str | None = None

    def add_to(self, group: argparse._ArgumentGroup) -> None:
        names = (self.names,) if isinstance(self.names, str) else self.names
        if self.kind == _SWITCH:
            group.add_argument(*names, action="store_true", help=self.help)
        else:
            group.add_argument(*names, type=self.kind, help=self.help, metavar=self.metavar)


_SGLANG_FLAGS = (
    _Flag("--model-path", help="reported as the model path (required; nothing is loaded)"),
    _Flag("--served-model-name", help="the model name on /v1/models and in replies"),
    _Flag("--host"),
    _Flag("--port", _port),
    _Flag("--api-key", help="require 'Authorization: Bearer KEY' (prefer --config for secrets)"),
    _Flag("--admin-api-key", help="the key of the admin routes (/flush_cache, /sim/*), as SGLang's"),
    _Flag("--is-embedding", _SWITCH, "serve embeddings instead of completions"),
    _Flag("--config", help="YAML file (*.yaml, *.yml) of options (keys with '_' or '-'); the command line wins"),
    _Flag(("--tp-size", "--tensor-parallel-size"), _positive_int),
    _Flag("--mem-fraction-static", _probability),
    _Flag("--context-length", _positive_int),
    _Flag("--chunked-prefill-size", int),
    _Flag("--enable-metrics", _SWITCH, "serve Prometheus metrics on /metrics"),
    _Flag(
        "--max-running-requests",
        _positive_int,
        "running batch size; the rest queue (default: from the simulated KV pool, as SGLang)",
    ),
    _Flag("--max-total-tokens", _positive_int, "KV pool size in tokens (default: simulated)"),
    _Flag("--log-level", _log_level),
    _Flag("--stream-response-default-include-usage", _SWITCH),
    _Flag("--dtype"),
    _Flag("--enable-p2p-check", _SWITCH),
    _Flag("--trust-remote-code", _SWITCH),
)
_LATENCY_FLAGS = (
    _Flag(
        "--startup-delay-s",
        _non_negative_float,
        "'loading the weights': no listener (connection refused) for this long",
    ),
    _Flag(
        "--health-generate-s",
        _non_negative_float,
        "/health_generate's poll interval (SGLang: 1 s, so it takes at least that)",
    ),
    _Flag("--ttft-ms", _non_negative_float, "base time to first token"),
    _Flag("--ttft-per-prompt-token-ms", _non_negative_float),
    _Flag("--tpot-ms", _non_negative_float, "time per output token, 1 running"),
    _Flag("--tpot-growth", _non_negative_float, "tpot x (1 + F x (running-1))"),
    _Flag("--embedding-dim", _positive_int),
    _Flag("--seed", int),
)
_FAULT_FLAGS = (
    _Flag("--error-rate", _probability, "share of model requests that fail"),
    _Flag("--error-status", _http_error_status),
    _Flag("--hang", _SWITCH, "model routes accept and never answer"),
    _Flag("--slow-factor", _positive_float, "every latency x F"),
    _Flag("--crash-after", _positive_int, "exit on the N-th model request"),
    _Flag("--malformed-rate", _probability, "share of 200s with invalid JSON"),
    _Flag("--drop-stream-rate", _probability, "share of streams cut after their first text chunk"),
    _Flag(
        "--stall-after-tokens",
        _non_negative_int,
        "streams send K tokens, then nothing (connection kept open); longer unstreamed replies never come",
        "K",
    ),
    _Flag("--crash-after-tokens", _non_negative_int, "exit once a stream has sent K tokens", "K"),
    _Flag(
        "--hang-before-first-token", _SWITCH, "streams get their headers but no token; unstreamed requests never answer"
    ),
)
# The groups, in the order --help lists them; every default is SimSettings' (the flags' dests are its fields).
_FLAG_GROUPS = (
    ("SGLang options", _SGLANG_FLAGS),
    ("latency model", _LATENCY_FLAGS),
    ("faults (also settable at run time: POST /sim/faults)", _FAULT_FLAGS),
)


def build_parser() -> argparse.ArgumentParser:
    """SGLang's flag names where they overlap, then the simulator's own."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="A simulated SGLang engine (not a model): SGLang's HTTP API with deterministic "
        "filler text, a latency model and fault injection, for tests and demos without a GPU.",
    )
    for title, flags in _FLAG_GROUPS:
        group = p.add_argument_group(title)
        for flag in flags:
            flag.add_to(group)
    p.set_defaults(**_settings_defaults())
    return p


def _settings_defaults() -> dict[str, Any]:
    """Every flag's default, read from `SimSettings` (the flags' dests are its field names)."""
    return {f.name: f.default for f in dataclasses.fields(SimSettings) if f.default is not dataclasses.MISSING}


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Read --config FILE.yaml into argparse defaults, converting each value like its flag would."""
    import yaml

    if Path(path).suffix.lower() not in (".yaml", ".yml"):
        parser.error(f"--config {path}: Config file must be YAML format, got: {Path(path).suffix or '(none)'}")

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        parser.error(f"--config {path}: cannot read it ({err.strerror}); give an existing YAML file")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        parser.error(f"--config {path}: not valid YAML ({err}); fix the file")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    defaults: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        action = actions.get(key)
        if action is None:
            parser.error(f"--config {path}: unrecognized option {raw_key!r}")
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {raw_key!r} must be true or false, got {value!r}")
            defaults[key] = value
            continue
        if value is None:
            defaults[key] = None
            continue
        try:
            converted = action.type(str(value)) if action.type else str(value)
        except (ValueError, argparse.ArgumentTypeError) as err:
            parser.error(f"--config {path}: invalid value for {raw_key!r}: {value!r} ({err})")
        if action.choices is not None and converted not in action.choices:
            parser.error(f"--config {path}: {raw_key!r} must be one of {sorted(action.choices)}")
        defaults[key] = converted
    return defaults


def parse_sim_args(argv: Sequence[str]) -> SimSettings:
    """argv (without the program name) -> settings; exits 2 with argparse's message on bad input."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(list(argv))
    if known.config:
        parser.set_defaults(**_yaml_defaults(parser, known.config))
    ns = parser.parse_args(list(argv))
    if not ns.model_path:
        parser.error("the following arguments are required: --model-path")
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(SimSettings)}
    return SimSettings(**values)
