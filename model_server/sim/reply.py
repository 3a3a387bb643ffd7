"""What the simulated model answers: the sampling options of a request and the reply they give.

`Sampling` is read once from a request (OpenAI or native); `Reply` is the
deterministic answer to one context under it: filler text (text.generate),
valid JSON for ``response_format``/``json_schema``, or tool calls for
``tools``. The rules, with what they stand in for:

- length: the request's own (``max_tokens``…) runs to that length, unless a
  stop string, a stop token id or a structured answer's end comes first;
  chat without one runs to a deterministic EOS (``matched_stop`` = 128009);
- ``ignore_eos``, ``min_tokens`` (no EOS or stop before), ``stop``,
  ``stop_token_ids`` (the sim's own ids, see text.encode) as SGLang applies them;
- ``seed`` picks another filler; ``temperature`` > 0 without a seed gives a
  different filler on every request; otherwise (greedy) the same context
  always gives the same reply;
- ``n`` > 1: choice 0 is the n = 1 reply, the others differ;
- ``logprobs``: invented but well-formed numbers (a model's would need a model).
"""

from __future__ import annotations

import json
import random
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

from model_server.sim import text as simtext

__all__ = ["Reply", "Sampling", "ToolCall", "json_instance", "piece_logprobs", "request_seed"]

_MAX_JSON_DEPTH = 6
_TOP_ALTERNATIVES = tuple(simtext.VOCABULARY[:20])


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    """One function call the simulated model makes (arguments: a JSON string), with an id of SGLang's form."""

    name: str
    arguments: str
    id: str = field(default_factory=_call_id)

    def as_json(self, index: int) -> dict[str, Any]:
        """The call as SGLang writes it, in a message (unstreamed) or a delta (streamed)."""
        return {
            "id": self.id,
            "index": index,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class Sampling:
    """The options that shape a reply, read once from the request."""

    max_new: int
    eos_from: int | None = None  # None: no EOS; else the reply tokens already in the context
    min_new: int = 0
    stops: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    seed: int = 0
    structured: Any = None  # None, True (any JSON object) or a JSON schema (dict)
    tool: dict | None = None  # the tool to call: {"name", "parameters"}

    def for_choice(self, index: int) -> Sampling:
        """Choice `index` of n: 0 is the n = 1 reply, the others another seed."""
        if index == 0:
            return self
        return Sampling(
            self.max_new,
            self.eos_from,
            self.min_new,
            self.stops,
            self.stop_ids,
            (self.seed * 1_000_003 + index * 7919) & 0x7FFFFFFF,
            self.structured,
            self.tool,
        )


def request_seed(settings_seed: int, seed: Any, temperature: Any) -> int:
    """The filler seed of a request: its own seed, else random when it samples, else the server's."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        return (settings_seed * 1_000_003 + seed + 1) & 0x7FFFFFFF
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0:
        return random.getrandbits(31)
    return settings_seed


class Reply:
    """The deterministic reply to one context: text, stream pieces (one token each), finish.

    ``finish_reason`` is "length", "stop" (``matched`` = the stop string, stop token id or
    EOS id) or "tool_calls" (``tool_calls`` set, no text).
    """

    __slots__ = ("text", "pieces", "tokens", "finish_reason", "matched", "tool_calls", "seed")

    def __init__(self, context: str, sampling: Sampling) -> None:
        self.seed = sampling.seed
        self.tool_calls: tuple[ToolCall, ...] = ()
        self.matched: str | int | None = None
        if sampling.tool is not None:
            self._tool(sampling)
        elif sampling.structured is not None:
            self._structured(sampling)
        else:
            self._filler(context, sampling)

    def _filler(self, context: str, s: Sampling) -> None:
        made = simtext.generate(context, s.max_new, s.seed, eos_from=s.eos_from, min_new=s.min_new)
        pieces = made.pieces
        tokens = len(pieces)
        finish, matched = ("stop", simtext.EOS_TOKEN_ID) if made.eos else ("length", None)
        if s.stop_ids:
            for i in range(s.min_new, len(pieces)):
                tid = simtext.token_id(pieces[i])
                if tid in s.stop_ids:  # the stop token is generated and counted, not shown
                    pieces, tokens, finish, matched = pieces[:i], i + 1, "stop", tid
                    break
        if s.stops:
            full = "".join(pieces)
            cut, stop = _find_stop(full, s.stops, len("".join(pieces[: s.min_new])))
            if stop is not None:
                # A real engine generates until the stop string is complete, then trims it from the text.
                end = len(cut) + len(stop)
                used = length = 0
                for piece in pieces:
                    if length >= end:
                        break
                    length += len(piece)
                    used += 1
                self._set(tuple(simtext.split_pieces(cut)), used, "stop", stop)
                return
        self._set(pieces, tokens, finish, matched)

    def _set(self, pieces: tuple[str, ...], tokens: int, finish: str, matched: str | int | None) -> None:
        self.pieces = tuple(pieces)
        self.text = "".join(pieces)
        self.tokens = tokens
        self.finish_reason = finish
        self.matched = matched

    def _structured(self, s: Sampling) -> None:
        schema = s.structured if isinstance(s.structured, dict) else {"type": "object"}
        value = json_instance(schema, random.Random(s.seed))
        pieces = tuple(simtext.tokenize_with_spaces(json.dumps(value, ensure_ascii=False)))
        if len(pieces) > s.max_new:  # cut off mid-object, as a real model would be
            self._set(pieces[: s.max_new], s.max_new, "length", None)
        else:  # the grammar ends with EOS
            self._set(pieces, len(pieces) + 1, "stop", simtext.EOS_TOKEN_ID)

    def _tool(self, s: Sampling) -> None:
        tool = s.tool or {}
        arguments = json.dumps(json_instance(tool.get("parameters") or {"type": "object"}, random.Random(s.seed)))
        call = ToolCall(str(tool.get("name", "")), arguments)
        self.tool_calls = (call,)
        self._set((), simtext.count_tokens(call.name) + simtext.count_tokens(arguments) + 2, "tool_calls", None)

    @property
    def token_ids(self) -> list[int]:
        """The sim's ids of the reply's tokens (text.encode's)."""
        return [simtext.token_id(p) for p in self.pieces]


def _find_stop(text: str, stops: tuple[str, ...], after: int) -> tuple[str, str | None]:
    """Cut `text` before the earliest stop string that ends past `after` characters (min_tokens)."""
    cut, matched = -1, None
    for s in stops:
        if not s:
            continue
        i = text.find(s)
        while i != -1 and i + len(s) <= after:
            i = text.find(s, i + 1)
        if i != -1 and (cut == -1 or i < cut):
            cut, matched = i, s
    if matched is None:
        return text, None
    return text[:cut], matched


def json_instance(schema: Any, rng: random.Random, root: Any = None, depth: int = 0) -> Any:
    """A small value valid under a JSON schema (the common keywords), chosen by `rng`.

    A schema it cannot read (a bound that is no number, say) gives an empty object.
    """
    try:
        return _instance(schema, rng, schema if root is None else root, depth)
    except (AttributeError, IndexError, KeyError, OverflowError, RecursionError, TypeError, ValueError):
        return {}


def _instance(schema: Any, rng: random.Random, root: Any, depth: int) -> Any:
    if not isinstance(schema, dict) or depth > _MAX_JSON_DEPTH:
        return None if depth > _MAX_JSON_DEPTH else {}
    if "$ref" in schema:
        target: Any = root
        for part in str(schema["$ref"]).lstrip("#/").split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return _instance(target, rng, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return _instance(schema[key][0], rng, root, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties") or {}
        if not props:
            return {"sim": _words(rng, 2)} if depth == 0 else {}
        return {str(name): _instance(sub, rng, root, depth + 1) for name, sub in props.items()}
    if kind == "array":
        count = max(int(schema.get("minItems", 1) or 0), 1)
        count = min(count, int(schema.get("maxItems", count)))
        return [_instance(schema.get("items") or {}, rng, root, depth + 1) for _ in range(count)]
    if kind == "integer":
        low = int(schema.get("minimum", 0))
        return min(max(low, rng.randint(0, 100)), int(schema.get("maximum", 1 << 31)))
    if kind == "number":
        low = float(schema.get("minimum", 0.0))
        return min(max(low, round(rng.uniform(0, 100), 2)), float(schema.get("maximum", 1e300)))
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    text = _words(rng, 2)
    low, high = int(schema.get("minLength", 0)), int(schema.get("maxLength", 1 << 20))
    while len(text) < low:
        text += " " + _words(rng, 1)
    return text[:high]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(simtext.VOCABULARY) for _ in range(n))


def piece_logprobs(piece: str, position: int, top: int) -> tuple[float, list[tuple[str, float]]]:
    """(the piece's logprob, the `top` most likely tokens with theirs): invented, stable numbers."""
    h = zlib.crc32(f"{position}\x00{piece}".encode("utf-8", "surrogatepass"))
    logprob = -round((h % 2000) / 1000.0, 4)
    alternatives = [(piece, logprob)]
    lead = " " if piece.startswith(" ") else ""
    for j, word in enumerate(a for a in _TOP_ALTERNATIVES if lead + a != piece):
        if len(alternatives) >= top:
            break
        alternatives.append((lead + word, round(logprob - 1.0 - 0.5 * j, 4)))
    return logprob, alternatives[:top]
