"""AsyncClient: the client's calls from asyncio code, without stopping the event loop.

A heartbeat task ticking every 10 ms measures the loop: the sync client's wait, run
in an ``async def`` route, stops it for the wait's whole timeout (no tick at all). The
async client's calls run in its own threads, and its waits pause on the loop between
polls. Each test runs its own loop (``asyncio.run``); no pytest plugin is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from contract.errors import BrokerUnavailable, InvalidInput, ResultTimeout
from contract.messages import make_item
from contract.results import ResultStore
from contract.settings import Settings
from producer import AsyncClient, Client, ClientClosed
from producer.aclient import MAX_THREADS
from tests.producer_helpers import broker_settings, lane_messages, record
from worker.process import free_port


@pytest.fixture
def rsettings(redis_url: str, sqlite_url: str, sqlite_store: ResultStore) -> Settings:
    """Settings on the test Redis and a SQLite store with its table (rows r0..r9)."""
    sqlite_store.upsert([record(f"r{i}") for i in range(10)])
    return broker_settings(redis_url, sqlite_url)


class Heartbeat:
    """Ticks every 10 ms on the running loop; counts the ticks and the longest gap."""

    def __init__(self) -> None:
        self.ticks = 0
        self.longest_gap = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _beat(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.ticks += 1
            self.longest_gap = max(self.longest_gap, now - last)
            last = now

    async def measure(self, work: Callable[[], Awaitable[Any]]) -> BaseException | None:
        """Run ``work()`` while beating; give what it raised (None when it returned)."""
        self._task = asyncio.create_task(self._beat())
        await asyncio.sleep(0.03)  # the heartbeat runs before the work starts
        self.ticks, self.longest_gap = 0, 0.0
        try:
            await work()
            return None
        except Exception as exc:  # noqa: BLE001 - handed to the test
            return exc
        finally:
            self._task.cancel()


def _run(main: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(main)


def _count_queries(client: AsyncClient) -> list[str]:
    """The SQL statements the shared client runs from now on, as they run."""
    seen: list[str] = []
    sa.event.listen(client.sync.store.engine, "before_cursor_execute",
                    lambda _conn, _cur, statement, *_: seen.append(statement))
    return seen


async def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Yield to the loop until ``check()`` holds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s"
        await asyncio.sleep(0.01)


# -- the event loop goes on --------------------------------------------------


def test_the_loop_keeps_ticking_while_a_wait_waits(rsettings: Settings) -> None:
    """The sync Client.wait in a route stopped the loop for its whole timeout: no tick
    in a 1 s wait (every request of the server stood still). AsyncClient.wait waits
    as long, with the loop ticking all along."""
    async def main() -> tuple[Heartbeat, BaseException | None, Heartbeat, BaseException | None]:
        blocked, beating = Heartbeat(), Heartbeat()
        with Client(rsettings) as sync:
            async def sync_wait() -> None:
                sync.wait(["never"], timeout=1.0)

            sync_raised = await blocked.measure(sync_wait)
        async with AsyncClient(rsettings) as client:
            raised = await beating.measure(lambda: client.wait(["never"], timeout=1.0))
        return blocked, sync_raised, beating, raised

    blocked, sync_raised, beating, raised = _run(main())
    # the control: the heartbeat does see a stopped loop
    assert isinstance(sync_raised, ResultTimeout) and blocked.ticks == 0
    assert isinstance(raised, ResultTimeout) and raised.missing == ["never"]
    assert beating.ticks >= 10 and beating.longest_gap < 0.5, vars(beating)


def test_the_loop_keeps_ticking_while_a_submit_retries_an_absent_redis(
        sqlite_url: str) -> None:
    """A submit while Redis is down retries the publish for seconds: in a thread, with
    the loop ticking, and then raises BrokerUnavailable as the sync client does."""
    settings = Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0", database_url=sqlite_url,
                        publish_retries=3)

    async def main() -> tuple[Heartbeat, BaseException | None]:
        beat = Heartbeat()
        async with AsyncClient(settings) as client:
            return beat, await beat.measure(lambda: client.submit("hello"))

    beat, raised = _run(main())
    assert isinstance(raised, BrokerUnavailable), raised
    assert beat.ticks >= 10 and beat.longest_gap < 0.5, vars(beat)


def test_waits_hold_no_thread_between_polls(rsettings: Settings) -> None:
    """Five times as many waits as the client has threads, all pending: a read still gets
    a thread at once (a wait that held its thread would hold it for its 30 s)."""
    async def main() -> tuple[int, Any]:
        async with AsyncClient(rsettings) as client:
            queries = _count_queries(client)
            waits = [asyncio.create_task(client.wait([f"never-{i}"], timeout=30))
                     for i in range(5 * MAX_THREADS)]
            await _until(lambda: len(queries) >= 5 * MAX_THREADS, "every wait polled")
            got = await asyncio.wait_for(client.get("r1"), timeout=10)
            busy = sum(t.name.startswith("bertstream-async") for t in threading.enumerate())
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            return busy, got

    threads, got = _run(main())
    assert got is not None and got.id == "r1"
    assert threads <= MAX_THREADS


# -- a real worker -------------------------------------------------------------


@pytest.mark.slow
def test_submit_and_wait_round_trip_through_a_real_worker(
        settings: Settings, worker_factory: Any) -> None:
    """Submit one text and many, wait for them all, then read them back every way."""
    scoring = settings.replace(model="null")
    worker_factory(scoring)

    async def main() -> dict[str, Any]:
        async with AsyncClient(scoring) as client:
            one = await client.submit("The staff were friendly.", source="web", meta={"u": 7})
            report = await client.submit_many(["很好", "太差了", {"text": "ok", "id": "key-1"},
                                               ""], source="batch")
            ids = [one, *report.ids]
            results = await client.wait(ids, timeout=60)
            return {
                "one": one, "report": report, "ids": ids, "results": results,
                "get": await client.get(one), "get_many": await client.get_many([one, "nope"]),
                "query": await client.query(source="batch"),
                "count": await client.count(ids=ids),
                "aggregate": await client.aggregate(by="source"),
                "windows": await client.windows(one),
                "queued": await client.queue_length(),
                "workers": await client.live_workers(),
            }

    out = _run(main())
    report = out["report"]
    assert report.accepted == 3 and [e.index for e in report.errors] == [3]
    assert "key-1" in report.ids
    assert list(out["results"]) == out["ids"]
    assert all(r.status == "done" and r.label == "positive" for r in out["results"].values())
    assert out["results"][out["one"]].source == "web"
    assert out["get"] is not None and out["get"].id == out["one"]
    assert list(out["get_many"]) == [out["one"]]
    assert sorted(r.id for r in out["query"]) == sorted(report.ids)
    assert out["count"] == 4
    assert {(row["source"], row["count"]) for row in out["aggregate"]} == {("web", 1),
                                                                            ("batch", 3)}
    assert out["windows"] == [] and out["queued"] == 0 and len(out["workers"]) == 1


# -- waits: results, timeouts, arguments ---------------------------------------


def test_wait_returns_rows_written_while_it_waits(rsettings: Settings,
                                                  sqlite_store: ResultStore) -> None:
    async def main() -> dict[str, Any]:
        async with AsyncClient(rsettings) as client:
            queries = _count_queries(client)
            waiting = asyncio.create_task(client.wait(["r1", "w1"], timeout=20,
                                                      poll_interval=0.01))
            await _until(lambda: len(queries) >= 2, "the wait polled")
            await asyncio.to_thread(sqlite_store.upsert, [record("w1", label="negative")])
            return await waiting

    found = _run(main())
    assert list(found) == ["r1", "w1"] and found["w1"].label == "negative"


def test_wait_times_out_with_the_missing_ids(rsettings: Settings) -> None:
    async def main() -> tuple[ResultTimeout, ResultTimeout, dict[str, Any]]:
        async with AsyncClient(rsettings) as client:
            with pytest.raises(ResultTimeout) as waited:
                await client.wait(["r1", "t2", "t3", "t2"], timeout=0.3, poll_interval=0.05)
            with pytest.raises(ResultTimeout) as looked:
                await client.wait(["t9"], timeout=0)  # one look
            return waited.value, looked.value, await client.wait([], timeout=0)

    waited, looked, nothing = _run(main())
    assert waited.missing == ["t2", "t3"] and looked.missing == ["t9"] and nothing == {}


@pytest.mark.parametrize(("call", "error", "says"), [
    (lambda c: c.wait(["r1"], timeout=math.nan), InvalidInput, "timeout must be a finite"),
    (lambda c: c.wait(["r1"], timeout=1, poll_interval=0), InvalidInput, "poll_interval"),
    (lambda c: c.wait(["r1", 17], timeout=30), InvalidInput, "id must be a string"),
    (lambda c: c.wait("r1", timeout=30), TypeError, r"pass \[id\]"),
    (lambda c: c.wait(["r1"], model=5), InvalidInput, "model must be a string"),
    (lambda c: c.get(17), InvalidInput, "id must be a string"),
    (lambda c: c.submit(""), InvalidInput, "empty"),
    (lambda c: c.submit_many("one text"), TypeError, "iterable of items"),
    (lambda c: c.query(status="finished"), InvalidInput, "unknown status"),
    (lambda c: c.aggregate(by="text"), InvalidInput, "cannot group by"),
])
def test_bad_arguments_raise_what_the_sync_client_raises(
        rsettings: Settings, call: Callable[[AsyncClient], Awaitable[Any]],
        error: type[Exception], says: str) -> None:
    """The sync client's checks, unchanged: a wait given a NaN timeout or an int id
    raises at once rather than waiting out its timeout."""
    async def main() -> None:
        async with AsyncClient(rsettings) as client:
            with pytest.raises(error, match=says):
                await asyncio.wait_for(call(client), timeout=10)

    _run(main())


# -- cancellation and close ------------------------------------------------------


def test_a_cancelled_wait_polls_no_more(rsettings: Settings) -> None:
    async def main() -> tuple[int, int]:
        async with AsyncClient(rsettings) as client:
            queries = _count_queries(client)
            waiting = asyncio.create_task(client.wait(["never"], timeout=30,
                                                      poll_interval=0.01))
            await _until(lambda: len(queries) >= 3, "the wait polled")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            cancelled_at = len(queries)
            # as long as several more polls would take (at 0.01 s, x1.5 each)
            await asyncio.sleep(0.3)
            return cancelled_at, len(queries)

    cancelled_at, later = _run(main())
    assert later <= cancelled_at + 1  # at most the poll that was in its thread


def test_aclose_ends_a_wait_in_flight_with_client_closed(rsettings: Settings) -> None:
    """The wait is in a 10 s pause between two polls: aclose() ends it at once with
    ClientClosed, not at its next poll, nor at its 30 s timeout."""
    async def main() -> BaseException | None:
        client = AsyncClient(rsettings)
        queries = _count_queries(client)
        waiting = asyncio.create_task(client.wait(["never"], timeout=30, poll_interval=10))
        await _until(lambda: len(queries) >= 1, "the wait polled")
        await client.aclose()
        try:
            await asyncio.wait_for(waiting, timeout=5)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            return exc
        return None

    raised = _run(main())
    assert isinstance(raised, ClientClosed), raised


def test_aclose_under_a_bulk_submit_is_client_closed(rsettings: Settings,
                                                     redis_url: str) -> None:
    """aclose() while submit_many runs in its thread: the chunk sent before stays sent,
    the call ends with ClientClosed, as with the sync client's close()."""
    sent_one, go_on = threading.Event(), threading.Event()

    def items() -> Iterator[str]:
        yield from ("a", "b")  # one chunk of 2
        sent_one.set()
        go_on.wait(10)
        yield from ("c", "d")

    async def main() -> BaseException | None:
        client = AsyncClient(rsettings)
        submitting = asyncio.create_task(client.submit_many(items(), chunk_size=2))
        await asyncio.to_thread(sent_one.wait, 10)
        await client.aclose()
        go_on.set()
        try:
            await submitting
        except Exception as exc:  # noqa: BLE001 - handed to the test
            return exc
        return None

    raised = _run(main())
    assert isinstance(raised, ClientClosed), raised
    queued = [it["id"] for m in lane_messages(redis_url, f"{rsettings.queue}.bulk")
              for it in m["items"]]
    assert len(queued) == 2


def test_every_call_after_aclose_is_client_closed(rsettings: Settings, redis_url: str) -> None:
    """aclose() is idempotent; afterwards every call raises ClientClosed, and the shared
    sync client is closed too. Leaving ``async with`` closes the same way."""
    async def main() -> list[str]:
        async with AsyncClient(rsettings) as client:
            await client.submit("before")
        await client.aclose()
        wrong = []
        for name, call in [("submit", lambda: client.submit("after")),
                           ("submit_many", lambda: client.submit_many(["after"])),
                           ("get", lambda: client.get("r1")),
                           ("get_many", lambda: client.get_many(["r1"])),
                           ("wait", lambda: client.wait(["r1"], timeout=1)),
                           ("query", lambda: client.query()),
                           ("count", lambda: client.count()),
                           ("aggregate", lambda: client.aggregate()),
                           ("queue_length", lambda: client.queue_length()),
                           ("sync", lambda: asyncio.to_thread(client.sync.get, "r1"))]:
            try:
                await call()
                wrong.append(f"{name}: returned")
            except ClientClosed as exc:
                if "Client is closed" not in str(exc):
                    wrong.append(f"{name}: {exc}")
        return wrong

    assert _run(main()) == []
    assert len(lane_messages(redis_url, f"{rsettings.queue}.interactive")) == 1


def test_one_client_serves_several_event_loops(rsettings: Settings) -> None:
    """A client built at import time serves each loop that uses it (a test's, then the
    server's): its threads are no loop's own."""
    client = AsyncClient(rsettings)
    first = _run(client.get("r1"))
    second = _run(client.wait(["r2"], timeout=5))
    _run(client.aclose())
    assert first is not None and first.id == "r1" and list(second) == ["r2"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_client_inherited_by_a_forked_child_serves_it(rsettings: Settings) -> None:
    """gunicorn --preload with uvicorn workers: the client is built (and used) in the
    master, then forked. The child has none of the master's threads; a pool that still
    counted them as idle queued the child's calls for ever."""
    client = AsyncClient(rsettings)
    assert _run(client.get("r1")) is not None  # the threads run, one idle, before the fork
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's exit code is asserted
        code = 1
        try:
            got = _run(asyncio.wait_for(client.get("r2"), timeout=10))
            code = 0 if got is not None and got.id == "r2" else 1
            _run(client.aclose())
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert _run(client.get("r3")) is not None
    _run(client.aclose())


def test_the_async_client_imports_no_torch() -> None:
    code = ("import sys; import producer.aclient; "
            "print([m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"


# -- models: for_model, stored_model -------------------------------------------


async def _hold_every_thread(client: AsyncClient) -> tuple[threading.Event, list[asyncio.Task[Any]]]:
    """Every thread of ``client``'s pool busy until the event is set (and the tasks done)."""
    release, started = threading.Event(), threading.Semaphore(0)

    def hold() -> None:
        started.release()
        release.wait(30)

    held = [asyncio.create_task(client.to_thread(hold)) for _ in range(MAX_THREADS)]
    for _ in range(MAX_THREADS):
        assert await asyncio.to_thread(started.acquire, True, 10), "a thread did not start"
    return release, held


def test_for_model_gives_one_client_per_model_sharing_the_threads(
        rsettings: Settings, redis_url: str) -> None:
    """As Client.for_model: the same client for a name each time, this one for its own
    model (None and ``default`` are the default model), its tasks on the model's queue
    family. It runs in the same pool: with every thread held by its client's calls, its
    call waits for one (one pool for all, at most MAX_THREADS threads)."""
    async def main() -> dict[str, Any]:
        async with AsyncClient(rsettings) as client:
            bound = client.for_model("sentiment-v2")
            out: dict[str, Any] = {
                "same": client.for_model("sentiment-v2") is bound,
                "self": [client.for_model(None) is client, client.for_model("default") is client,
                         bound.for_model("sentiment-v2") is bound],
                "sync": bound.sync is client.sync.for_model("sentiment-v2"),
                "name": bound.settings.model_name,
                "id": await bound.submit("on the named model"),
            }
            release, held = await _hold_every_thread(client)
            reading = asyncio.create_task(bound.queue_length())
            await asyncio.sleep(0.3)
            out["waited"] = not reading.done()
            release.set()
            out["read"] = await asyncio.wait_for(reading, timeout=10)
            await asyncio.gather(*held)
            out["threads"] = sum(t.name.startswith("bertstream-async")
                                 for t in threading.enumerate())
            with pytest.raises(InvalidInput, match="a model name is"):
                client.for_model("no spaces allowed")
            return out

    out = _run(main())
    assert out["same"] and out["self"] == [True, True, True] and out["sync"], out
    assert out["name"] == "sentiment-v2"
    named = lane_messages(redis_url, f"{rsettings.queue}-sentiment-v2.interactive")
    assert [it["id"] for m in named for it in m["items"]] == [out["id"]]
    assert lane_messages(redis_url, f"{rsettings.queue}.interactive") == []
    assert out["waited"] and out["read"] == 1  # its own lanes' message
    assert out["threads"] <= MAX_THREADS


def test_aclose_closes_the_for_model_clients_and_ends_their_waits(rsettings: Settings) -> None:
    """A wait of a for_model client, in a 10 s pause: its client's aclose() ends it with
    ClientClosed at once; afterwards the bound client and for_model refuse too."""
    async def main() -> list[str]:
        client = AsyncClient(rsettings)
        bound = client.for_model("sentiment-v2")
        queries = _count_queries(bound)
        waiting = asyncio.create_task(bound.wait(["never"], timeout=30, poll_interval=10))
        await _until(lambda: len(queries) >= 1, "the wait polled")
        await client.aclose()
        wrong = []
        for name, call in [("wait", lambda: asyncio.wait_for(waiting, timeout=5)),
                           ("get", lambda: bound.get("r1")),
                           ("stored_model", lambda: bound.stored_model("x")),
                           ("sync", lambda: asyncio.to_thread(bound.sync.get, "r1"))]:
            try:
                await call()
                wrong.append(f"{name}: returned")
            except ClientClosed:
                pass
        for make in (lambda: client.for_model("sentiment-v2"), lambda: bound.for_model("v3")):
            try:
                make()
                wrong.append("for_model: returned")
            except ClientClosed:
                pass
        return wrong

    assert _run(main()) == []


def test_a_for_model_client_closed_alone_leaves_its_client_working(
        rsettings: Settings) -> None:
    """As Client.close of a for_model client: it alone is closed; the threads it shares
    stay for its client."""
    async def main() -> tuple[BaseException | None, Any, str]:
        async with AsyncClient(rsettings) as client:
            bound = client.for_model("sentiment-v2")
            await bound.get("r1")
            await bound.aclose()
            try:
                await bound.get("r1")
                raised = None
            except ClientClosed as exc:
                raised = exc
            return raised, await client.get("r2"), await client.submit("still here")

    raised, got, task_id = _run(main())
    assert isinstance(raised, ClientClosed)
    assert got is not None and got.id == "r2" and task_id


def test_stored_model_without_a_live_default_worker(rsettings: Settings) -> None:
    """Client.stored_model's answers, awaited: a named model is its own name; ``default``
    needs a live worker of the default model to tell it, else InvalidInput."""
    async def main() -> tuple[str | None, str | None, list[str] | None]:
        async with AsyncClient(rsettings) as client:
            with pytest.raises(InvalidInput, match="no worker of the default model is alive"):
                await client.stored_model("default")
            return (await client.stored_model("sentiment-v2"), await client.stored_model(None),
                    await client.default_model_names())

    assert _run(main()) == ("sentiment-v2", None, [])


@pytest.mark.slow
def test_for_model_stored_model_and_a_chunk_publisher_through_real_workers(
        settings: Settings, worker_factory: Any) -> None:
    """A worker of the default model and one of a named model: the named model's client
    submits and waits for its rows (stored under its name); ``stored_model("default")``
    is the name the default worker announces, and a wait with ``model="default"`` reads
    its rows; a chunk publisher's items are scored."""
    scoring = settings.replace(model="null")
    worker_factory(scoring)
    worker_factory(scoring.replace(model_name="sentiment-v2"))

    async def main() -> dict[str, Any]:
        async with AsyncClient(scoring) as client:
            bound = client.for_model("sentiment-v2")
            named = await bound.submit("The staff were friendly.")
            default = await client.submit("The staff were friendly.")
            async with client.chunk_publisher(chunk_size=2) as publisher:
                items = [make_item(t, scoring, source="chunks") for t in ("a", "b", "c")]
                for item in items:
                    await publisher.add(item)
            return {
                "named": await bound.wait([named], timeout=60),
                "stored": await client.stored_model("default"),
                "announced": await client.to_thread(client.sync.stored_model, "default"),
                "default": await client.wait([default], timeout=60, model="default"),
                "chunks": await client.wait([it.id for it in items], timeout=60),
                "messages": publisher.messages,
            }

    out = _run(main())
    [(_, named)] = out["named"].items()
    assert named.status == "done" and named.model == "sentiment-v2"
    assert out["stored"] == out["announced"] and out["stored"] != "sentiment-v2"
    [(_, default)] = out["default"].items()
    assert default.status == "done" and default.model == out["stored"]
    assert [r.status for r in out["chunks"].values()] == ["done"] * 3
    assert {r.source for r in out["chunks"].values()} == {"chunks"} and out["messages"] == 2


# -- publishing: chunk_publisher, publish --------------------------------------


def _bulk_ids(redis_url: str, settings: Settings) -> list[list[str]]:
    """The ids of each message waiting on the bulk lane, oldest first."""
    return [[it["id"] for it in m["items"]]
            for m in lane_messages(redis_url, f"{settings.queue}.bulk")]


def test_a_chunk_publisher_sends_a_message_per_chunk_and_the_rest_on_exit(
        rsettings: Settings, redis_url: str) -> None:
    """Five items in chunks of two: two messages as they fill, the fifth at the end of the
    block. The hooks run in the client's threads, not on the loop."""
    seen: list[tuple[list[str], list[Any], str]] = []

    def after_send(items: list[Any], origins: list[Any]) -> None:
        seen.append(([it.id for it in items], origins, threading.current_thread().name))

    async def main() -> tuple[list[str], int, int]:
        async with AsyncClient(rsettings) as client:
            items = [make_item(f"text {i}", rsettings) for i in range(5)]
            async with client.chunk_publisher(chunk_size=2, after_send=after_send) as publisher:
                for n, item in enumerate(items):
                    await publisher.add(item, origin=n)
                assert publisher.messages == 2  # the fifth is buffered
            return [it.id for it in items], publisher.messages, publisher.published

    ids, messages, published = _run(main())
    assert _bulk_ids(redis_url, rsettings) == [ids[:2], ids[2:4], ids[4:]]
    assert (messages, published) == (3, 5)
    assert [s[1] for s in seen] == [[0, 1], [2, 3], [4]]
    assert all(s[2].startswith("bertstream-async") for s in seen), seen


@pytest.mark.parametrize("how", ["raised", "cancelled"])
def test_a_chunk_publisher_left_by_an_error_drops_the_rest(
        rsettings: Settings, redis_url: str, how: str) -> None:
    """As the sync chunk publisher: the full chunk was sent, the buffered third item is
    dropped, and the error (or the cancellation) goes on."""
    async def main() -> tuple[list[str], BaseException | None]:
        async with AsyncClient(rsettings) as client:
            items = [make_item(f"text {i}", rsettings) for i in range(3)]
            inside = asyncio.Event()

            async def publish() -> None:
                async with client.chunk_publisher(chunk_size=2) as publisher:
                    for item in items:
                        await publisher.add(item)
                    if how == "raised":
                        raise ValueError("the caller's own error")
                    inside.set()
                    await asyncio.sleep(30)

            task = asyncio.create_task(publish())
            if how == "cancelled":
                await inside.wait()
                task.cancel()
            try:
                await task
                raised = None
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                raised = exc
            # the client's publish still works: the producer went back to its pool
            await client.submit_many(["after"])
            return [it.id for it in items], raised

    ids, raised = _run(main())
    if how == "raised":
        assert isinstance(raised, ValueError)
    else:
        assert isinstance(raised, asyncio.CancelledError)
    sent = _bulk_ids(redis_url, rsettings)
    assert sent[0] == ids[:2] and len(sent) == 2 and ids[2] not in sent[1]


def test_a_chunk_publisher_cancelled_while_it_waits_for_a_producer_gives_it_back(
        rsettings: Settings) -> None:
    """Every producer of the client's pool held by an open publisher: the next one waits
    for a producer in its thread. Cancelled there, it still gets one once another is
    given back, and gives it back at once: afterwards as many publishers as the pool has
    producers open again (one lost would leave the last waiting for ever)."""
    async def main() -> int:
        async with AsyncClient(rsettings) as client:
            limit = client.sync.app.conf.broker_pool_limit
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(limit):
                    await stack.enter_async_context(client.chunk_publisher())
                waiting = asyncio.create_task(client.chunk_publisher().__aenter__())
                await asyncio.sleep(0.3)  # in its thread, waiting for a producer
                assert not waiting.done()
                waiting.cancel()
                # kept, with its traceback: the frames it holds do not give the producer back
                with pytest.raises(asyncio.CancelledError) as cancelled:
                    await waiting
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(limit):
                    await asyncio.wait_for(
                        stack.enter_async_context(client.chunk_publisher()), timeout=10)
            assert cancelled.tb is not None
            return limit

    assert _run(main()) >= 1


def test_a_chunk_publisher_hands_a_conflicting_caller_id_to_on_conflict(
        rsettings: Settings, redis_url: str) -> None:
    """Caller ids are checked against the stored rows (a read, in a thread): ``r1`` is
    stored with another text, so it is refused, not sent."""
    refused: list[tuple[str, str]] = []

    async def main() -> str:
        async with AsyncClient(rsettings) as client:
            fresh = make_item("a text", rsettings, id="fresh-1")
            async with client.chunk_publisher(
                    on_conflict=lambda b, why: refused.append((b.item.id, why))) as publisher:
                await publisher.add(make_item("another text", rsettings, id="r1"), caller_id=True)
                await publisher.add(fresh, caller_id=True)
            return fresh.id

    fresh = _run(main())
    assert [r[0] for r in refused] == ["r1"] and "different text" in refused[0][1]
    assert _bulk_ids(redis_url, rsettings) == [[fresh]]


def test_a_chunk_publisher_after_aclose_is_client_closed(rsettings: Settings,
                                                        redis_url: str) -> None:
    """aclose() under an open publisher: its next call and the end of its block raise
    ClientClosed; what was buffered is not sent."""
    async def main() -> list[str]:
        client = AsyncClient(rsettings)
        wrong = []
        try:
            async with client.chunk_publisher(chunk_size=10) as publisher:
                await publisher.add(make_item("buffered", rsettings))
                await client.aclose()
                try:
                    await publisher.add(make_item("after", rsettings))
                    wrong.append("add: returned")
                except ClientClosed:
                    pass
            wrong.append("exit: returned")
        except ClientClosed:
            pass
        try:
            async with client.chunk_publisher():
                wrong.append("entered")
        except ClientClosed:
            pass
        return wrong

    assert _run(main()) == []
    assert _bulk_ids(redis_url, rsettings) == []


def test_publish_sends_validated_items_as_one_message(rsettings: Settings,
                                                      redis_url: str) -> None:
    async def main() -> list[str]:
        async with AsyncClient(rsettings) as client:
            items = [make_item(t, rsettings) for t in ("one", "two")]
            await client.publish(items, bulk=True)
            return [it.id for it in items]

    ids = _run(main())
    assert _bulk_ids(redis_url, rsettings) == [ids]


def test_to_thread_runs_in_the_clients_threads_and_is_closed_with_it(
        rsettings: Settings, sqlite_store: ResultStore) -> None:
    """What has no coroutine (the store's delete) runs in the pool, with its result and
    errors; after aclose() it is ClientClosed as every call."""
    async def main() -> tuple[str, Any, BaseException | None]:
        client = AsyncClient(rsettings)
        thread = await client.to_thread(lambda: threading.current_thread().name)
        deleted = await client.to_thread(lambda: client.sync.store.delete(ids=["r1", "r2"]))
        await client.aclose()
        try:
            await client.to_thread(print, "never")
            return thread, deleted, None
        except ClientClosed as exc:
            return thread, deleted, exc

    thread, deleted, raised = _run(main())
    assert thread.startswith("bertstream-async")
    assert deleted.tasks == 2 and sqlite_store.get_many(["r1", "r2", "r3"]).keys() == {"r3"}
    assert isinstance(raised, ClientClosed)


# -- a cancelled submit ----------------------------------------------------------


def test_a_submit_cancelled_while_it_waits_for_a_thread_is_never_sent(
        rsettings: Settings, redis_url: str) -> None:
    """Every thread busy: the submit waits its turn in the pool's queue; cancelled there,
    it never runs (nothing is sent when the threads are free again)."""
    async def main() -> int:
        async with AsyncClient(rsettings) as client:
            release, held = await _hold_every_thread(client)
            submitting = asyncio.create_task(client.submit("never sent", id="queued-1"))
            for _ in range(3):
                await asyncio.sleep(0)  # the call is in the pool's queue
            submitting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await submitting
            release.set()
            await asyncio.gather(*held)
            await client.get("r1")  # a call after it: the queue was worked through
            return await client.queue_length()

    assert _run(main()) == 0
    assert lane_messages(redis_url, f"{rsettings.queue}.interactive") == []


@pytest.mark.slow
def test_a_submit_cancelled_in_its_thread_is_sent_under_the_id_it_gave(
        settings: Settings, worker_factory: Any) -> None:
    """Cancelled while its thread checks the caller id against the stored rows, the submit
    still goes on there and is sent. The caller knows the id it gave, so it can wait for
    it, or send it again (the same text under its id is no conflict)."""
    scoring = settings.replace(model="null")
    worker_factory(scoring)  # the table is there: the caller id is checked against it
    checking, go_on = threading.Event(), threading.Event()

    def hold(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if threading.current_thread().name.startswith("bertstream-async") and not go_on.is_set():
            checking.set()
            go_on.wait(10)

    async def main() -> tuple[dict[str, Any], str]:
        async with AsyncClient(scoring) as client:
            sa.event.listen(client.sync.store.engine, "before_cursor_execute", hold)
            submitting = asyncio.create_task(client.submit("Lovely.", id="mine-1"))
            await asyncio.to_thread(checking.wait, 10)
            submitting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await submitting
            go_on.set()
            first = await client.wait(["mine-1"], timeout=60)
            return first, await client.submit("Lovely.", id="mine-1")

    first, again = _run(main())
    assert first["mine-1"].status == "done" and again == "mine-1"
