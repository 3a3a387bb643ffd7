"""Deterministic filler text, honest token counts, deterministic unit embeddings.

The simulator's tokenizer is deliberately simple and documented: a token is a
run of word characters (``\\w+``) or one other non-space character, so
"Hello, world!" is 4 tokens. Every count in ``usage`` comes from it, and the
filler text is made of plain words, so a reply of N words is exactly N tokens.
The filler is chosen from a hash of the prompt (and the seed): the same prompt
gives the same reply in every process. It is filler, not a model's answer.
"""

from __future__ import annotations

import functools
import math
import random
import re
import zlib
from typing import Any, Sequence

__all__ = [
    "apply_stop",
    "count_tokens",
    "embed",
    "filler_words",
    "prompt_of_messages",
    "split_pieces",
    "tokenize",
]

_TOKEN = re.compile(r"\w+|[^\w\s]")
_PIECE = re.compile(r"\s*\S+")

# Plain words only (each is exactly one token of the tokenizer above).
VOCABULARY = (
    "sim lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi "
    "aliquip ex ea commodo consequat duis aute irure in reprehenderit voluptate velit esse cillum "
    "fugiat nulla pariatur excepteur sint occaecat cupidatat non proident sunt culpa qui officia "
    "deserunt mollit anim id est laborum"
).split()


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def count_tokens(text: str) -> int:
    """Tokens of `text` by the simulator's tokenizer."""
    return len(_TOKEN.findall(text))


def prompt_of_messages(messages: Sequence[Any]) -> str:
    """A chat rendered as the simulator's 'template': one 'role: content' line per message.

    Content given as a list of parts contributes its text parts.
    """
    lines = []
    for message in messages:
        if not isinstance(message, dict):
            raise ValueError("each message must be an object with 'role' and 'content'")
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(
                str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
            )
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ValueError("message content must be a string or a list of content parts")
        lines.append(f"{message.get('role', 'user')}: {content}")
    return "\n".join(lines)


@functools.lru_cache(maxsize=4096)
def filler_words(prompt_hash: int, n: int) -> tuple[str, ...]:
    """`n` words picked by a small LCG seeded with the prompt's hash."""
    x = prompt_hash & 0x7FFFFFFF
    size = len(VOCABULARY)
    words = []
    for _ in range(n):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        words.append(VOCABULARY[(x >> 16) % size])
    return tuple(words)


def prompt_hash(prompt: str, seed: int) -> int:
    return zlib.crc32(prompt.encode("utf-8", "surrogatepass")) ^ (seed * 2654435761 & 0xFFFFFFFF)


def apply_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest stop string; (text, whether a stop applied)."""
    cut = -1
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
    if cut == -1:
        return text, False
    return text[:cut], True


def split_pieces(text: str) -> list[str]:
    """The stream pieces of `text` (one word with its leading space each); they join back to `text`."""
    pieces = _PIECE.findall(text)
    joined = "".join(pieces)
    if joined != text:  # trailing whitespace
        if pieces:
            pieces[-1] += text[len(joined) :]
        else:
            pieces = [text] if text else []
    return pieces


@functools.lru_cache(maxsize=2048)
def embed(text: str, dim: int, seed: int = 0) -> tuple[float, ...]:
    """A unit vector of `dim` floats, a deterministic function of (text, seed)."""
    rng = random.Random(f"{seed}\x00{text}")  # str seeds hash with sha512: stable across processes
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return tuple(v / norm for v in vec)
