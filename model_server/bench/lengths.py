"""What each request asks: a prompt of some length and a number of output tokens.

Lengths are fixed (``"128"``), uniform over an inclusive range (``"64:256"``,
drawn from a seeded generator) or taken from a JSONL dataset whose lines hold a
``prompt`` and optionally an ``output_len``. A synthetic prompt of N tokens is
N short words, different for every request so no cache can answer it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from model_server.errors import BenchError

__all__ = ["BenchRequest", "LengthRange", "RequestSource", "load_dataset", "parse_length", "synthetic_prompt"]

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima")


@dataclass(frozen=True)
class BenchRequest:
    """One request of a run: its prompt and how many tokens to generate at most."""

    prompt: str
    max_tokens: int
    prompt_words: int  # the synthetic length, or the dataset prompt's word count


@dataclass(frozen=True)
class LengthRange:
    """An inclusive integer range; low == high is a fixed length."""

    low: int
    high: int

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


def parse_length(text: str | int, *, option: str, minimum: int = 1) -> LengthRange:
    """``"128"`` -> fixed 128; ``"64:256"`` -> uniform in [64, 256]."""
    raw = str(text).strip()
    parts = raw.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise BenchError(
            f"{option} is {raw!r}: give a whole number (fixed, e.g. 128) or a range low:high (uniform, e.g. 64:256)."
        )
    low, high = values[0], values[-1]
    if low < minimum or high < low:
        raise BenchError(
            f"{option} is {raw!r}: lengths must be >= {minimum} and a range's low end must not exceed its high end."
        )
    return LengthRange(low, high)


def _tag(index: int) -> str:
    """A word of letters only that names request ``index`` (``r`` + base 26; warm-ups, negative, ``w``)."""
    n, letters = abs(index), ""
    while True:
        n, digit = divmod(n, 26)
        letters = chr(ord("a") + digit) + letters
        if n == 0:
            return ("r" if index >= 0 else "w") + letters


def request_index(prompt: str) -> int | None:
    """The index :func:`synthetic_prompt` put in its first word, or None for another prompt."""
    head = prompt.split(maxsplit=1)[0] if prompt.strip() else ""
    if len(head) < 2 or head[0] not in "rw" or not head[1:].isalpha() or not head[1:].islower() or not head.isascii():
        return None
    n = 0
    for letter in head[1:]:
        n = n * 26 + ord(letter) - ord("a")
    return n if head[0] == "r" else -n


def synthetic_prompt(words: int, index: int) -> str:
    """``words`` plain words, the first naming the request (``rbr`` for 43), so no two prompts are equal.

    Each word is letters only and at most 12 long: one token for the
    simulator's tokenizer (which splits digits off letters, as Llama 3's
    does), and about one for a real BPE tokenizer.
    """
    body = [_WORDS[(index + i) % len(_WORDS)] for i in range(max(0, words - 1))]
    return " ".join([_tag(index), *body])


def load_dataset(path: str | Path) -> tuple[tuple[str, int | None], ...]:
    """``(prompt, output_len or None)`` per JSONL line; a clear error for a bad line."""
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise BenchError(
            f'dataset {file}: cannot read it ({err.strerror or err}). Give a JSONL file with one {{"prompt": '
            '..., "output_len": ...} per line.'
        ) from err
    rows: list[tuple[str, int | None]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise BenchError(
                f"dataset {file}, line {number}: not valid JSON ({err.msg}). Each line must be one JSON object."
            ) from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise BenchError(f'dataset {file}, line {number}: needs a non-empty string field "prompt".')
        out = item.get("output_len")
        if out is not None and (isinstance(out, bool) or not isinstance(out, int) or out < 1):
            raise BenchError(
                f'dataset {file}, line {number}: "output_len" is {out!r}; give a whole number >= 1 or leave it out.'
            )
        rows.append((item["prompt"], out))
    if not rows:
        raise BenchError(f'dataset {file}: it has no requests. Add lines like {{"prompt": "...", "output_len": 128}}.')
    return tuple(rows)


class RequestSource:
    """Yields the run's requests: synthetic lengths, or a dataset cycled in order.

    A dataset line without ``output_len`` takes its output length from
    ``output_len`` (the --output-len option).
    """

    def __init__(
        self,
        *,
        prompt_len: LengthRange = LengthRange(128, 128),
        output_len: LengthRange = LengthRange(128, 128),
        dataset: tuple[tuple[str, int | None], ...] | None = None,
        seed: int = 0,
    ) -> None:
        self.prompt_len = prompt_len
        self.output_len = output_len
        self.dataset = dataset
        self.seed = seed

    def __iter__(self) -> Iterator[BenchRequest]:
        index = 0
        while True:
            yield self.make(index)
            index += 1

    def make(self, index: int) -> BenchRequest:
        """The request number ``index``: a function of (seed, index), whatever order workers ask in."""
        rng = random.Random(self.seed * 1_000_003 + index)
        if self.dataset:
            prompt, out = self.dataset[index % len(self.dataset)]
            max_tokens = out if out is not None else self.output_len.draw(rng)
            return BenchRequest(prompt, max_tokens, len(prompt.split()))
        words = self.prompt_len.draw(rng)
        return BenchRequest(synthetic_prompt(words, index), self.output_len.draw(rng), words)
