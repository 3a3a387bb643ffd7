"""Secrets out of every text the launcher writes: engine logs, the status file, its own log, messages.

SGLang logs its resolved settings at startup, API key included
(``server_args=ServerArgs(..., api_key='KEY', ...)``), and whoever owns an
engine's log must redact the key. The pipeline owns every engine's output (see
enginelog.py) and passes it, its status file and its own log records through
one :class:`Redactor`, built from the API key and the values of the
variables the table lists in ``launch.secret_env``.

Two rules, both applied:

- every known secret is replaced wherever it appears, also as Python's
  ``repr``, JSON and the shell escape it (a key with a quote in it is logged
  escaped);
- a quoted value assigned to ``api_key`` or ``admin_api_key`` (``=`` or
  ``:``, as ServerArgs, JSON or YAML print it) is replaced whatever it is, so a
  key the launcher never saw does not leak either.

Pure: no I/O. A :class:`Secret` holds one value and never shows it in a repr
or a message.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from collections.abc import Iterable

__all__ = ["MASK", "RedactingFilter", "Redactor", "Secret"]

MASK = "***"
_ASSIGNED = r"""\b((?:admin_)?api[_-]key)(['"]?\s*[=:]\s*)(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")"""


class Secret:
    """A secret value that never shows itself: ``repr``/``str`` give ``***``; ``.value`` gives it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    @property
    def value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{MASK}')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _variants(secret: str) -> set[str]:
    """The ways a secret is printed: as is, inside a Python repr, inside a JSON string, shell-quoted."""
    return {
        secret,
        repr(secret)[1:-1],
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        shlex.quote(secret),
    }


def _to_bytes(text: str) -> bytes:
    """UTF-8, with an environment value's undecodable bytes (surrogate escapes) restored as they were."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


class Redactor:
    """Replaces the given secrets (and any quoted ``api_key`` value) by ``***``, in text and in bytes."""

    def __init__(self, secrets: Iterable[str | Secret] = ()) -> None:
        values = [s.value if isinstance(s, Secret) else s for s in secrets]
        found: set[str] = set()
        for value in values:
            if value:
                found |= _variants(value)
        ordered = sorted(found, key=len, reverse=True)  # the longest first: a key inside another
        self._count = len([v for v in values if v])
        self._text = re.compile("|".join(re.escape(v) for v in ordered)) if ordered else None
        self._bytes = re.compile(b"|".join(re.escape(_to_bytes(v)) for v in ordered)) if ordered else None
        self._assigned_text = re.compile(_ASSIGNED, re.IGNORECASE)
        self._assigned_bytes = re.compile(_ASSIGNED.encode(), re.IGNORECASE)
        # A stream redactor must hold back this many bytes: a secret may be split between two reads.
        self.hold_back_bytes = max((len(_to_bytes(v)) for v in ordered), default=1) - 1

    def __repr__(self) -> str:
        return f"Redactor({self._count} secret{'s' if self._count != 1 else ''})"

    def redact(self, text: str) -> str:
        if self._text is not None:
            text = self._text.sub(MASK, text)
        return self._assigned_text.sub(lambda m: f"{m.group(1)}{m.group(2)}'{MASK}'", text)

    def redact_bytes(self, data: bytes) -> bytes:
        if self._bytes is not None:
            data = self._bytes.sub(MASK.encode(), data)
        return self._assigned_bytes.sub(lambda m: m.group(1) + m.group(2) + b"'" + MASK.encode() + b"'", data)


class RedactingFilter(logging.Filter):
    """A logging filter that renders each record's message once and redacts it (install on handlers)."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's to report, not ours
            return True
        record.msg, record.args = self.redactor.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.redactor.redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = self.redactor.redact(record.exc_text)
        return True
