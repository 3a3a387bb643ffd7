"""The simulated model's text: a chat template, a tokenizer, filler text and embeddings.

Tokenizer. A documented stand-in for a BPE tokenizer, close enough for context
budgeting: a chat-template marker such as ``<|eot_id|>`` is one token, a run of
up to 3 digits is one token (like Llama 3's), a run of up to 12 letters is one
token, each CJK character is one token, each other non-space character is one
token, and a run of newlines is one token; other whitespace is free. So
"Hello, world!" is 4 tokens and "2026" is 2. Every count in ``usage`` comes
from it.

Chat template. Messages are rendered in Llama 3's shape, so a chat prompt costs
what it costs on a real Llama 3 server (1 token of BOS, 5 per message, 4 for
the generation prompt, plus the contents)::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

With ``continue_final_message`` the final assistant message is left open (no
``<|eot_id|>``), so its content is the start of the reply.

Filler. The reply is a pure function of the context (the rendered prompt and
everything generated so far) and the seed: each next word is picked from a
rolling CRC-32 of the whole context, and a piece gets a leading space unless
the context ends with whitespace. A context that already holds the first k
pieces of a reply therefore continues with piece k+1: a stream resumed from the
text received (chat with ``continue_final_message``, or completions with the
prompt plus that text) is byte for byte the stream that was never interrupted.
Each filler word is exactly one token. It is filler, not a model's answer.
"""

from __future__ import annotations

import functools
import math
import random
import re
import zlib
from collections.abc import Sequence
from typing import Any

__all__ = [
    "EOS_TOKEN_ID",
    "decode",
    "encode",
    "token_id",
    "VOCABULARY",
    "Generated",
    "apply_stop",
    "chat_context",
    "count_tokens",
    "embed",
    "generate",
    "split_pieces",
    "tokenize",
    "tokenize_with_spaces",
]

_CJK = "\u2e80-\u2fdf\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_ONE = rf"<\|[A-Za-z0-9_]{{1,40}}\|>|\d{{1,3}}|[{_CJK}]|[^\W\d_{_CJK}]{{1,12}}|_+|\n+|[^\w\s]"
_TOKEN = re.compile(_ONE)
_TOKEN_WITH_SPACE = re.compile(rf"[^\S\n]*(?:{_ONE})")  # the same tokens, each with the spaces before it
_PIECE = re.compile(r"\s*\S+")

# Plain words of at most 12 letters: each is exactly one token of the tokenizer above.
VOCABULARY = (
    "sim lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi "
    "aliquip ex ea commodo consequat duis aute irure in voluptate velit esse cillum "
    "fugiat nulla pariatur excepteur sint occaecat cupidatat non proident sunt culpa qui officia "
    "deserunt mollit anim id est laborum"
).split()
_SPACED = tuple((" " + w).encode() for w in VOCABULARY)
_BARE = tuple(w.encode() for w in VOCABULARY)

# The simulated end of sequence: its id is Llama 3's <|eot_id|>, which SGLang reports as matched_stop.
EOS_TOKEN_ID = 128009
EOS_MIN_TOKENS = 8  # no EOS before this many reply tokens
EOS_ONE_IN = 40  # after that, each next token is EOS with probability 1/40 (a reply of ~48 tokens on average)
EOS_MAX_TOKENS = 512  # and an EOS at the latest here

BOS = "<|begin_of_text|>"
_HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
_EOT = "<|eot_id|>"


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


# --- token ids: the simulator's own vocabulary, stable across processes where it can be ---

SPECIAL_IDS = {BOS: 128000, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eot_id|>": 128009}
WORD_ID_BASE = 1000  # filler word i is id 1000 + 2i bare, 1001 + 2i with its leading space
INTERNED_ID_BASE = 200_000  # any other token: interned in this process (bounded), else hashed
_MAX_INTERNED = 200_000
_ID_OF: dict[str, int] = dict(SPECIAL_IDS)
for _i, _w in enumerate(VOCABULARY):
    _ID_OF[_w] = WORD_ID_BASE + 2 * _i
    _ID_OF[" " + _w] = WORD_ID_BASE + 2 * _i + 1
_TEXT_OF: dict[int, str] = {v: k for k, v in _ID_OF.items()}
_SPECIAL_ID_SET = frozenset(SPECIAL_IDS.values())


def token_id(token: str) -> int:
    """The id of one token (with its leading spaces). Template markers have Llama 3's ids, filler
    words fixed ids; other tokens get the next free id of this process (hashed once 200k are taken)."""
    tid = _ID_OF.get(token)
    if tid is None:
        if len(_ID_OF) < _MAX_INTERNED:
            tid = INTERNED_ID_BASE + len(_ID_OF)
            _ID_OF[token] = tid
            _TEXT_OF[tid] = token
        else:
            tid = INTERNED_ID_BASE + _MAX_INTERNED + zlib.crc32(token.encode("utf-8", "surrogatepass")) % 10_000_000
    return tid


def encode(text: str) -> list[int]:
    """Token ids of `text`: one per token of count_tokens; detokenize() gives the text back
    (trailing spaces aside) within this process."""
    return [token_id(t) for t in _TOKEN_WITH_SPACE.findall(text)]


def decode(ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    """Text of token ids (an id this process never gave out decodes to nothing)."""
    special = _SPECIAL_ID_SET if skip_special_tokens else frozenset()
    return "".join(_TEXT_OF.get(i, "") for i in ids if i not in special)


def count_tokens(text: str) -> int:
    """Tokens of `text` by the simulator's tokenizer."""
    return len(_TOKEN.findall(text))


def _content_text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ValueError("message content must be a string or a list of content parts")
    return content


def chat_context(messages: Sequence[Any], *, continue_final_message: bool = False) -> tuple[str, str]:
    """(the rendered prompt, the assistant prefix it ends with) for a list of chat messages.

    Like SGLang: with `continue_final_message` and a final assistant message whose
    content is a string, that message is left open and its content (the prefix) is
    where the reply goes on; without it, a final assistant message is sent as a user's.
    """
    messages = list(messages)
    for message in messages:
        if not isinstance(message, dict):
            raise ValueError("each message must be an object with 'role' and 'content'")
    prefix = ""
    last = messages[-1] if messages else None
    if last is not None and last.get("role") == "assistant" and isinstance(last.get("content"), str):
        if continue_final_message:
            prefix = last["content"]
            messages = messages[:-1]
        else:
            messages[-1] = {"role": "user", "content": last["content"]}
    parts = [BOS]
    for message in messages:
        role = message.get("role") or "user"
        parts += [_HEADER.format(role=role), _content_text(message.get("content")), _EOT]
    parts += [_HEADER.format(role="assistant"), prefix]
    return "".join(parts), prefix


class Generated:
    """The pieces the simulated model generates after a context (one token each)."""

    __slots__ = ("pieces", "eos")

    def __init__(self, pieces: tuple[str, ...], eos: bool) -> None:
        self.pieces = pieces
        self.eos = eos  # it ended with the simulated EOS (else it ran out of tokens)


def _mix(state: int, salt: int) -> int:
    x = (state ^ salt) * 0x9E3779B1 & 0xFFFFFFFF
    return x ^ (x >> 15)


def _salt(seed: int) -> int:
    return (seed * 2654435761 + 0x5BD1E995) & 0xFFFFFFFF


def generate(context: str, n: int, seed: int = 0, *, eos_from: int | None = None, min_new: int = 0) -> Generated:
    """Up to `n` pieces that follow `context`; a pure function of its arguments.

    `eos_from` is None when the request gives its own length (no EOS then: it runs to `n`),
    else the number of reply tokens already in the context (the assistant prefix), so that
    the EOS lands on the same token whether or not the stream was resumed. No EOS comes
    before `min_new` pieces.
    """
    data = context.encode("utf-8", "surrogatepass")
    return _generate(zlib.crc32(data), not context or context[-1].isspace(), n, seed, eos_from, min_new)


def tokenize_with_spaces(text: str) -> list[str]:
    """`text` as tokens that keep the spaces before them: they join back to `text` (trailing spaces aside)."""
    return _TOKEN_WITH_SPACE.findall(text)


@functools.lru_cache(maxsize=8192)
def _generate(state: int, after_space: bool, n: int, seed: int, eos_from: int | None, min_new: int) -> Generated:
    salt = _salt(seed)
    eos_salt = salt ^ 0xA5A5A5A5
    size = len(VOCABULARY)
    crc32 = zlib.crc32
    pieces: list[str] = []
    position = eos_from
    for made in range(n):
        if position is not None:
            if made >= min_new and (
                position >= EOS_MAX_TOKENS or (position >= EOS_MIN_TOKENS and _mix(state, eos_salt) % EOS_ONE_IN == 0)
            ):
                return Generated(tuple(pieces), True)
            position += 1
        i = (_mix(state, salt) >> 8) % size
        if after_space:
            piece_bytes = _BARE[i]
            after_space = False
        else:
            piece_bytes = _SPACED[i]
        pieces.append(piece_bytes.decode())
        state = crc32(piece_bytes, state)
    return Generated(tuple(pieces), False)


def apply_stop(text: str, stop: Sequence[str]) -> tuple[str, str | None]:
    """Cut `text` before the earliest stop string: (text, the stop string matched, or None)."""
    cut = -1
    matched = None
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut, matched = i, s
    if cut == -1:
        return text, None
    return text[:cut], matched


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
