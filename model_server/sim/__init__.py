"""`model-server sim`: a simulated SGLang engine for tests, demos and CI without a GPU.

It answers SGLang 0.5's HTTP API (health, model/server info, OpenAI chat,
completions and embeddings with streaming, native /generate, Prometheus
metrics) with deterministic filler text, honest token counts, a latency model
and fault injection (at start by flags, at run time through /sim/faults). It is
a simulator and says so; it is never a model.

Modules: settings (flags, --config YAML), latency (the model and the running
batch), faults (pure decisions), text (tokenizer, filler, embeddings), metrics
(`sglang:` Prometheus names), engine (live state and the sleeping), protocol
(request parsing, reply shapes), streaming (server-sent events), app (the
FastAPI routes), serve (uvicorn), process (`SimProcess`, a real subprocess for
tests and benchmarks).
Importing this package does not import FastAPI or uvicorn.
"""

from __future__ import annotations

from model_server.sim.settings import SimError, SimSettings, parse_sim_args

__all__ = ["SimError", "SimSettings", "parse_sim_args"]
