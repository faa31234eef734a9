"""Refusals logged once per kind and cause, their repeats summed: an outage under load
is a few lines, not one per request.

Behind a load balancer the API answers hundreds of requests a second. While Redis or the
database is down or refuses it, each refused request used to log its own line, the same
text for as long as the outage lasted: it buried the first, useful line and filled the
disk. :class:`RefusalLog` logs the first refusal of each kind and cause in full at once,
then one line per :data:`EVERY_S` counting its repeats (and quoting the latest), and one
line once none came for :data:`QUIET_S`: how many there were and over how long. Distinct
kinds or causes (Redis down and the database refusing the role) are each logged in full,
never summed into another's count.
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from contract.errors import BertstreamError, causes

#: Seconds between two lines of one kind and cause while its refusals go on.
EVERY_S = 60.0
#: Seconds without a refusal of a kind and cause that end it: its last line says so, and
#: the next one is logged in full again.
QUIET_S = 10.0
#: How often a log with refusals pending looks for lines due (:meth:`RefusalLog.tick`).
TICK_S = 1.0
#: Kinds and causes followed at once; past it a new one is logged in full, every time.
MAX_KINDS = 200


def cause_key(exc: BaseException) -> str:
    """What tells one cause of a refusal from another: what a setting lacks
    (``problem``: a misconfiguration), else the kinds of the driver's errors under it
    (their types, a Redis error reply's text with its numbers left out, an OS error's
    errno, a database error's SQLSTATE), each once and sorted: a retry that wraps the
    same error again is the same cause. Never a request's own data (ids, parameters),
    so the repeats of one cause share a key."""
    problem = getattr(exc, "problem", None)
    if isinstance(problem, str):
        return problem
    parts: set[str] = set()
    for cause in causes(exc):
        if isinstance(cause, BertstreamError):
            continue
        kind = type(cause)
        parts.add(f"{kind.__module__}.{kind.__qualname__}")
        if isinstance(cause, redis.ResponseError):
            parts.add(re.sub(r"\d+", "N", str(cause))[:200])
        for attr in ("errno", "sqlstate"):
            value = getattr(cause, attr, None)
            if isinstance(value, int | str):
                parts.add(f"{attr} {value}")
    return " + ".join(sorted(parts)) or f"{type(exc).__module__}.{type(exc).__qualname__}"


def bug_key(exc: BaseException) -> str:
    """An unexpected exception's type and the line that raised it: the same bug, met again."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__module__}.{type(exc).__qualname__} at {where}"


@dataclass
class _Kind:
    """The refusals of one kind and cause since it was first met."""

    level: int
    first_at: float
    #: when its last line was logged, and when its last refusal came
    logged_at: float
    last_at: float
    total: int = 1
    #: refusals since its last line, and the latest one's message (format and args)
    unlogged: int = 0
    latest: tuple[str, tuple[Any, ...]] = field(default=("", ()))


class RefusalLog:
    """Logs refusals on ``logger``: each kind and cause in full the first time, then its
    repeats summed (see the module's docstring). Thread-safe: the API's handlers run on
    its event loop and in its thread pool.

    ``ticker``: a daemon thread, alive only while refusals are followed, logs the lines
    due every :data:`TICK_S` (else :meth:`tick` does, when called). ``every_s`` and
    ``quiet_s``: :data:`EVERY_S` and :data:`QUIET_S` as they are when it is made.
    ``clock``: seconds."""

    def __init__(self, logger: logging.Logger, *, every_s: float | None = None,
                 quiet_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 ticker: bool = True) -> None:
        self.logger = logger
        self.every_s = EVERY_S if every_s is None else every_s
        self.quiet_s = QUIET_S if quiet_s is None else quiet_s
        self.clock = clock
        self._ticker_wanted = ticker
        self._ticker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._kinds: dict[tuple[str, str], _Kind] = {}

    def note(self, what: str, cause: str, level: int, msg: str, *args: Any,
             exc_info: BaseException | None = None) -> None:
        """A refusal of kind ``what`` (``"answering 503 database_unavailable"``) with
        ``cause`` (:func:`cause_key`): ``msg % args`` logged at ``level`` in full (with
        ``exc_info``'s traceback) when the pair is new, else counted; its count logged
        when :attr:`every_s` passed since its last line."""
        now = self.clock()
        key = (what, cause)
        lines: list[tuple[int, str, tuple[Any, ...]]] = []
        with self._lock:
            kind = self._kinds.get(key)
            if kind is not None and now - kind.last_at >= self.quiet_s:
                ended = self._kinds.pop(key)  # ended before the ticker saw it
                if ended.total > 1:
                    lines.append(self._ended(what, ended, now))
                kind = None
            if kind is None:
                if len(self._kinds) < MAX_KINDS:
                    self._kinds[key] = _Kind(level, now, now, now)
                    _FOLLOWING.add(self)
                    self._start_ticker()
                full = True
            else:
                full = False
                kind.total += 1
                kind.unlogged += 1
                kind.last_at = now
                kind.latest = (msg, args)
                if now - kind.logged_at >= self.every_s:
                    lines.append(self._summary(what, kind, now))
        self._log(lines)
        if full:
            self.logger.log(level, msg, *args, exc_info=exc_info)

    def tick(self) -> None:
        """Log the lines due: each kind's count once :attr:`every_s` passed since its last
        line, and its end once none came for :attr:`quiet_s`."""
        now = self.clock()
        lines: list[tuple[int, str, tuple[Any, ...]]] = []
        with self._lock:
            for key, kind in list(self._kinds.items()):
                if now - kind.last_at >= self.quiet_s:
                    ended = self._kinds.pop(key)
                    if ended.total > 1:  # one refusal alone: its line said all
                        lines.append(self._ended(key[0], ended, now))
                elif kind.unlogged and now - kind.logged_at >= self.every_s:
                    lines.append(self._summary(key[0], kind, now))
            if not self._kinds:
                _FOLLOWING.discard(self)
        self._log(lines)

    def close(self) -> None:
        """Log the counts not logged yet, and follow nothing more: the process is ending
        (at exit, for every log: a server stopped during an outage says what it hid)."""
        lines: list[tuple[int, str, tuple[Any, ...]]] = []
        with self._lock:
            for (what, _cause), kind in self._kinds.items():
                if kind.unlogged:
                    lines.append((kind.level, "%s: %d more like it since the last line, up to "
                                  "the server's stop; %d in all over %.0f s",
                                  (what, kind.unlogged, kind.total,
                                   kind.last_at - kind.first_at)))
            self._kinds.clear()
            _FOLLOWING.discard(self)
        self._log(lines)

    @property
    def followed(self) -> int:
        """Kinds and causes being followed now (met within :attr:`quiet_s`)."""
        with self._lock:
            return len(self._kinds)

    def _summary(self, what: str, kind: _Kind, now: float) -> tuple[int, str, tuple[Any, ...]]:
        """The line of ``kind``'s repeats since its last line (which it resets)."""
        msg, args = kind.latest
        line = (kind.level, "%s: %d more like it in the last %.0f s; the latest: %s",
                (what, kind.unlogged, now - kind.logged_at, _render(msg, args)))
        kind.unlogged, kind.logged_at = 0, now
        return line

    def _ended(self, what: str, kind: _Kind, now: float) -> tuple[int, str, tuple[Any, ...]]:
        """The line of ``kind``'s end: none for :attr:`quiet_s`. A WARNING (the kind's own
        level if lower): an end is no error, yet shows wherever its warnings did."""
        return (min(kind.level, logging.WARNING),
                "%s: none for %.0f s; %d in all over %.0f s (%d since the last line)",
                (what, now - kind.last_at, kind.total, kind.last_at - kind.first_at,
                 kind.unlogged))

    def _log(self, lines: list[tuple[int, str, tuple[Any, ...]]]) -> None:
        for level, msg, args in lines:
            self.logger.log(level, msg, *args)

    def _start_ticker(self) -> None:
        """Start the thread of :meth:`tick` unless it runs (called holding the lock)."""
        if self._ticker_wanted and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick_while_followed, daemon=True,
                                            name="bertstream-refusal-log")
            self._ticker.start()

    def _tick_while_followed(self) -> None:
        while True:
            time.sleep(TICK_S)  # the lines due are logged within a second of it
            self.tick()
            with self._lock:
                if not self._kinds:
                    self._ticker = None
                    return


#: The :class:`RefusalLog` objects following refusals now, for :func:`close_all`
#: (held here until their refusals end: an app gone by then still says what it hid).
_FOLLOWING: set[RefusalLog] = set()


@atexit.register
def close_all() -> None:
    """Every log's counts not logged yet (:meth:`RefusalLog.close`): a server stopped
    during an outage says what it hid. Called as the app shuts down (uvicorn ends its
    process on SIGTERM by the signal, past ``atexit``), and at exit."""
    for refusals in list(_FOLLOWING):
        refusals.close()


def _render(msg: str, args: tuple[Any, ...]) -> str:
    """``msg % args`` as logging renders it (a bad format shown, never raised)."""
    try:
        return msg % args if args else msg
    except (TypeError, ValueError):
        return f"{msg} {args!r}"
