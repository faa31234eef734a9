"""Long polls: many requests wait for their rows, one query asks for all of them.

``GET /v1/tasks/{id}?wait=S`` must not hold a database connection per
waiter. :class:`Waiter` keeps one future per waiting id; a single background
task asks the store for every waited-for id at once, every ``interval_s``,
in a worker thread (one query per model waited on), and resolves the
futures whose rows exist (a waiter on a queued retry, once its row is the
new attempt's). A waiter whose time runs out simply stops waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from api.logthrottle import RefusalLog, bug_key, cause_key
from contract.errors import BertstreamError
from contract.results import ResultRecord

log = logging.getLogger(__name__)

#: Every :class:`Waiter` of this process, for :func:`release_all`.
_WAITERS: weakref.WeakSet[Waiter] = weakref.WeakSet()


def release_all() -> None:
    """End every long poll served on the running event loop now, each answering what it
    has (``queued``): its server is stopping, and uvicorn waits for each open request
    before it exits, up to BERTSTREAM_API_MAX_WAIT_S (a restart held that long). Only
    that loop's: another app of the process (an embedding, a test's) keeps its waits."""
    loop = asyncio.get_running_loop()
    for waiter in list(_WAITERS):
        if waiter.loop is loop:
            waiter.release()


@dataclass(eq=False)
class _Wait:
    future: asyncio.Future[ResultRecord | None]
    #: (attempts, model) of a row that does not end this wait (None: any row does)
    stale: tuple[int, str] | None


class Waiter:
    """Resolves waits on task ids from one polling loop (start with :meth:`run`)."""

    def __init__(self, fetch: Callable[[Iterable[str], str | None], dict[str, ResultRecord]],
                 interval_s: float = 0.1) -> None:
        """``fetch(ids, model)``: the stored rows among ``ids`` (``model``'s, or the latest)."""
        self.fetch = fetch
        self.interval_s = interval_s
        self._waiting: dict[tuple[str, str | None], list[_Wait]] = {}
        self._wake = asyncio.Event()
        self.released = False
        #: the event loop :meth:`run` polls on (its app's): :func:`release_all` scope
        self.loop: asyncio.AbstractEventLoop | None = None
        #: its failed reads, polled every ``interval_s`` through an outage: summed
        self.refusals = RefusalLog(log)
        _WAITERS.add(self)

    @property
    def waiting(self) -> int:
        """Ids being waited for now."""
        return len(self._waiting)

    async def wait(self, task_id: str, timeout: float, model: str | None = None,
                   replacing: ResultRecord | None = None) -> ResultRecord | None:
        """The row of ``task_id`` (``model``'s, or any) once stored, or None after ``timeout``.

        ``replacing``: a stored row being retried; only a row of another attempt or model
        (the retry's) ends the wait."""
        if self.released:
            return None
        key = (task_id, model)
        future: asyncio.Future[ResultRecord | None] = asyncio.get_running_loop().create_future()
        stale = None if replacing is None else (replacing.attempts, replacing.model)
        entry = _Wait(future, stale)
        self._waiting.setdefault(key, []).append(entry)
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            entries = self._waiting.get(key, [])
            with contextlib.suppress(ValueError):
                entries.remove(entry)
            if not entries:
                self._waiting.pop(key, None)

    def release(self) -> None:
        """End the waits now (each gives None) and any later one at once: see
        :func:`release_all`."""
        self.released = True
        for entries in self._waiting.values():
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_result(None)

    async def run(self) -> None:
        """Poll for the waited-for ids until cancelled."""
        loop = self.loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            by_model: dict[str | None, list[str]] = {}
            for task_id, model in list(self._waiting):
                by_model.setdefault(model, []).append(task_id)
            for model, ids in by_model.items():
                try:
                    found = await loop.run_in_executor(None, self.fetch, ids, model)
                except BertstreamError as exc:  # an outage: waiters time out, keep polling
                    self.refusals.note("long poll", cause_key(exc), logging.WARNING,
                                       "long poll: %s", exc)
                    found = {}
                except Exception as exc:  # noqa: BLE001 - the loop serves every later poll too
                    self.refusals.note("long poll failed", bug_key(exc), logging.ERROR,
                                       "long poll: reading %d id(s) failed", len(ids),
                                       exc_info=exc)
                    found = {}
                for task_id, record in found.items():
                    for entry in self._waiting.get((task_id, model), []):
                        if (not entry.future.done()
                                and entry.stale != (record.attempts, record.model)):
                            entry.future.set_result(record)
            await asyncio.sleep(self.interval_s)
