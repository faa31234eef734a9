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
import inspect
import os
import threading
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from types import TracebackType
from typing import Concatenate, ParamSpec, TypeVar

from contract.results import ResultRecord
from contract.settings import Settings
from producer.client import Client, ClientClosed

#: Threads of an :class:`AsyncClient`: as many as kombu's default pool has producers
#: (``broker_pool_limit``) and under SQLAlchemy's default connections (5 + 10 overflow),
#: so a flood of calls queues here, in memory, rather than in those pools, where a read
#: waiting its turn too long fails. Its own pool, not the loop's default executor: while
#: Redis is down every submit holds its thread through the publish retries, and the
#: app's own work there (``loop.getaddrinfo``, other libraries' threads) must go on.
MAX_THREADS = 10

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


class AsyncClient:
    """Submit texts and read results from asyncio code (FastAPI, Starlette, aiohttp).

    Takes a :class:`Settings`, as :class:`Client` does, and builds one: ``sync``, shared
    by every call (also usable in a thread for what this class does not wrap, such as
    ``sync.store.delete``). Each call runs in a thread of a pool of at most
    :data:`MAX_THREADS`, started on first use (again in a forked child). Arguments,
    results and errors are :class:`Client`'s. Use ``async with``, or await :meth:`aclose`.

    A cancelled call stops waiting at once; work already in a thread (one publish, one
    read) still ends there, so a cancelled submit may have been sent.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sync = Client(settings)
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        #: pauses of the waits between two polls, woken by aclose()
        self._sleeping: set[asyncio.Future[None]] = set()
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

    async def aclose(self) -> None:
        """Close the shared client and stop the threads. Idempotent. Calls in flight end
        with :class:`ClientClosed` (a wait between two polls at once), as later ones do."""
        with self._lock:
            self._closed = True
            sleeping = list(self._sleeping)
            executor, self._executor = self._executor, None
        for wake in sleeping:
            with suppress(RuntimeError):  # its loop is closed: nothing waits on it
                wake.get_loop().call_soon_threadsafe(_settle, wake)
        try:
            # Not in this client's pool: close() must overtake the calls queued there.
            await asyncio.to_thread(self.sync.close)
        finally:
            if executor is not None:
                executor.shutdown(wait=False)

    @staticmethod
    def _closed_error() -> ClientClosed:
        return ClientClosed("this bertstream AsyncClient is closed; create a new one "
                            "(or use it inside its `async with` block)")

    def _pool(self) -> ThreadPoolExecutor:
        """The threads, started on first use; again in a forked child, which has none of
        its parent's threads (their queue would hold its calls for ever)."""
        with self._lock:
            if self._closed:
                raise self._closed_error()
            if self._executor is None or self._pid != os.getpid():
                self._executor = ThreadPoolExecutor(MAX_THREADS,
                                                    thread_name_prefix="bertstream-async")
                self._pid = os.getpid()
            return self._executor

    async def _run(self, work: Callable[[], T]) -> T:
        """``work()`` in a thread of the pool, with the caller's context variables."""
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._pool(), context.run, work)
        except RuntimeError as exc:  # the pool shut down by aclose() in another thread
            if self._closed:
                raise self._closed_error() from exc
            raise
        return await future

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` on the loop; aclose() ends the sleep early."""
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(seconds, _settle, wake)
        with self._lock:
            self._sleeping.add(wake)
        try:
            await wake
        finally:
            timer.cancel()
            with self._lock:
                self._sleeping.discard(wake)

    # -- submitting -----------------------------------------------------

    submit = _threaded(Client.submit)
    submit_many = _threaded(Client.submit_many)

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
