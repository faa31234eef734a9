"""The Python client for asyncio web apps: :class:`Client`'s calls as coroutines.

A sync call in an ``async def`` route stops the whole event loop while it runs: a
publish retrying an absent Redis for seconds, a :meth:`Client.wait` for its whole
timeout. :class:`AsyncClient` runs each call of one shared (thread-safe) :class:`Client`
in a thread of its own bounded pool, and waits between the polls of :meth:`AsyncClient.wait`
on the loop, holding no thread. Imports neither torch nor transformers.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import math
import os
import threading
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, asynccontextmanager, suppress
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from contract.errors import InvalidInput
from contract.messages import TaskItem
from contract.results import ResultRecord
from contract.settings import Settings
from producer.client import _IN_MEMORY, Buffered, ChunkPublisher, Client, ClientClosed, SubmitReport
from producer.linger import LINGER_S, Flusher, WatchedSource

#: Items of an async iterable one hop from the loop to :meth:`AsyncClient.submit_many`'s
#: thread carries at most: those ready at once, so a fast source costs few hops.
ASYNC_RUN = 256

#: Threads of an :class:`AsyncClient`: as many as kombu's default pool has producers
#: (``broker_pool_limit``) and under SQLAlchemy's default connections (5 + 10 overflow),
#: so a flood of calls queues here, in memory, rather than in those pools, where a read
#: waiting its turn too long fails. Its own pool, not the loop's default executor: while
#: Redis is down every submit holds its thread through the publish retries, and the
#: app's own work there (``loop.getaddrinfo``, other libraries' threads) must go on.
#: The clients of :meth:`AsyncClient.for_model` share their client's pool. An open
#: :meth:`AsyncClient.chunk_publisher` runs its calls in a thread of its own, and so
#: does a :meth:`AsyncClient.submit_many` of an async iterable or a generator.
MAX_THREADS = 10

#: Longest wait of :meth:`AsyncClient.aclose` for the sends of stopped
#: :meth:`AsyncClient.submit_many` calls still under way, in seconds.
CLOSE_TIMEOUT_S = 5.0

#: Pause between two looks of :meth:`AsyncClient.aclose` at those calls, in seconds.
_CLOSE_POLL_S = 0.01

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def _threaded(method: Callable[Concatenate[Client, P], T],
              ) -> Callable[Concatenate[AsyncClient, P], Awaitable[T]]:
    """``method`` of :class:`Client` as a coroutine method: the same arguments, run on the
    shared client in one of the async client's threads."""
    async def call(self: AsyncClient, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(lambda: method(self.sync, *args, **kwargs))

    call.__name__ = call.__qualname__ = method.__name__
    call.__doc__ = (f"Awaitable :meth:`Client.{method.__name__}`, run in a thread.\n\n"
                    f"{inspect.cleandoc(method.__doc__ or '')}")
    return call


def _settle(wake: asyncio.Future[None]) -> None:
    if not wake.done():
        wake.set_result(None)


def _fill(done: Future[T], context: contextvars.Context, work: Callable[[], T]) -> None:
    """Run ``work()`` in ``context`` and settle ``done`` with its outcome, quietly: no one
    may wait for it any more (a thread abandoned when its call stopped)."""
    try:
        outcome = context.run(work)
    except BaseException as exc:  # noqa: BLE001 - handed to the caller through done
        done.set_exception(exc)
    else:
        done.set_result(outcome)


def _leave_unused(manager: AbstractContextManager[ChunkPublisher],
                  entering: Future[ChunkPublisher]) -> None:
    """Leave the block of a chunk publisher its caller never got (cancelled while it was
    entered): nothing is buffered, so this only gives its producer back."""
    if not entering.cancelled() and entering.exception() is None:
        with suppress(Exception):
            manager.__exit__(None, None, None)


class _Threads:
    """The thread pool of an :class:`AsyncClient`, shared by the clients of its
    :meth:`~AsyncClient.for_model`, and the lock of their state."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.executor: ThreadPoolExecutor | None = None
        self.pid = os.getpid()
        #: set by the owning client's aclose(): no call of any of them runs any more
        self.closed = False

    def pool(self) -> ThreadPoolExecutor:
        """The threads, started on first use; again in a forked child, which has none of
        its parent's threads (their queue would hold its calls for ever). Under ``lock``."""
        if self.executor is None or self.pid != os.getpid():
            self.executor = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="bertstream-async")
            self.pid = os.getpid()
        return self.executor


class AsyncClient:
    """Submit texts and read results from asyncio code (FastAPI, Starlette, aiohttp).

    Takes a :class:`Settings`, as :class:`Client` does, and builds one: ``sync``, shared
    by every call (also usable in a thread, :meth:`to_thread`, for what has no coroutine
    here, such as ``sync.store.delete``). Each call runs in a thread of a pool of at most
    :data:`MAX_THREADS`, started on first use (again in a forked child); a source that
    may wait (an open :meth:`chunk_publisher`, a :meth:`submit_many` of an async
    iterable or a generator) runs in a thread of its own. Arguments,
    results and errors are :class:`Client`'s. Use ``async with``, or await :meth:`aclose`.

    A cancelled call stops waiting at once. One still queued for a thread never runs;
    one already in a thread (one publish, one read) ends there, its result or error
    lost. So a cancelled :meth:`submit` was sent once or not at all, never twice, and
    what it would have returned is not known: a caller who must know the id of a submit
    it may cancel gives its own ``id=``, known before the call; it can wait for that id,
    or send it again with the same text (an idempotency key: never a second row, and a
    ``done`` row is not scored again). A generated id is made in the thread, and is lost.
    """

    def __init__(self, settings: Settings) -> None:
        self._setup(Client(settings), _Threads(), owner=True)

    def _setup(self, sync: Client, threads: _Threads, *, owner: bool) -> None:
        self.settings = sync.settings
        self.sync = sync
        self._threads = threads
        self._lock = threads.lock
        #: True for the client that built the pool (its aclose() stops the threads)
        self._owner = owner
        #: pauses of the waits between two polls, woken by aclose()
        self._sleeping: set[asyncio.Future[None]] = set()
        #: the clients of for_model(), by model name
        self._bound: dict[str, AsyncClient] = {}
        #: the sources of submit_many calls whose thread has not ended yet
        self._flights: set[_Stoppable] = set()
        self._closed = False

    # -- lifecycle ------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self, *, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Close the shared client and stop the threads. Idempotent. Calls in flight end
        with :class:`ClientClosed` (a wait between two polls, or a :meth:`submit_many`
        waiting for its source's next item, at once), as later ones do.

        Like a producer's flush on close, it first lets the :meth:`submit_many` calls of
        a source (ended by it, or cancelled before) send the items they took from their
        source, for at most ``timeout`` seconds: what is buffered goes out at once, with
        a chunk being sent. A call whose thread waits in the source's own read, nothing
        buffered, is not waited for. What is still unsent then is not sent: it is logged
        (a warning of the ``producer.aclient`` logger, with the count), as is an item
        such a read gives after the close (taken from the source, it cannot be sent any
        more). ``timeout``: seconds, 0 or more (0: close at once, logging what is unsent),
        else :class:`InvalidInput` (the client stays open).

        Closes the clients of :meth:`for_model` too. Closing one of those closes it
        alone (and the clients of its own for_model), as :meth:`Client.close` does; the
        threads, which it shares, stay for the others."""
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) \
                or math.isnan(timeout) or timeout < 0:
            raise InvalidInput(f"timeout must be a number of seconds, 0 or more; "
                               f"got {timeout!r}")
        executor = None
        with self._lock:
            sleeping, flights = self._shut()
            if self._owner:
                self._threads.closed = True
                executor, self._threads.executor = self._threads.executor, None
        for wake in sleeping:
            with suppress(RuntimeError):  # its loop is closed: nothing waits on it
                wake.get_loop().call_soon_threadsafe(_settle, wake)
        try:
            await _sends_ended(flights, timeout)
        finally:
            try:
                # Not in this client's pool: close() must overtake the calls queued there.
                await asyncio.to_thread(self.sync.close)
            finally:
                if executor is not None:
                    executor.shutdown(wait=False)

    def _shut(self) -> tuple[list[asyncio.Future[None]], list[_Stoppable]]:
        """Mark this client and those of its for_model() closed (under the lock); give
        the pauses of their waits, to wake, and the sources of their submit_many calls."""
        self._closed = True
        sleeping = list(self._sleeping)
        flights = list(self._flights)
        for bound in self._bound.values():
            more, theirs = bound._shut()
            sleeping += more
            flights += theirs
        return sleeping, flights

    def _is_closed(self) -> bool:
        return self._closed or self._threads.closed

    @staticmethod
    def _closed_error() -> ClientClosed:
        return ClientClosed("this bertstream AsyncClient is closed; create a new one "
                            "(or use it inside its `async with` block)")

    def _pool(self) -> ThreadPoolExecutor:
        """The threads (:meth:`_Threads.pool`); :class:`ClientClosed` after aclose()."""
        with self._lock:
            if self._is_closed():
                raise self._closed_error()
            return self._threads.pool()

    def _submit(self, work: Callable[[], T],
                thread: ThreadPoolExecutor | None = None) -> Future[T]:
        """``work()`` queued for a thread of the pool (or ``thread``, a chunk publisher's
        own), with the caller's context variables."""
        context = contextvars.copy_context()
        try:
            return self._executor(thread).submit(context.run, work)
        except RuntimeError as exc:  # the pool shut down by aclose() in another thread
            if self._is_closed():
                raise self._closed_error() from exc
            raise

    def _executor(self, thread: ThreadPoolExecutor | None) -> ThreadPoolExecutor:
        """``thread``, or the pool when None; :class:`ClientClosed` after aclose()."""
        if thread is None:
            return self._pool()
        with self._lock:
            if self._is_closed():
                raise self._closed_error()
        return thread

    async def _run(self, work: Callable[[], T], thread: ThreadPoolExecutor | None = None) -> T:
        """``work()`` in a thread of the pool (or ``thread``); cancelled, a call still
        queued never runs."""
        return await asyncio.wrap_future(self._submit(work, thread))

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` on the loop; aclose() ends the sleep early."""
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._is_closed():
                raise self._closed_error()
            self._sleeping.add(wake)
        timer = loop.call_later(seconds, _settle, wake)
        try:
            await wake
        finally:
            timer.cancel()
            with self._lock:
                self._sleeping.discard(wake)

    async def to_thread(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``func(*args, **kwargs)`` in one of this client's threads, with the caller's
        context variables: for what has no coroutine here, such as the results store
        (``await client.to_thread(lambda: client.sync.store.delete(ids=ids))``; the
        store is built, and its SQLite file opened, on first use). Raises what ``func``
        raises; :class:`ClientClosed` after :meth:`aclose`, as every call."""
        return await self._run(functools.partial(func, *args, **kwargs))

    # -- models ---------------------------------------------------------

    def for_model(self, model: str | None) -> AsyncClient:
        """An async client for the model named ``model``: :meth:`Client.for_model`'s
        client, the same one each time (this one when it already is; None or
        ``default``: the default model). It shares this client's threads (their
        :data:`MAX_THREADS` bound all of them together) and closes with it. Opens no
        connection, so it is no coroutine. Raises :class:`InvalidInput` for a name no
        model can have, :class:`ClientClosed` after :meth:`aclose`."""
        if self._is_closed():
            raise self._closed_error()
        sync = self.sync.for_model(model)
        if sync is self.sync:
            return self
        name = sync.settings.model_name
        with self._lock:
            if self._is_closed():
                raise self._closed_error()
            bound = self._bound.get(name)
            if bound is None or bound.sync is not sync:
                bound = AsyncClient.__new__(AsyncClient)
                bound._setup(sync, self._threads, owner=False)
                self._bound[name] = bound
            return bound

    stored_model = _threaded(Client.stored_model)
    default_model_names = _threaded(Client.default_model_names)

    # -- submitting -----------------------------------------------------

    submit = _threaded(Client.submit)

    async def submit_many(
        self,
        items: Iterable[str | bytes | dict[str, Any]] | AsyncIterable[str | bytes | dict[str, Any]],
        *,
        source: str | None = None,
        chunk_size: int | None = None,
        ttl_s: float | None = None,
        model: str | None = None,
        linger_s: float | None = LINGER_S,
    ) -> SubmitReport:
        """:meth:`Client.submit_many`, run in a thread; ``items`` may also be an async
        iterable (an async generator reading a websocket).

        The same arguments, guarantees and errors. An async iterable is read on the loop
        and its items handed to the thread; ``linger_s`` holds as for a generator: a
        partial chunk goes out once its oldest item has waited that long, while the next
        item is still awaited (that await is never cancelled for it). When the call
        stops early (an error, a cancellation) the pending read of the async iterable is
        cancelled and the items it gave before are published, as before any error.
        :meth:`aclose` stops an open one so, ending it with :class:`ClientClosed`; it
        lets the items given before be sent first (within its timeout).

        A source that may wait for its items (an async iterable, a generator) is read in
        a thread started for the call, not one of the client's :data:`MAX_THREADS`: any
        number of open websockets leave those threads (and the pooled producers, held
        only while a chunk is sent) to the client's other calls. Cancelled or closed, the
        call ends at once even while a generator blocks (a queue's ``get``, a socket's
        read): its thread, a daemon, is left to that read and keeps no process from
        exiting. The items it gave before are sent at the stop, whatever ``linger_s``
        (None too: not after a next item a quiet queue may never give), and
        :meth:`aclose` waits for those sends (up to its timeout). The one its read gives
        after the stop (taken from the source, a queue's post) is sent too, and the
        read ends there; after aclose() it cannot be sent, and is logged as not sent."""
        call = functools.partial(self.sync.submit_many, source=source, chunk_size=chunk_size,
                                 ttl_s=ttl_s, model=model, linger_s=linger_s)
        # One dict item is refused there, not read as its keys (each would become a task).
        if (isinstance(items, (*_IN_MEMORY, Mapping))
                or not isinstance(items, (Iterable, AsyncIterable))):
            return await self._run(lambda: call(items))
        source_items: _SyncItems | _AsyncItems = (
            _SyncItems(items) if isinstance(items, Iterable)
            else _AsyncItems(items, asyncio.get_running_loop()))
        return await self._run_alone(lambda: call(source_items), source_items)

    async def _run_alone(self, work: Callable[[], T], source: _Stoppable) -> T:
        """``work()`` (reading ``source``) in a daemon thread of its own; when the call
        stops early (cancelled, or aclose(): then :class:`ClientClosed`) it ends at once
        and ``source.stop`` makes the source's next read raise, and sends what is
        buffered at once. A thread blocked in the caller's own code (a queue's get, a
        socket's read) cannot be woken: it is abandoned, and neither it nor an exiting
        interpreter waits for the other. Until the thread ends, aclose() sees ``source``
        (it lets the sends under way end first)."""
        loop = asyncio.get_running_loop()
        # Woken by aclose(), as a wait's pause is.
        closing: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._is_closed():
                raise self._closed_error()
            self._sleeping.add(closing)
            self._flights.add(source)
        done: Future[T] = Future()
        done.set_running_or_notify_cancel()  # a cancel of the wait leaves it to the thread
        context = contextvars.copy_context()

        def read() -> None:
            try:
                _fill(done, context, work)
            finally:
                with self._lock:
                    self._flights.discard(source)
                source.ended(done.exception())

        try:
            threading.Thread(target=read, daemon=True, name="bertstream-source").start()
        except BaseException:
            with self._lock:
                self._sleeping.discard(closing)
                self._flights.discard(source)
            raise
        result = asyncio.wrap_future(done)
        closed: ClientClosed | None = None
        try:
            either: set[asyncio.Future[Any]] = {result, closing}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if result.done():
                return result.result()
            closed = self._closed_error()
            raise closed
        finally:
            with self._lock:
                self._sleeping.discard(closing)
            source.stop(closed)
            result.cancel()  # what the abandoned thread ends with is nobody's to hear

    publish = _threaded(Client.publish)

    @asynccontextmanager
    async def chunk_publisher(
        self,
        *,
        bulk: bool = True,
        chunk_size: int | None = None,
        before_send: Callable[[], None] | None = None,
        after_send: Callable[[list[TaskItem], list[Any]], None] | None = None,
        on_conflict: Callable[[Buffered, str], None] | None = None,
    ) -> AsyncIterator[AsyncChunkPublisher]:
        """:meth:`Client.chunk_publisher` as an async context manager: ``async with
        client.chunk_publisher() as publisher: await publisher.add(item)``. The same
        arguments and guarantees: one pooled producer for the block, the last chunk
        flushed on a normal exit, the buffered remainder dropped on an exception
        (cancellation included), which propagates.

        Its calls run in a thread of its own, one at a time: the hooks
        (``before_send``, ``after_send``, ``on_conflict``) are plain functions called
        in a thread. Not in the client's threads: the block holds a producer of the
        client's pool, and calls waiting there for one (a submit, another publisher's
        start) may take every one of those threads; the block must still end to give
        its producer back. A cancelled call ends in its thread before the next one
        starts, so a cancelled :meth:`AsyncChunkPublisher.add` may still have buffered
        its item (and sent it, with its chunk, at the next flush)."""
        manager = self.sync.chunk_publisher(
            bulk=bulk, chunk_size=chunk_size, before_send=before_send,
            after_send=after_send, on_conflict=on_conflict)
        own = ThreadPoolExecutor(1, thread_name_prefix="bertstream-async-publisher")
        try:
            entering = self._submit(manager.__enter__, own)
            try:
                entered = await asyncio.wrap_future(entering)
            except asyncio.CancelledError:
                # Entered all the same when its thread had started (waiting for a
                # producer): left as soon as it is, so that the producer goes back.
                entering.add_done_callback(functools.partial(_leave_unused, manager))
                raise
            publisher = AsyncChunkPublisher(self, manager, entered, own)
            try:
                yield publisher
            except BaseException as exc:
                await publisher._exit(exc)
                raise
            await publisher._exit(None)
        finally:
            own.shutdown(wait=False)  # a call still running there ends first

    # -- the queue ------------------------------------------------------

    queue_length = _threaded(Client.queue_length)
    live_workers = _threaded(Client.live_workers)

    # -- results --------------------------------------------------------

    get = _threaded(Client.get)
    get_many = _threaded(Client.get_many)
    windows = _threaded(Client.windows)
    windowed = _threaded(Client.windowed)
    query = _threaded(Client.query)
    count = _threaded(Client.count)
    aggregate = _threaded(Client.aggregate)

    async def wait(
        self,
        ids: Iterable[str],
        *,
        timeout: float = 30.0,
        poll_interval: float = 0.05,
        model: str | None = None,
    ) -> dict[str, ResultRecord]:
        """Wait until every id has a result; return them all, keyed by id.

        :meth:`Client.wait`'s arguments, result and errors (:class:`ResultTimeout`
        with the missing ids, :class:`InvalidInput` at once for bad arguments). Each
        poll reads the table in a thread; the pauses between them are on the loop, so a
        wait holds no thread while it waits. Cancelled, it polls no more.
        """
        polls = self.sync.wait_polls(ids, timeout=timeout, poll_interval=poll_interval,
                                     model=model)
        done: list[dict[str, ResultRecord]] = []

        def step() -> float | None:
            # StopIteration cannot cross a future: the result is handed over here.
            try:
                return next(polls)
            except StopIteration as finished:
                done.append(finished.value)
                return None

        while (pause := await self._run(step)) is not None:
            await self._pause(pause)
        return done[0]


async def _sends_ended(flights: list[_Stoppable], timeout: float) -> None:
    """Wait (on the loop) until each of ``flights`` has sent what it took from its
    source: its thread ended, or waits in the source's read with nothing buffered; at
    most ``timeout`` seconds, then log what is still unsent (the client closes under
    those calls: no later aclose() waits for them again)."""
    deadline = time.monotonic() + timeout
    while True:
        busy = [source for source in flights if not source.settled()]
        if not busy:
            return
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(_CLOSE_POLL_S)
    for source in busy:
        source.abandon()
    log.warning("aclose(): %d submit_many call(s) still sending after %s s; the client "
                "closes under them, and the %d item(s) they took from their sources and "
                "hold unsent may not be sent", len(busy), timeout,
                sum(source.pending() for source in busy))


class _Stoppable(WatchedSource):
    """A source :meth:`AsyncClient.submit_many` reads in a call's thread, that :meth:`stop`
    ends: once stopped, the next read raises (:meth:`_check`), and what is buffered is
    sent at once (the call's :class:`Flusher`, given to :meth:`watch`)."""

    def __init__(self) -> None:
        self._stopped = False
        #: what the read raises once stopped by aclose() (else a cancellation)
        self._closed: ClientClosed | None = None
        #: the call's flusher, once its thread reads
        self._flusher: Flusher | None = None
        #: True while the call's thread waits in the source's own read
        self._reading = False
        #: True once the call's thread ended
        self._ended = False
        #: items already logged as not sent
        self._logged = 0
        #: True once the flush at the stop failed (or found the linger's failed): no send
        #: is under way for what stays buffered, so aclose() does not wait for it
        self._given_up = False
        #: True once aclose() closed the client under this call: nothing it holds can be
        #: sent any more, and a later aclose() does not wait for it again
        self._abandoned = False

    def __iter__(self) -> Iterator[Any]:
        return self.items()

    def items(self) -> Iterator[Any]:
        """The items, in order, until the end or :meth:`stop`."""
        raise NotImplementedError

    def watch(self, flusher: Flusher) -> None:
        self._flusher = flusher

    def _check(self) -> None:
        if self._stopped:
            raise self._closed or CancelledError()

    def stop(self, closed: ClientClosed | None = None) -> None:
        """The call stopped (``closed``: by aclose(), the error the next read raises):
        what is buffered is sent at once, not after an item that may never come."""
        if closed is not None:
            self._closed = closed
        self._stopped = True
        flusher = self._flusher
        # Nothing buffered: an item the thread adds now is sent at its next read (raising).
        if flusher is not None and flusher.pending:
            flusher.flush_now(self._stop_failed)

    def pending(self) -> int:
        """Items taken from the source and not sent (yet)."""
        return 0 if self._flusher is None else self._flusher.pending

    def settled(self) -> bool:
        """Whether the call's thread ended, or waits in the source's read with nothing
        buffered (or what is, given up: the stop's flush failed) and no chunk being sent,
        or an earlier aclose() closed the client under it (so aclose() need not wait)."""
        if self._ended or self._abandoned:
            return True
        flusher = self._flusher
        return self._reading and (flusher is None or flusher.idle(unsent_ok=self._given_up))

    def abandon(self) -> None:
        """aclose() gave up waiting and closes the client under this call."""
        self._abandoned = True

    def ended(self, error: BaseException | None) -> None:
        """The call's thread ended (``error``: what it raised). Items taken from the
        source and left unsent by a stopped call are logged: nobody hears its error.
        Those logged as not sent at the stop that its last flush sent after all (the
        broker back when the source gave one more item) are logged as sent: a caller
        replaying what the log calls lost would queue them twice."""
        self._ended = True
        if not self._stopped:
            return
        if self._logged and self.pending() == 0:
            log.warning("the %d item(s) of a stopped submit_many call logged as not sent "
                        "were sent after all, with the item(s) its source gave after",
                        self._logged)
            self._logged = 0
        elif error is not None:
            self._not_sent(error)

    def _stop_failed(self, error: BaseException) -> None:
        """The flush at the stop failed with ``error``: log what stays unsent; aclose()
        need not wait for it (nothing sends it unless the source gives one more item)."""
        self._given_up = True
        self._not_sent(error)

    def _not_sent(self, error: BaseException) -> None:
        """Log the items taken from the source, not sent and not logged yet: the stopped
        call's send failed with ``error`` (the flush at the stop, or its last one)."""
        unsent = self.pending() - self._logged
        if unsent > 0:
            self._logged += unsent
            log.warning("a stopped submit_many call took %d item(s) from its source that "
                        "were not sent: %s", unsent, error)


class _SyncItems(_Stoppable):
    """A sync iterable (a generator): once stopped, the next read raises (after the items
    before it were handed over). The item a read already waiting gives after the stop is
    handed over first: it was taken from the source (a queue's get), and dropped it
    would be lost to every reader."""

    def __init__(self, items: Iterable[Any]) -> None:
        super().__init__()
        self._source = items

    def items(self) -> Iterator[Any]:
        """The items, in order, until the end or :meth:`stop`."""
        source = iter(self._source)
        while True:
            self._check()
            self._reading = True
            try:
                item = next(source)
            except StopIteration:
                return
            finally:
                self._reading = False
            yield item


class _AsyncItems(_Stoppable):
    """An async iterable read from a thread: :meth:`items` is a plain generator there,
    each step awaiting the next run of items on ``loop``. The pending ``__anext__`` is
    kept from one run to the next (never cancelled because a run ended), so the source
    reads on undisturbed; :meth:`stop` cancels it."""

    def __init__(self, items: AsyncIterable[Any], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._source = aiter(items)
        self._loop = loop
        #: the next item asked for and not yet handed over (or the end, or an error)
        self._pending: asyncio.Future[Any] | None = None
        #: the run the thread waits for: stop() cancels it there, as the loop may not
        #: run again to cancel it (run_until_complete of a wait_for that timed out)
        self._waiting: Future[tuple[list[Any], bool]] | None = None
        #: the items of the run handed over that are left to hand over (taken already)
        self._ahead = 0
        #: the item the read in flight took, handed over after the run (see ready())
        self._last: list[Any] = []

    def items(self) -> Iterator[Any]:
        """The items, in order, read in the calling thread (not the loop's); the async
        iterable's error re-raises here after the items before it."""
        while True:
            self._check()
            self._waiting = asyncio.run_coroutine_threadsafe(self._run(), self._loop)
            if self._stopped:  # stop() ran before this run was there to cancel
                self._waiting.cancel()
            self._reading = True
            try:
                run, end = self._waiting.result()
            except CancelledError:
                if self._closed is not None:
                    raise self._closed from None
                raise
            finally:
                self._reading = False
            for index, item in enumerate(run):
                self._ahead = len(run) - 1 - index
                yield item
            if self._last:  # what the read in flight gave (see ready())
                yield self._last.pop()
            if end:
                return

    def ready(self) -> bool:
        """Also the item the read in flight (the one a run leaves asking for the next) took
        already, once no run is read any more (a send failed): handed over; a read still
        waiting is cancelled (its item stays in the source), not left to take one."""
        if self._ahead > 0:
            return True
        if self._pending is None or self._stopped:
            return False
        self._waiting = asyncio.run_coroutine_threadsafe(self._taken(), self._loop)
        if self._stopped:
            self._waiting.cancel()
        try:
            self._last, _ = self._waiting.result()
        except CancelledError:
            return False
        return bool(self._last)

    async def _taken(self) -> tuple[list[Any], bool]:
        """The item of the read in flight, if it gave one (the read is cancelled if not),
        as a run (never the end: the thread reads no more)."""
        pending = self._pending
        if pending is None:
            return [], False
        if not pending.done():
            pending.cancel()
            return [], False
        if pending.cancelled() or pending.exception() is not None:
            return [], False
        self._pending = None
        return [pending.result()], False

    async def _run(self) -> tuple[list[Any], bool]:
        """The next item (awaited as long as it takes), and those ready after it at once:
        at most :data:`ASYNC_RUN`; True at the end. An error ends a run; it is raised at
        the start of the next one, after the items before it were handed over."""
        if self._stopped:
            raise asyncio.CancelledError
        run: list[Any] = []
        while len(run) < ASYNC_RUN:
            if self._pending is None:
                self._pending = asyncio.ensure_future(anext(self._source))
            if run:  # only what is ready now: one loop step for the source, no wait
                await asyncio.wait({self._pending}, timeout=0)
                if not self._pending.done() or self._pending.exception() is not None:
                    break
            try:
                item = await asyncio.shield(self._pending)
            except StopAsyncIteration:
                self._pending = None
                return run, True
            except asyncio.CancelledError:
                if self._pending.cancelled():
                    self._pending = None
                raise
            except BaseException:
                self._pending = None
                raise
            self._pending = None
            run.append(item)
        return run, False

    def stop(self, closed: ClientClosed | None = None) -> None:
        """Cancel the pending read (on the loop) and the run the thread waits for: the
        call stopped (``closed``: by aclose(), the error the thread's read raises)."""
        super().stop(closed)
        if self._pending is not None:
            self._pending.cancel()
        if self._waiting is not None:
            self._waiting.cancel()


class AsyncChunkPublisher:
    """A :class:`ChunkPublisher` (``sync``) awaited from asyncio, given by
    :meth:`AsyncClient.chunk_publisher`: each call runs in the publisher's own thread
    (``thread``), one at a time, as they share one producer (one connection)."""

    def __init__(self, client: AsyncClient, manager: AbstractContextManager[ChunkPublisher],
                 publisher: ChunkPublisher, thread: ThreadPoolExecutor) -> None:
        self._client = client
        self._manager = manager
        self.sync = publisher
        self._thread = thread
        #: held by the call in a thread; a cancelled one keeps it until it ends there
        self._turn = threading.Lock()

    @property
    def messages(self) -> int:
        """Messages published so far (one per chunk)."""
        return self.sync.messages

    @property
    def published(self) -> int:
        """Items published so far."""
        return self.sync.published

    async def _in_turn(self, work: Callable[[], T]) -> T:
        def run() -> T:
            with self._turn:
                return work()

        return await self._client._run(run, self._thread)

    async def add(self, item: TaskItem, line: int | None = None, origin: Any = None, *,
                  caller_id: bool = False) -> None:
        """:meth:`ChunkPublisher.add`: buffer ``item`` (a :class:`TaskItem`, as
        :func:`contract.messages.make_item` builds it); publishes the chunk once full."""
        await self._in_turn(lambda: self.sync.add(item, line, origin, caller_id=caller_id))

    async def flush(self) -> None:
        """:meth:`ChunkPublisher.flush`: publish what is buffered."""
        await self._in_turn(self.sync.flush)

    async def _exit(self, exc: BaseException | None) -> None:
        """Leave the sync block in a thread: flush (``exc`` None) or drop the rest, and
        give the producer back. After aclose() (no thread left) it is left here, on the
        loop, dropping the rest (no call reaches the network once the client is closed);
        unless a cancelled call still holds the publisher, whose end the loop must not
        wait for: close() has closed the producer's connection already."""
        done: list[bool] = []

        def leave() -> None:
            done.append(True)
            self._manager.__exit__(type(exc) if exc else None, exc,
                                   exc.__traceback__ if exc else None)

        try:
            await self._in_turn(leave)
        except ClientClosed as closed:
            if done:
                raise
            if self._turn.acquire(blocking=False):
                try:
                    with suppress(Exception):
                        self._manager.__exit__(ClientClosed, closed, closed.__traceback__)
                finally:
                    self._turn.release()
            if exc is None:
                raise
