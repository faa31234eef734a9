"""The base of the model-assembly errors.

Where the ``contract`` package is installed, :class:`ReportedError` is its
``ConfigError``: every command reports it in one line and exits 2. The lent
GPU machine runs the trainer (``training.full_train``) without ``contract``;
there it is a plain stand-in, so the same modules still import.
"""

from __future__ import annotations

try:
    from contract.errors import ConfigError as ReportedError
except ImportError:  # the lent GPU machine: torch and transformers only

    class ReportedError(Exception):  # type: ignore[no-redef]
        """Stands in for ``contract.errors.ConfigError`` where ``contract`` is absent."""
