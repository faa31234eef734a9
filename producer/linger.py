"""Sending a partial chunk once its oldest item has waited ``linger_s``.

Bulk publishing buffers items until a chunk is full; a slow or live source (a
tail -f pipe, a websocket, one post a second) would leave its items waiting for
minutes, and one followed by an hour of quiet for the hour. :class:`Linger`
tells when the oldest buffered item is due: ``bertstream stream`` reads its
source in a thread and flushes between records (:func:`producer.stream.with_ticks`);
:meth:`producer.client.Client.submit_many` reads its items in the caller's thread,
as before, and a :class:`Flusher` thread publishes the due chunk while that read
blocks. Imports neither module.
"""

from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, Protocol

#: Default longest wait of a buffered item before its partial chunk is sent, in seconds.
LINGER_S = 0.25


class Buffer(Protocol):
    """What :class:`Linger` and :class:`Flusher` use of a chunk publisher."""

    @property
    def first_unsent_line(self) -> int | None:
        """The line (or index) of the first buffered item; None when nothing is."""

    @property
    def pending(self) -> int:
        """How many items are buffered (taken, not yet published)."""

    def flush(self) -> None:
        """Publish what is buffered."""


class Linger:
    """When the oldest item in a publisher's buffer was buffered: it is sent once it has
    waited ``linger_s`` (None: never for its age)."""

    def __init__(self, linger_s: float | None) -> None:
        self.linger_s = linger_s
        self.since: float | None = None

    def due(self) -> float | None:
        """The monotonic time by which the buffer must be sent; None: nothing is due."""
        return None if self.since is None or self.linger_s is None else self.since + self.linger_s

    def update(self, publisher: Buffer) -> None:
        """Note what is buffered now (every item is added with its line or index)."""
        if publisher.first_unsent_line is None:
            self.since = None
        elif self.since is None:
            self.since = time.monotonic()


class Flusher:
    """Flushes ``publisher`` from a thread of its own once its oldest item has waited
    ``linger_s``, while the caller's thread is blocked reading its source.

    The caller adds each item holding :attr:`lock` and calls :meth:`added` there when
    the buffer may have started or been sent (:attr:`linger` ``since`` None, or a
    message went out); the thread flushes holding it, so the publisher (and its one
    connection) is used by one thread at a time, and the source is read as before, one
    item when asked for. The thread wakes when a deadline comes, not per item or chunk.
    An error of the thread's flush is kept in :attr:`error`, for the caller to raise.
    """

    def __init__(self, publisher: Buffer, linger_s: float | None) -> None:
        self._publisher = publisher
        self.linger = Linger(linger_s)
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self._stopped = False
        self._thread: threading.Thread | None = None
        #: the monotonic time the thread sleeps until (infinity: until woken)
        self._until = math.inf
        #: what the thread's flush raised; it flushes no more
        self.error: BaseException | None = None

    def added(self) -> None:
        """Note an item added (under :attr:`lock`): wake the thread when the buffer's
        deadline is earlier than the one it sleeps until, starting it on first use."""
        self.linger.update(self._publisher)
        due = self.linger.due()
        if due is None or due >= self._until:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bertstream-linger",
                                            daemon=True)
            self._thread.start()
        self._wake.notify()

    def stop(self) -> None:
        """End the thread, once a flush it is making has ended. Marked stopped before the
        lock is taken: a Ctrl-C while waiting for that flush still ends the thread after it."""
        self._stopped = True
        with self.lock:
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def flush_now(self, on_error: Callable[[BaseException], None]) -> None:
        """Publish what is buffered at once, whatever its age (``linger_s`` None too): the
        source stopped, and its next item may never come. Returns at once (it may be called
        on an event loop): a daemon thread waits for the lock, while the caller's thread
        may be in a publish. Nothing is sent once :meth:`stop` has run. An error of that
        flush, or the one the linger thread's flush already failed with (then nothing is
        tried again), goes to ``on_error`` (the caller's thread may never read again to
        raise it); the items stay buffered, for the caller's own last flush."""
        threading.Thread(target=self._flush_once, args=(on_error,),
                         name="bertstream-stop-flush", daemon=True).start()

    def _flush_once(self, on_error: Callable[[BaseException], None]) -> None:
        with self.lock:
            if self._stopped:
                return
            if self.error is not None:  # the buffer cannot go out: say so, not wait on
                on_error(self.error)
                return
            try:
                self._publisher.flush()
            except BaseException as exc:  # noqa: BLE001 - handed to on_error
                on_error(exc)
                return
            self.linger.update(self._publisher)

    def idle(self, *, unsent_ok: bool = False) -> bool:
        """Whether nothing is buffered (``unsent_ok``: or what is, is given up) and no
        thread is using the publisher now (adding an item or sending a chunk); never
        waits."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            return unsent_ok or self._publisher.pending == 0
        finally:
            self.lock.release()

    @property
    def pending(self) -> int:
        """How many items are buffered, unsent (read without the lock: a count to report)."""
        return self._publisher.pending

    def _run(self) -> None:
        with self.lock:
            while not self._stopped:
                due = self.linger.due()
                wait = None if due is None else due - time.monotonic()
                if wait is None or wait > 0:
                    self._until = math.inf if due is None else due
                    # at most an hour at a time: a lock's timeout has a bound (OverflowError)
                    self._wake.wait(None if wait is None else min(wait, 3600.0))
                    continue
                try:
                    self._publisher.flush()
                except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                    self.error = exc
                    return
                self.linger.update(self._publisher)


class WatchedSource(ABC):
    """A source of :meth:`producer.client.Client.submit_many` that can stop while its
    read blocks (an :class:`producer.aclient.AsyncClient` call cancelled or closed): the
    call always reads it with a :class:`Flusher` (``linger_s`` None too), handed to
    :meth:`watch` first, so that a stop can send what is buffered at once."""

    @abstractmethod
    def __iter__(self) -> Iterator[Any]:
        """The items, in order."""

    @abstractmethod
    def watch(self, flusher: Flusher) -> None:
        """Note the call's flusher, before the first read."""

    def ready(self) -> bool:
        """Whether its next item was already taken from the source (read with the one
        before): it is taken even once a send failed, as no read is left to refuse."""
        return False
