"""`model-server sim`: a simulated SGLang 0.5.23 engine for tests, demos and CI without a GPU.

It is a simulator and says so (its startup line, /model_info and /server_info
carry ``"simulator": true``); it is never a model. The rule: where the sim and
SGLang 0.5.23 differ, SGLang wins, except the sim's own documented additions.
tests/test_sim_conformance.py holds its answers to SGLang's own protocol models.

Matches SGLang exactly
    - Routes and methods: the OpenAI ones (``/v1/chat/completions``,
      ``/v1/completions``, ``/v1/embeddings``, ``/v1/models``,
      ``/v1/models/{id}``, ``/v1/tokenize``, ``/v1/detokenize``, and
      ``/tokenize``, ``/detokenize``), the native ones (``/generate`` and
      ``/encode`` by POST or PUT, ``/health``, ``/health_generate``,
      ``/ready``, ``/ping``, ``/``, ``/model_info``, ``/server_info`` and their
      ``/get_*`` names, ``/v1/loads``, ``/flush_cache``), ``/metrics`` only
      with ``--enable-metrics``. Other routes: 404, as SGLang's unknown ones.
    - Request and answer shapes, field for field: SGLang's serializers' keys,
      nulls and order (``reasoning_content: null``, ``matched_stop``, usage
      with ``reasoning_tokens`` and the details fields, uuid-hex ids, the role-only
      first chat chunk, the completions finish on its last text chunk, the
      usage chunk, ``[DONE]``), ``n`` choices, batched prompts and streams,
      ``stream_options`` (``include_usage``, ``continuous_usage_stats``),
      ``continue_final_message``, tool calls (``call_`` + 24 hex ids).
    - Errors: the flat ``ErrorResponse`` on the OpenAI routes (``type: "Bad
      Request"`` for validation, 400 "Unsupported Media Type" without
      ``Content-Type: application/json``), SGLang's three shapes on /generate,
      401 ``{"error": "Unauthorized"}``; any model name is accepted and echoed
      (``"default"`` when omitted; embeddings report the model path).
    - Auth (``--api-key``, ``--admin-api-key``, a case-blind "Bearer", open
      ``OPTIONS``, /health*, /ready*, /metrics*) and CORS.
    - Startup: nothing listens while the weights "load" (``--startup-delay-s``),
      /health* answer 503 during the warm-up request, then "The server is fired
      up and ready to roll!". /health_generate polls once per
      ``--health-generate-s`` (1 s, as SGLang) and gives up with 503 after
      ``SGLANG_HEALTH_CHECK_TIMEOUT`` (20 s).
    - Length rules: chat without ``max_tokens`` runs to EOS within the context
      (``finish_reason: "stop"``, ``matched_stop: 128009``); completions default
      to 16 tokens and refuse ``max_tokens: 0``; /generate defaults to 128; the
      context-length checks and their messages; ``ignore_eos``, ``min_tokens``,
      ``stop``, ``stop_token_ids``.
    - Flags: SGLang's names and checks (``--config`` must be *.yaml/*.yml,
      ``--log-level`` any logging level, unknown flags exit 2), and the startup
      log line ``server_args={...}`` with the resolved arguments, the API key
      included, as SGLang logs it: whoever keeps the engine's log must redact it.
      /server_info returns the key too (behind the key), as SGLang's does.
    - Metrics: SGLang's names, types, labels (``engine_type``, ranks,
      ``is_streaming``), buckets, per-token inter-token latency, TPOT and queue
      time histograms, KV gauges, aborted requests.

Approximates, and why
    - The text is filler, not language: each word is picked from a rolling
      CRC-32 of the whole context (text.py), so the same context always gives
      the same reply and a stream resumed from its received text (chat with
      ``continue_final_message``, completions with prompt + text) is byte for
      byte the uninterrupted one. ``seed`` picks another filler; ``temperature``
      > 0 without a seed a random one; no temperature is greedy (a model's
      default would be its generation config).
    - Where the request sets a length, the filler runs to it (no early EOS), so
      tests can count tokens; EOS (~48 tokens on average, 8 to 512) applies
      when it sets none.
    - Token counts come from a documented tokenizer (text.py) and a Llama 3
      chat template, close to a real BPE tokenizer's but not equal to any.
      Token ids are the sim's own: Llama 3's ids for the template markers
      (128000, 128006, 128007, 128009 = EOS), fixed ids for the filler words,
      per-process ids for other text (so /detokenize inverts /tokenize only
      within one process). A real model's ids need its tokenizer.
    - Log-probabilities are invented but well-formed numbers (the chosen token
      first among its top alternatives): real ones need a model.
    - ``response_format`` gives valid JSON for the schema's common keywords
      (object, array, string, integer, number, boolean, enum, const, anyOf,
      $ref), not constrained decoding of every keyword. Tool calls:
      "required" and a named function always call; "auto" calls a tool when
      the user's last message names it (a test decides), else answers text;
      after a tool's result the answer is text, so an agent loop ends.
    - The KV pool and the default ``--max-running-requests`` are SGLang's
      formula on a simulated 80 GiB GPU per rank (engine.py); there is no
      prefix cache (``cache_hit_rate`` 0) and no speculative decoding.
    - Latency is a model (latency.py): TTFT, time per output token growing with
      the running batch, a bounded batch with a FIFO queue.

The sim's own additions
    Latency flags (``--ttft-ms``, ``--tpot-ms``, ``--tpot-growth``,
    ``--ttft-per-prompt-token-ms``, ``--startup-delay-s``,
    ``--health-generate-s``, ``--embedding-dim``, ``--seed``), fault flags and
    ``POST /sim/faults`` (faults.py; admin routes), ``POST /sim/reset``,
    ``GET /sim/stats``, the older ``/get_load`` (for older gateways), and
    ``simulator``/``note``/``faults`` keys in /model_info and /server_info.

Modules: settings (flags, --config YAML), latency (the model and the running
batch), faults (pure decisions), text (tokenizer, template, filler, embeddings),
reply (sampling options -> the reply), metrics (``sglang:`` Prometheus names),
engine (live state, KV pool, the sleeping), protocol (request parsing, shapes),
streaming (server-sent events), server, openai_routes, native_routes, auth and
app (the HTTP surface), serve (uvicorn), process (`SimProcess`, a real
subprocess for tests and benchmarks). Importing this package does not import
FastAPI or uvicorn.
"""

from __future__ import annotations

from model_server.errors import SimError
from model_server.sim.settings import SimSettings, parse_sim_args

__all__ = ["SimError", "SimSettings", "parse_sim_args"]
