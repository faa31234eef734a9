"""Quiet sources (a websocket gateway: each open socket feeds submit_many with a live
generator that yields when a user types) must not hold the client's shared resources
while they wait for their next item. Ten of them held the AsyncClient's ten threads, or
(sync callers, each in a thread of its own) the client's ten pooled producers, for their
whole life: every other call of the client (a submit, the eleventh source) waited until
a source ended. aclose() ends an open quiet async source, and Ctrl-C stops a submit_many
that waits for a pooled producer. A gateway's sync generator blocked on its socket or
queue no longer keeps the process from exiting once its call is cancelled or closed (the
post its read takes after a cancel is sent, not lost), and sources flushing caller ids
at once on a slow database wait their turn for a connection rather than skip the id
check past the connection pool's timeout."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from contract.constants import RESULTS_TABLE
from contract.results import ResultStore
from contract.settings import Settings
from producer import AsyncClient, Client, ClientClosed
from producer.aclient import MAX_THREADS
from tests.producer_helpers import broker_settings, lane_messages, record, until

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


#: A user's gateway, run as its own process: two sockets (sync generators on queues, as
#: a websocket's reader thread feeds them) in submit_many; the call is stopped (argv[4]:
#: cancel, or aclose) while both block for their next post; then socket a gets a late
#: post, and b stays blocked in its get as the process exits.
GATEWAY = """
import asyncio, queue, sys, threading
from contract.settings import Settings
from producer import AsyncClient
from tests.producer_helpers import lane_messages, until

redis_url, database_url, name, stop = sys.argv[1:]
settings = Settings(broker_url=redis_url, database_url=database_url, queue=name)
posts = {"a": queue.Queue(), "b": queue.Queue()}
asked = {"a": threading.Semaphore(0), "b": threading.Semaphore(0)}

def socket(user):
    while True:
        asked[user].release()
        yield posts[user].get()

def queued():
    return {it["id"] for m in lane_messages(redis_url, name + ".bulk") for it in m["items"]}

async def main():
    client = AsyncClient(settings)
    calls = [asyncio.create_task(client.submit_many(socket(u), linger_s=0.3)) for u in "ab"]
    for user, ids in (("a", ["a-0", "a-1"]), ("b", ["b-0"])):
        for i in ids:
            posts[user].put({"text": "post " + i, "id": i})
        for _ in range(len(ids) + 1):  # every post taken, and the next one asked for
            await asyncio.to_thread(asked[user].acquire)
    given = {"a-0", "a-1", "b-0"}
    if stop == "aclose":  # what its linger had not sent yet may stay unsent: sent first
        await asyncio.to_thread(until, lambda: given <= queued(), 5)
        await client.aclose()
    else:
        for call in calls:
            call.cancel()
    ended = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    print("ended:", sorted({type(e).__name__ for e in ended}), flush=True)
    if stop == "cancel":  # the posts taken before the cancel still go out
        await asyncio.to_thread(until, lambda: given <= queued(), 5)
    posts["a"].put({"text": "late post", "id": "a-late"})
    await asyncio.to_thread(until, posts["a"].empty, 5)
    await asyncio.sleep(1)  # past the linger: a late post sent is queued by now
    await client.aclose()

asyncio.run(main())
print("main returned", flush=True)
"""


@pytest.mark.parametrize("stop", ["cancel", "aclose"])
def test_a_gateway_blocked_in_a_sync_generator_lets_the_process_exit(
        redis_url: str, sqlite_url: str, stop: str) -> None:
    """A gateway's sync generators blocked on their queues when the app cancels their
    submit_many (or closes the client) and returns from ``asyncio.run``: the calls end
    at once, the process exits (their threads were joined at exit, for ever), quietly.
    The posts taken before are queued, and so is the late post the blocked read takes
    after a cancel (not after aclose(): the client is closed, and one warning counts
    it); the read ends there."""
    settings = broker_settings(redis_url, sqlite_url)
    try:
        run = subprocess.run(
            [sys.executable, "-c", GATEWAY, redis_url, sqlite_url, settings.queue, stop],
            capture_output=True, text=True, timeout=30,
            cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the gateway did not exit: {exc.stdout!r} {exc.stderr!r}")
    ended = "ClientClosed" if stop == "aclose" else "CancelledError"
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [f"ended: [{ended!r}]", "main returned"], run.stdout
    if stop == "aclose":  # the late post, taken after the close, is not sent: one warning
        assert len(run.stderr.splitlines()) == 1, run.stderr
        assert "took 1 item(s) from its source that were not sent" in run.stderr
    else:
        assert run.stderr == ""
    late = {"a-late"} if stop == "cancel" else set()
    assert _queued(redis_url, settings) == {"a-0", "a-1", "b-0"} | late


#: SQLAlchemy's default wait for a pooled connection, in seconds (the store keeps it).
POOL_TIMEOUT_S = 30
#: More sources than the store's connection pool holds (SQLAlchemy's default: 5 + 10).
DB_SOURCES = 20


def test_sources_flushing_caller_ids_on_a_slow_database_each_check_them(
        redis_url: str, pg_url: str) -> None:
    """More quiet async sources with caller ids than the store has connections flush at
    once while PostgreSQL answers none of their checks for longer than the pool's
    timeout (the results table locked, as a migration's ALTER does): each check waits
    its turn, so every id stored with another text is refused. Those left waiting for a
    connection were skipped, and their conflicting posts sent."""
    store = ResultStore.from_url(pg_url)
    store.create_schema()
    store.upsert([record(f"w{n}", text="the stored text") for n in range(DB_SOURCES)])
    store.close()
    # a statement may wait for the lock longer than the pool's timeout
    settings = broker_settings(redis_url, pg_url, db_statement_timeout_s=3 * POOL_TIMEOUT_S)
    locker = sa.create_engine(pg_url)
    out: dict[str, Any] = {}

    async def main() -> None:
        async def socket(n: int) -> Any:
            yield {"text": "another text", "id": f"w{n}"}

        async with AsyncClient(settings) as client:
            # the schema is read once, before the table is locked
            await client.submit_many([{"text": "warm up", "id": "warm"}])
            with locker.begin() as conn:
                conn.execute(sa.text(f"LOCK TABLE {RESULTS_TABLE} IN ACCESS EXCLUSIVE MODE"))
                calls = [asyncio.create_task(client.submit_many(socket(n)))
                         for n in range(DB_SOURCES)]
                await asyncio.sleep(POOL_TIMEOUT_S + 3)
            reports = await asyncio.wait_for(
                asyncio.gather(*calls, return_exceptions=True), 3 * POOL_TIMEOUT_S)
        out["reports"] = reports

    try:
        asyncio.run(main())
    finally:
        locker.dispose()
    reports = out["reports"]
    assert not [r for r in reports if isinstance(r, BaseException)], reports
    assert [r.ids for r in reports if r.ids] == [], "a conflicting id was sent unchecked"
    assert all(len(r.errors) == 1 and "different text" in r.errors[0].reason for r in reports)
    assert _queued(redis_url, settings) == {"warm"}


def test_one_dict_item_given_to_the_async_submit_many_is_refused(
        redis_url: str, sqlite_url: str) -> None:
    """One dict item for many, as Client.submit_many refuses it: the async client read it
    in a source's thread, as a generator of its keys, and queued each ("text", "id")."""
    settings = broker_settings(redis_url, sqlite_url)

    async def main() -> None:
        async with AsyncClient(settings) as client:
            with pytest.raises(TypeError, match="not one dict item"):
                await client.submit_many({"text": "hello", "id": "a"})

    asyncio.run(main())
    assert not lane_messages(redis_url, f"{settings.queue}.bulk"), "its keys were queued"


def test_the_post_a_cancelled_calls_generator_waited_for_is_sent(
        redis_url: str, sqlite_url: str) -> None:
    """A gateway cancels the call whose generator blocks on the user's inbox (a queue kept
    across reconnects): the post that read returns after the cancel was taken from the
    inbox, so dropped it was lost, to the call that reads the inbox next as well. It is
    sent, and the read ends there."""
    settings = broker_settings(redis_url, sqlite_url)
    inbox: queue.Queue[dict[str, str]] = queue.Queue()
    asked = threading.Semaphore(0)
    out: dict[str, Any] = {}

    def socket() -> Iterator[dict[str, str]]:
        while True:
            asked.release()
            yield inbox.get()

    async def main() -> None:
        async with AsyncClient(settings) as client:
            call = asyncio.create_task(client.submit_many(socket(), linger_s=0.1))
            await asyncio.to_thread(asked.acquire)  # its read waits for the inbox
            call.cancel()
            out["ended"] = await asyncio.gather(call, return_exceptions=True)
            inbox.put({"text": "posted as the socket dropped", "id": "late"})
            out["sent"] = await asyncio.to_thread(
                until, lambda: "late" in _queued(redis_url, settings), 5)
            out["left"] = await asyncio.to_thread(until, lambda: not _source_threads(), 5)

    asyncio.run(main())
    assert [type(e) for e in out["ended"]] == [asyncio.CancelledError]
    assert out["sent"], "the post its read took after the cancel was dropped"
    assert out["left"], "the read went on after that post"
    assert inbox.empty()
