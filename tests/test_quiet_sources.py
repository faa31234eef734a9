"""Quiet sources (a websocket gateway: each open socket feeds submit_many with a live
generator that yields when a user types) must not hold the client's shared resources
while they wait for their next item. Ten of them held the AsyncClient's ten threads, or
(sync callers, each in a thread of its own) the client's ten pooled producers, for their
whole life: every other call of the client (a submit, the eleventh source) waited until
a source ended. aclose() ends an open quiet async source, and Ctrl-C stops a submit_many
that waits for a pooled producer."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from contract.settings import Settings
from producer import AsyncClient, Client, ClientClosed
from producer.aclient import MAX_THREADS
from tests.producer_helpers import broker_settings, lane_messages, until

#: More quiet sources than the client has threads and pooled producers.
SOURCES = MAX_THREADS + 2


def _queued(redis_url: str, settings: Settings) -> set[str]:
    return {item["id"] for m in lane_messages(redis_url, f"{settings.queue}.bulk")
            for item in m["items"]}


def _source_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("bertstream-source")]


def test_a_submit_and_every_source_go_on_while_quiet_async_sources_stay_open(
        redis_url: str, sqlite_url: str) -> None:
    """More quiet async generators than the client has threads: each one's first post is
    sent (linger) while all of them wait for their next, and a submit meanwhile returns
    at once rather than when a source ends. Released, each report lists its posts in
    order."""
    settings = broker_settings(redis_url, sqlite_url)
    first = {f"s{n}-0" for n in range(SOURCES)}
    out: dict[str, Any] = {}

    async def main() -> None:
        release = asyncio.Event()

        async def socket(n: int) -> Any:
            yield {"text": f"first post of {n}", "id": f"s{n}-0"}
            await release.wait()
            yield {"text": f"second post of {n}", "id": f"s{n}-1"}

        async with AsyncClient(settings) as client:
            sources = [asyncio.create_task(client.submit_many(socket(n), linger_s=0.1))
                       for n in range(SOURCES)]
            try:
                out["sent"] = await asyncio.to_thread(
                    until, lambda: first <= _queued(redis_url, settings), 5)
                try:
                    out["submitted"] = await asyncio.wait_for(client.submit("meanwhile"), 5)
                except TimeoutError:
                    out["submitted"] = None
                out["open"] = sum(not s.done() for s in sources)
            finally:
                release.set()
                reports = await asyncio.wait_for(asyncio.gather(*sources), 30)
            out["ids"] = [r.ids for r in reports]
        # each source's thread ends with its call
        out["left"] = await asyncio.to_thread(until, lambda: not _source_threads(), 5)

    asyncio.run(main())
    assert out["submitted"] is not None, "a submit waited for the quiet sources to end"
    assert out["sent"], "a quiet source's first post was not sent while the sources were open"
    assert out["open"] == SOURCES
    assert out["ids"] == [[f"s{n}-0", f"s{n}-1"] for n in range(SOURCES)]
    assert out["left"], "a source's thread outlived its call"
    assert _queued(redis_url, settings) >= first


def test_a_submit_goes_on_while_threads_read_quiet_generators(
        redis_url: str, sqlite_url: str) -> None:
    """More threads than the client has pooled producers, each in submit_many of a quiet
    generator: between their chunks they hold no producer, so a submit from another
    thread returns at once."""
    settings = broker_settings(redis_url, sqlite_url)
    release = threading.Event()
    reports: list[Any] = []

    def source(n: int) -> Iterator[dict[str, str]]:
        yield {"text": f"first post of {n}", "id": f"t{n}-0"}
        release.wait(60)
        yield {"text": f"second post of {n}", "id": f"t{n}-1"}

    with Client(settings) as client:
        limit = client.app.conf.broker_pool_limit
        callers = [threading.Thread(
            target=lambda n=n: reports.append(client.submit_many(source(n), linger_s=0.1)))
            for n in range(limit + 2)]
        for caller in callers:
            caller.start()
        submitted: list[str] = []
        extra = threading.Thread(target=lambda: submitted.append(client.submit("meanwhile")),
                                 daemon=True)
        try:
            sent = until(lambda: len(_queued(redis_url, settings)) == limit + 2, 5)
            extra.start()
            extra.join(5)
            done = bool(submitted)
        finally:
            release.set()
            for caller in callers:
                caller.join(30)
            if extra.is_alive():
                extra.join(30)
    assert done, "a submit waited for the quiet sources to end"
    assert sent, "a quiet source's first post was not sent while the sources were open"
    assert sorted(r.ids for r in reports) == sorted(
        [f"t{n}-0", f"t{n}-1"] for n in range(limit + 2))


def test_cancelled_quiet_async_sources_end_their_threads(redis_url: str,
                                                         sqlite_url: str) -> None:
    """Quiet async sources cancelled (their websockets closed by the app): each pending
    read is cancelled, each call's thread ends, and the client serves on."""
    settings = broker_settings(redis_url, sqlite_url)
    first = {f"c{n}-0" for n in range(SOURCES)}
    out: dict[str, Any] = {}

    async def main() -> None:
        async def socket(n: int) -> Any:
            yield {"text": f"first post of {n}", "id": f"c{n}-0"}
            await asyncio.sleep(3600)
            yield {"text": "never", "id": f"c{n}-1"}

        async with AsyncClient(settings) as client:
            sources = [asyncio.create_task(client.submit_many(socket(n), linger_s=0.1))
                       for n in range(SOURCES)]
            out["sent"] = await asyncio.to_thread(
                until, lambda: first <= _queued(redis_url, settings), 5)
            for source in sources:
                source.cancel()
            ended = await asyncio.gather(*sources, return_exceptions=True)
            out["cancelled"] = all(isinstance(e, asyncio.CancelledError) for e in ended)
            out["left"] = await asyncio.to_thread(until, lambda: not _source_threads(), 5)
            out["after"] = (await asyncio.wait_for(
                client.submit_many(["after"], chunk_size=1), 5)).accepted

    asyncio.run(main())
    assert out["sent"], "a quiet source's first post was not sent while the sources were open"
    assert out["cancelled"]
    assert out["left"], "a cancelled source's thread did not end"
    assert out["after"] == 1
    assert _queued(redis_url, settings) >= first


def test_aclose_ends_an_open_quiet_async_source(redis_url: str, sqlite_url: str) -> None:
    """aclose() while a quiet async source is open (its socket waits for the user): the
    call ends with ClientClosed at once, as every call in flight does, and its thread
    ends; it no longer waits for the source's next items. The post sent before stays
    queued."""
    settings = broker_settings(redis_url, sqlite_url)
    out: dict[str, Any] = {}

    async def main() -> None:
        quiet = asyncio.Event()

        async def socket() -> Any:
            yield {"text": "first post", "id": "q-0"}
            await quiet.wait()  # the user says nothing more
            yield {"text": "second post", "id": "q-1"}

        client = AsyncClient(settings)
        submitting = asyncio.create_task(client.submit_many(socket(), linger_s=0.05))
        out["sent"] = await asyncio.to_thread(
            until, lambda: lane_messages(redis_url, f"{settings.queue}.bulk"), 5)
        await client.aclose()
        try:
            await asyncio.wait_for(asyncio.shield(submitting), 5)
            out["ended"] = "returned"
        except TimeoutError:
            out["ended"] = "still open 5 s after aclose()"
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["ended"] = exc
        out["left"] = await asyncio.to_thread(until, lambda: not _source_threads(), 5)
        quiet.set()
        submitting.cancel()
        await asyncio.gather(submitting, return_exceptions=True)

    asyncio.run(main())
    assert out["sent"], "the first post was not sent (linger)"
    assert isinstance(out["ended"], ClientClosed), out["ended"]
    assert out["left"], "the source's thread outlived aclose()"
    queued = [it["id"] for m in lane_messages(redis_url, f"{settings.queue}.bulk")
              for it in m["items"]]
    assert queued == ["q-0"]


def test_ctrl_c_stops_a_submit_many_waiting_for_a_pooled_producer(
        redis_url: str, sqlite_url: str) -> None:
    """Every pooled producer held (open chunk publishers of other threads): a Ctrl-C of
    a submit_many waiting for one in the main thread stops it then, and its chunk is not
    sent afterwards; the wait for a producer is no publish to finish first."""
    settings = broker_settings(redis_url, sqlite_url)
    release = threading.Event()
    out: dict[str, Any] = {}
    with Client(settings) as client:
        limit = client.app.conf.broker_pool_limit
        held = threading.Barrier(limit + 1)

        def hold() -> None:
            with client.chunk_publisher():
                held.wait(10)
                release.wait(20)

        holders = [threading.Thread(target=hold, daemon=True) for _ in range(limit)]
        for holder in holders:
            holder.start()
        held.wait(10)
        interrupt = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
        freed = threading.Timer(10, release.set)  # the producers come back at last
        interrupt.start()
        freed.start()
        try:
            try:
                client.submit_many(["after ctrl-c"])
                out["ended"] = "returned"
            except KeyboardInterrupt:
                out["ended"] = "interrupted"
            out["held"] = not release.is_set()
        finally:
            interrupt.join()
            release.set()
            freed.cancel()
            for holder in holders:
                holder.join(10)
    assert out["ended"] == "interrupted"
    assert out["held"], "Ctrl-C was held until a producer came back"
    assert not lane_messages(redis_url, f"{settings.queue}.bulk"), "sent after Ctrl-C"
