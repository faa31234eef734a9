"""A slow read that callers share and wait for a bounded time (metrics scrapes of Redis).

One read runs at a time, in a daemon thread of its own: a caller while one is under way
waits for that one rather than starting another, so callers of a source that does not
answer (a paused Redis) neither pile up threads or connections nor wait past their
bound. A read that ends after every caller waiting on it gave up is kept and given,
once, to the next caller whose own read does not end in time: a source slower than the
bound that answers every read is not taken as down at every call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Attempt(Generic[T]):
    """One read: ``value`` or ``error`` once it ended (``done``); ``abandoned`` once a
    caller stopped waiting for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: T | None = None
        self.error: Exception | None = None
        self.abandoned = False


class SharedRead(Generic[T]):
    """``read()`` run in a thread named ``name``, one at a time; :meth:`get` waits for it
    ``wait_s`` at most."""

    def __init__(self, read: Callable[[], T], wait_s: float, name: str) -> None:
        self.read, self.wait_s, self.name = read, wait_s, name
        self._lock = threading.Lock()
        self._running: _Attempt[T] | None = None
        #: A value that ended after every caller waiting on it gave up: the next caller
        #: whose own read does not end in time is given it.
        self._late: T | None = None

    def get(self) -> tuple[bool, T | None, Exception | None]:
        """(ended, value, error): whether the read ended within ``wait_s``, its value
        (None when it failed; when it did not end, a late value of the read before, once)
        and the error it failed with. A thread that cannot start (a pids limit) gives
        (True, None, None) at once, and the next call reads again."""
        with self._lock:
            attempt = self._running
            if attempt is None:
                attempt = self._running = _Attempt()
                try:
                    threading.Thread(target=self._run, args=(attempt,), daemon=True,
                                     name=self.name).start()
                except RuntimeError:  # no thread to be had
                    log.warning("cannot start the read %s", self.name, exc_info=True)
                    self._running = None
                    attempt.done.set()
        attempt.done.wait(self.wait_s)
        with self._lock:
            ended = attempt.done.is_set()
            if ended:
                value = attempt.value
            else:  # served by the value that ended too late for its own callers
                attempt.abandoned, value = True, self._late
            self._late = None
        return ended, value, attempt.error if ended else None

    def _run(self, attempt: _Attempt[T]) -> None:
        try:
            attempt.value = self.read()
        except Exception as exc:  # noqa: BLE001 - a thread of its own: the callers see it
            attempt.error = exc
        finally:
            with self._lock:
                self._running = None
                if attempt.abandoned and attempt.value is not None:
                    self._late = attempt.value
                attempt.done.set()
