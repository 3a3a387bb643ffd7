"""Pure command building: a server spec + the launch policy -> argv and env.

No I/O here: the same function feeds ``--dry-run`` and the real spawn, so what
the dry run prints is exactly what runs. The API key never appears: the
engine gets the path of a 0600 YAML file (``--config``) that the I/O layer
writes (:func:`model_server.launcher.rundir.write_key_file`).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from model_server.config import LaunchPolicy, ServerKind, ServerSpec

__all__ = ["LaunchCommand", "build_command", "gpu_env"]


@dataclass(frozen=True)
class LaunchCommand:
    """What to run for one server: argv (no shell) and the variables added to the environment."""

    server: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)

    def render(self) -> str:
        """One shell-quoted line, env assignments in front, for ``--dry-run``."""
        assignments = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join([*assignments, shlex.join(self.argv)])


def gpu_env(spec: ServerSpec) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES in nvidia-smi numbering (PCI bus order), nothing if no GPUs are listed."""
    if not spec.gpus:
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in spec.gpus), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def _sizes(spec: ServerSpec, policy: LaunchPolicy) -> tuple[int | None, int | None]:
    if spec.kind is ServerKind.embedding:
        return policy.embedding_context_length, policy.embedding_chunked_prefill_size
    return policy.context_length, policy.chunked_prefill_size


def build_command(
    spec: ServerSpec,
    policy: LaunchPolicy,
    mem_fraction_static: float,
    key_file: str | None = None,
    python: str = sys.executable,
) -> LaunchCommand:
    """argv + env for ``python -m sglang.launch_server`` or the simulated engine.

    ``policy.engine`` picks the engine. The simulator takes the same SGLang
    flags except ``--enable-p2p-check`` and ``--dtype`` (GPU-only settings).
    ``key_file`` is the path of the API-key YAML file, or None for no key.
    """
    if policy.engine == "sglang":
        argv = [python, "-m", "sglang.launch_server"]
    else:
        argv = [python, "-m", "model_server", "sim"]
    argv += [
        "--model-path", spec.model,
        "--tp-size", str(spec.tp_size),
        "--host", policy.bind_host,
        "--port", str(spec.port),
        "--mem-fraction-static", f"{mem_fraction_static:g}",
    ]  # fmt: skip
    context_length, chunked_prefill = _sizes(spec, policy)
    if context_length is not None:
        argv += ["--context-length", str(context_length)]
    if chunked_prefill is not None:
        argv += ["--chunked-prefill-size", str(chunked_prefill)]
    if spec.served_model_name:
        argv += ["--served-model-name", spec.served_model_name]
    if policy.enable_metrics:
        argv.append("--enable-metrics")
    if spec.kind is ServerKind.embedding:
        argv.append("--is-embedding")
    if policy.engine == "sglang":
        argv += ["--enable-p2p-check", "--dtype", "auto"]  # the original's settings
    if key_file is not None:
        argv += ["--config", key_file]
    argv += list(spec.args)
    return LaunchCommand(server=spec.name, argv=tuple(argv), env=gpu_env(spec))
