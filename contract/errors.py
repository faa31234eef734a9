"""The error hierarchy of bertstream.

Retryable errors (the same work may succeed later: a database outage, a
broker hiccup, GPU memory pressure) are kept apart from fatal ones (the input
itself is wrong and will never succeed). Workers ack fatal item errors as
``failed`` rows and requeue retryable ones.
"""

from __future__ import annotations


class BertstreamError(Exception):
    """Base class of every error bertstream raises on purpose."""


class ConfigError(BertstreamError):
    """A setting is missing, malformed or out of range."""


class FatalError(BertstreamError):
    """Retrying the same work cannot succeed."""


class RetryableError(BertstreamError):
    """The same work may succeed later; the message must not be acked."""


class InvalidInput(FatalError):
    """A text or task item fails validation (empty, oversized, undecodable, malformed)."""

    def __init__(self, reason: str, item_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.item_id = item_id


class ModelError(FatalError):
    """The model cannot process an item (it raised on that item alone)."""


class ModelLoadError(FatalError):
    """The model directory cannot be loaded."""


class StoreUnavailable(RetryableError):
    """The results database cannot be reached or refused the transaction."""


class BrokerUnavailable(RetryableError):
    """The message broker cannot be reached."""


class ResultTimeout(BertstreamError):
    """Waiting for results ran past its timeout; the tasks may still finish."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(f"{len(missing)} result(s) not ready before the timeout")
        self.missing = missing
