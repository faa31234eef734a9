"""The error hierarchy of bertstream.

Retryable errors (the same work may succeed later: a database outage, a
broker hiccup, GPU memory pressure) are kept apart from fatal ones (the input
itself is wrong and will never succeed). Workers ack fatal item errors as
``failed`` rows and requeue retryable ones.
"""

from __future__ import annotations

from collections.abc import Iterator


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then each error it was raised from or while handling (``__cause__``, else
    ``__context__``), each once: a cycle in the chain ends it."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def quoted(value: str, limit: int = 100) -> str:
    """``value`` as an error line quotes it: its ``repr``, so control characters are
    escaped once (``'bad\\x01src'``), cut after ``limit`` characters with its length said,
    so a refused value of any size keeps the error to one short line."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class BertstreamError(Exception):
    """Base class of every error bertstream raises on purpose."""


class ConfigError(BertstreamError):
    """A setting is missing, malformed or out of range."""


class BrokerMisconfigured(ConfigError):
    """Redis answered but refused what the broker URL asks
    (:func:`contract.broker.broker_error`): a setting, or the server, to fix; no retry
    mends it. ``problem`` says what without the URL, for answers that must not show hosts
    (the HTTP API's)."""

    def __init__(self, message: str, problem: str) -> None:
        super().__init__(message)
        self.problem = problem


class SchemaMismatch(ConfigError):
    """The results database is not at the schema revision this bertstream needs."""


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


class IdConflict(InvalidInput):
    """A caller id is already stored (or accepted) with a different text."""


class ModelError(FatalError):
    """The model cannot process an item (it raised on that item alone)."""


class ModelLoadError(FatalError):
    """The model directory cannot be loaded (a setting to fix: exit 2, as a ConfigError)."""


class StoreUnavailable(RetryableError):
    """The results database cannot be reached or refused the transaction."""


class StoreRefused(StoreUnavailable, ConfigError):
    """The database refuses this role or URL (a privilege it lacks, a role or database
    that does not exist, a wrong password): a setting to fix, so a command or a start-up
    exits 2 with what to grant, not 3 as for an outage. Still a :class:`StoreUnavailable`
    to a running worker, which rides it out (a GRANT mends it without a restart).
    ``problem`` is the cause and its fix without the URL's host or password (``/readyz``
    shows it)."""

    def __init__(self, message: str, problem: str) -> None:
        super().__init__(message)
        self.problem = problem


class _StreamProgress(Exception):
    """How far a submit or stream got before it stopped: ``sent`` items published, and
    ``resume_line`` the first source line not known to be handled (streams only)."""

    #: How the message words the stop ("before the failure", "before it stopped").
    stopped = "before the failure"

    def __init__(self, reason: str, *, sent: int | None = None,
                 resume_line: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent
        self.resume_line = resume_line

    def __str__(self) -> str:
        parts = [self.reason]
        if self.sent is not None:
            parts.append(f"{self.sent} item(s) were sent {self.stopped}")
        if self.resume_line is not None:
            parts.append(f"resume from line {self.resume_line}")
        return "; ".join(parts)


class BrokerUnavailable(_StreamProgress, RetryableError):
    """The message broker cannot be reached.

    ``sent`` and ``resume_line`` say where a caller can resume (:class:`_StreamProgress`).
    """


class StreamFailed(_StreamProgress, BertstreamError):
    """A stream stopped by an I/O error: its source failed to read (a failing disk or
    network mount) or a tracker failed to write (the ids file on a full disk). What was
    sent stays queued; ``sent`` and ``resume_line`` say where to resume (exit 1)."""


class Interrupted(_StreamProgress, BertstreamError):
    """A stream was stopped (Ctrl-C, SIGTERM); its unsent buffer was not published.

    ``sent`` and ``resume_line`` mean what they mean for :class:`BrokerUnavailable`.
    """

    stopped = "before it stopped"

    def __init__(self, reason: str = "interrupted", *, sent: int | None = None,
                 resume_line: int | None = None) -> None:
        super().__init__(reason, sent=sent, resume_line=resume_line)


class ResultTimeout(BertstreamError):
    """Waiting for results ran past its timeout; the tasks may still finish."""

    def __init__(self, missing: list[str], hint: str | None = None) -> None:
        super().__init__(f"{len(missing)} result(s) not ready before the timeout")
        self.missing = missing
        #: What the caller may do about it (e.g. no worker is alive), when known.
        self.hint = hint


#: Process exit codes of the CLI and the worker, by error class.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4
#: A stream sent its good records but refused some (they are listed).
EXIT_REJECTED = 5
#: Stopped by SIGINT or SIGTERM (128 + SIGINT, as shells report Ctrl-C).
EXIT_INTERRUPTED = 130


def exit_code(exc: BaseException) -> int:
    """The documented exit code for ``exc``: 2 bad input or settings (a model folder that
    cannot be loaded included, a database that refuses the role: :class:`StoreRefused`),
    3 Redis or the database unreachable, 4 results not ready
    in time, 130 interrupted, 1 anything else."""
    if isinstance(exc, (InvalidInput, ConfigError, ModelLoadError)):
        return EXIT_USAGE
    if isinstance(exc, (BrokerUnavailable, StoreUnavailable)):
        return EXIT_UNREACHABLE
    if isinstance(exc, ResultTimeout):
        return EXIT_TIMEOUT
    if isinstance(exc, Interrupted):
        return EXIT_INTERRUPTED
    return EXIT_ERROR
