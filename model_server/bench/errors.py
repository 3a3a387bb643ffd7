"""The benchmark's one error type.

``BenchError`` hangs under :class:`~model_server.errors.ModelServerError`, so
the CLI prints its one-paragraph message and exits with status 2::

    ModelServerError
    └── BenchError         a bench option, trace, dataset or fault spec is wrong
"""

from __future__ import annotations

from model_server.errors import ModelServerError

__all__ = ["BenchError"]


class BenchError(ModelServerError, ValueError):
    """A benchmark input (rate, lengths, dataset, trace, fault schedule) is invalid."""
