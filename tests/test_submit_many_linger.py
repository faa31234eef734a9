"""submit_many on a slow or live generator (a websocket, a tail, one post a second):
a partial chunk is published once its oldest item has waited ``linger_s``, even while
the generator is blocked, as ``bertstream stream`` does for a quiet pipe."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from contract.errors import InvalidInput
from contract.settings import Settings
from producer import AsyncClient, Client
from tests.producer_helpers import broker_settings, lane_messages, until


def _queued(redis_url: str, settings: Settings) -> list[str]:
    return [item["id"] for m in lane_messages(redis_url, f"{settings.queue}.bulk")
            for item in m["items"]]


def _one_then_quiet(release: threading.Event, read_in: list[str]) -> Iterator[dict[str, str]]:
    """One post, then quiet until ``release`` (an hour at most); notes its thread."""
    read_in.append(threading.current_thread().name)
    yield {"text": "the first post", "id": "p-0"}
    release.wait(3600)
    yield {"text": "the second post", "id": "p-1"}


def test_an_item_followed_by_quiet_is_sent_while_the_generator_blocks(
        redis_url: str, sqlite_url: str) -> None:
    """One post, then nothing: it waited for 255 more (an hour of quiet, an hour's
    wait). Sent within about linger_s (default) while the generator is blocked; the
    second post follows, and the report lists both ids in order."""
    settings = broker_settings(redis_url, sqlite_url)
    release, read_in = threading.Event(), []
    reports: list[Any] = []
    with Client(settings) as client:
        caller = threading.Thread(
            target=lambda: reports.append(client.submit_many(_one_then_quiet(release,
                                                                             read_in))))
        caller.start()
        try:
            sent = until(lambda: _queued(redis_url, settings) == ["p-0"], 5)
        finally:
            release.set()
            caller.join(30)
    assert sent, "the first post was not published while the generator was quiet"
    assert reports[0].ids == ["p-0", "p-1"]
    assert _queued(redis_url, settings) == ["p-0", "p-1"]
    assert read_in == [caller.name]  # read in the calling thread, one item when asked for


def test_linger_none_sends_full_chunks_only(redis_url: str, sqlite_url: str) -> None:
    """``linger_s=None`` keeps the old behaviour: the partial chunk waits for the end."""
    settings = broker_settings(redis_url, sqlite_url)
    release, read_in = threading.Event(), []
    with Client(settings) as client:
        caller = threading.Thread(target=lambda: client.submit_many(
            _one_then_quiet(release, read_in), linger_s=None))
        caller.start()
        try:
            time.sleep(1.0)
            early = _queued(redis_url, settings)
        finally:
            release.set()
            caller.join(30)
    assert early == []
    assert len(lane_messages(redis_url, f"{settings.queue}.bulk")) == 1
    assert read_in == [caller.name]


def test_a_slow_generator_is_sent_in_order_across_flushes(redis_url: str,
                                                          sqlite_url: str) -> None:
    """Items a little apart go out as several partial chunks, in order, each id once;
    one the validator refuses keeps its index."""
    settings = broker_settings(redis_url, sqlite_url)

    def slow() -> Iterator[str]:
        for i in range(6):
            yield "" if i == 3 else f"post {i}"
            time.sleep(0.15)

    with Client(settings) as client:
        report = client.submit_many(slow(), linger_s=0.05)
    assert [e.index for e in report.errors] == [3]
    assert _queued(redis_url, settings) == report.ids
    assert len(report.ids) == 5
    assert report.messages >= 2
    assert report.messages == len(lane_messages(redis_url, f"{settings.queue}.bulk"))


def test_items_before_a_failing_quiet_generator_are_sent_then_its_error(
        redis_url: str, sqlite_url: str) -> None:
    """A generator that fails after a partial chunk went out by linger and another item
    was buffered: both are sent, then the error propagates (as without linger)."""
    settings = broker_settings(redis_url, sqlite_url)

    def failing() -> Iterator[dict[str, str]]:
        yield {"text": "a", "id": "a"}
        time.sleep(0.5)  # its chunk goes out meanwhile
        yield {"text": "b", "id": "b"}
        raise ConnectionError("the websocket closed")

    with Client(settings) as client, pytest.raises(ConnectionError, match="websocket"):
        client.submit_many(failing(), linger_s=0.1)
    assert _queued(redis_url, settings) == ["a", "b"]


class _Posts(Sequence[str]):
    """Texts held in memory; notes the thread that reads them."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.read_in: set[str] = set()

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: Any) -> Any:
        self.read_in.add(threading.current_thread().name)
        return self.texts[index]


def test_a_sequence_is_read_in_the_callers_thread(redis_url: str, sqlite_url: str) -> None:
    """Nothing can block reading a list, tuple or other sequence: no reader thread, and
    the chunks are full ones."""
    settings = broker_settings(redis_url, sqlite_url)
    posts = _Posts([f"post {i}" for i in range(5)])
    with Client(settings) as client:
        report = client.submit_many(posts, chunk_size=2, linger_s=0.0)
    assert posts.read_in == {threading.current_thread().name}
    assert [len(m["items"]) for m in lane_messages(redis_url, f"{settings.queue}.bulk")] \
        == [2, 2, 1]
    assert report.accepted == 5


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "0.5", True])
def test_a_bad_linger_is_refused_once_before_anything_is_sent(
        redis_url: str, sqlite_url: str, bad: Any) -> None:
    settings = broker_settings(redis_url, sqlite_url)
    with Client(settings) as client, pytest.raises(InvalidInput, match="linger_s"):
        client.submit_many(iter(["a", "b"]), linger_s=bad)
    assert _queued(redis_url, settings) == []


def test_the_async_client_sends_an_item_of_a_quiet_sync_generator(
        redis_url: str, sqlite_url: str) -> None:
    """AsyncClient.submit_many runs the sync call in a thread: the same guarantee."""
    settings = broker_settings(redis_url, sqlite_url)
    release, read_in = threading.Event(), []

    async def main() -> list[str]:
        async with AsyncClient(settings) as client:
            submitting = asyncio.create_task(
                client.submit_many(_one_then_quiet(release, read_in)))
            try:
                sent = await asyncio.to_thread(
                    until, lambda: _queued(redis_url, settings) == ["p-0"], 5)
            finally:
                release.set()
            assert sent, "the first post was not published while the generator was quiet"
            return (await submitting).ids

    assert asyncio.run(main()) == ["p-0", "p-1"]


def test_the_async_client_reads_an_async_generator_with_linger(
        redis_url: str, sqlite_url: str) -> None:
    """An async generator (a websocket reader) that gives one post, then is quiet: the
    post is sent within about linger_s while its next ``__anext__`` is still awaited,
    and that await is not cancelled for it (the generator reads on, undisturbed)."""
    settings = broker_settings(redis_url, sqlite_url)
    cancelled: list[bool] = []

    async def main() -> list[str]:
        release = asyncio.Event()

        async def socket() -> Any:
            yield {"text": "the first post", "id": "p-0"}
            try:
                await asyncio.wait_for(release.wait(), 3600)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
            yield {"text": "the second post", "id": "p-1"}

        async with AsyncClient(settings) as client:
            submitting = asyncio.create_task(client.submit_many(socket(), linger_s=0.1))
            try:
                sent = await asyncio.to_thread(
                    until, lambda: _queued(redis_url, settings) == ["p-0"], 5)
                await asyncio.sleep(0.5)  # several linger periods pass while it waits
            finally:
                release.set()
            assert sent, "the first post was not published while the generator was quiet"
            return (await submitting).ids

    assert asyncio.run(main()) == ["p-0", "p-1"]
    assert cancelled == []
    assert _queued(redis_url, settings) == ["p-0", "p-1"]


def test_an_async_generator_is_sent_whole_and_in_order_then_its_error(
        redis_url: str, sqlite_url: str) -> None:
    """A fast async generator: every item, in order, in full chunks; one that fails
    after its items: those are sent, then its error propagates."""
    settings = broker_settings(redis_url, sqlite_url)

    async def posts(count: int, fail: bool) -> Any:
        for i in range(count):
            yield {"text": f"post {i}", "id": f"p-{i}"}
        if fail:
            raise ConnectionError("the websocket closed")

    async def main() -> list[str]:
        async with AsyncClient(settings) as client:
            report = await client.submit_many(posts(1000, False), chunk_size=100)
            with pytest.raises(ConnectionError, match="websocket"):
                await client.submit_many(posts(7, True), chunk_size=100)
            return report.ids

    ids = asyncio.run(main())
    assert ids == [f"p-{i}" for i in range(1000)]
    assert _queued(redis_url, settings) == ids + [f"p-{i}" for i in range(7)]


def test_a_cancelled_async_submit_stops_reading_its_async_generator(
        redis_url: str, sqlite_url: str) -> None:
    """Cancelled while its async generator is quiet: the pending read is cancelled (the
    call's thread does not wait for an item for ever); the post read before is sent."""
    settings = broker_settings(redis_url, sqlite_url)
    ended: list[str] = []

    async def main() -> None:
        async def socket() -> Any:
            yield {"text": "the first post", "id": "p-0"}
            try:
                await asyncio.sleep(3600)
            finally:
                ended.append("closed")
            yield {"text": "never", "id": "p-1"}

        async with AsyncClient(settings) as client:
            submitting = asyncio.create_task(client.submit_many(socket(), linger_s=0.1))
            await asyncio.to_thread(until, lambda: _queued(redis_url, settings) == ["p-0"], 5)
            submitting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await submitting
            await asyncio.sleep(0.2)
            # the client's threads are free: another call runs
            assert (await client.submit_many(["after"], chunk_size=1)).accepted == 1

    asyncio.run(main())
    assert ended == ["closed"]
    assert _queued(redis_url, settings)[0] == "p-0"


def test_a_due_chunk_that_cannot_be_sent_fails_the_call(redis_url: str,
                                                         sqlite_url: str) -> None:
    """close() while an item waits and the generator is quiet: the due chunk's publish
    fails (ClientClosed) in the linger thread, and the call raises it at the next item,
    not later and not never; no linger thread is left behind."""
    settings = broker_settings(redis_url, sqlite_url)
    release, read_in = threading.Event(), []
    raised: list[BaseException] = []
    client = Client(settings)

    def call() -> None:
        try:
            client.submit_many(_one_then_quiet(release, read_in), linger_s=0.5)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.1)
    client.close()
    time.sleep(1.0)  # the item is due: its publish fails
    release.set()
    caller.join(30)
    assert [type(e).__name__ for e in raised] == ["ClientClosed"]
    assert _queued(redis_url, settings) == []
    assert not [t for t in threading.enumerate() if t.name == "bertstream-linger"]
