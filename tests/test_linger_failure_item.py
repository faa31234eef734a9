"""An item read while the linger thread's send fails is kept, not dropped.

submit_many reads its source in the caller's thread while a linger thread sends a
partial chunk once due. When that send fails (Redis stopped) the caller's read is
under way: the item it gives has left the source (a queue's post). It was dropped
there, before it was buffered: a stopped AsyncClient call logged the posts it took and
did not send without it, so a gateway replaying what the log calls lost lost that one.
Now it is kept with the unsent items (counted, not sent), and no further item is read.
A private redis-server is stopped mid-stream; messages are counted in its queue list.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from bench.faults import RedisServer
from contract.errors import BrokerUnavailable
from contract.settings import Settings
from producer import AsyncClient, Client
from producer.aclient import _AsyncItems
from tests.producer_helpers import lane_messages, until

LINGER_S = 0.05


def _settings(server: RedisServer, sqlite_url: str) -> Settings:
    return Settings(broker_url=server.url, database_url=sqlite_url, queue="lingerfail",
                    publish_retries=1)


def _queued(server: RedisServer, settings: Settings) -> list[str]:
    """The texts waiting in the settings' bulk lane, oldest first."""
    return [it["text"] for m in lane_messages(server.url, f"{settings.queue}.bulk")
            for it in m["items"]]


def _lingering() -> bool:
    return any(t.name == "bertstream-linger" for t in threading.enumerate())


def _not_sent(text: str) -> int:
    """How many items the "not sent" warnings count, all together."""
    return sum(int(n) for n in re.findall(r"took (\d+) item\(s\) from its source that were "
                                          r"not sent", text))


class _Posts:
    """A queue-fed source (a websocket reader's shape) that notes what it took."""

    def __init__(self) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.taken: list[str] = []

    def __iter__(self) -> Iterator[str]:
        while (post := self.queue.get()) is not None:
            self.taken.append(post)
            yield post


@pytest.fixture
def posts() -> Iterator[_Posts]:
    source = _Posts()
    yield source
    source.queue.put(None)  # a read still blocked ends
    assert until(lambda: not any(t.name.startswith("bertstream-source")
                                 for t in threading.enumerate()), 30), "a source thread stayed"


def _fed_until_the_linger_send_failed(server: RedisServer, settings: Settings,
                                      posts: _Posts) -> None:
    """Two posts lingered out (queued), Redis stopped, two more taken, and the linger
    thread's send of those two failed (it ended); the caller's read waits."""
    posts.queue.put("post 0")
    posts.queue.put("post 1")
    assert until(lambda: len(_queued(server, settings)) == 2, 30)
    server.stop()
    posts.queue.put("post 2")
    posts.queue.put("post 3")
    assert until(lambda: len(posts.taken) == 4, 30)
    assert until(lambda: not _lingering(), 30), "the linger thread's send did not fail"


def test_a_stopped_call_logs_the_post_its_read_gave_after_the_linger_send_failed(
        sqlite_url: str, redis_server: RedisServer, caplog: pytest.LogCaptureFixture,
        posts: _Posts) -> None:
    """A gateway's queue-fed call: the linger's send failed, the call is cancelled, and the
    read under way gives one more post. Every post taken and not queued is logged as not
    sent (the fifth was taken from the queue, not queued and not counted)."""
    settings = _settings(redis_server, sqlite_url)
    caplog.set_level(logging.WARNING, logger="producer.aclient")

    async def main() -> None:
        client = AsyncClient(settings)
        task = asyncio.create_task(client.submit_many(posts, chunk_size=100,
                                                      linger_s=LINGER_S))
        await asyncio.to_thread(_fed_until_the_linger_send_failed, redis_server, settings,
                                posts)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        posts.queue.put("post 4")  # the blocked read takes it after the stop
        assert await asyncio.to_thread(until, lambda: len(posts.taken) == 5, 30)
        assert await asyncio.to_thread(
            until, lambda: _not_sent(caplog.text) == 3, 30), caplog.text
        await asyncio.wait_for(client.aclose(timeout=30), 60)

    asyncio.run(main())
    redis_server.start()
    assert _queued(redis_server, settings) == ["post 0", "post 1"]
    assert posts.taken == ["post 0", "post 1", "post 2", "post 3", "post 4"]
    # posts 2 to 4: taken, not queued, and each one counted as not sent
    assert _not_sent(caplog.text) == 3, caplog.text


def _async_iterable_after_the_failure(server: RedisServer, settings: Settings,
                                      after: int, late: str | None = None
                                      ) -> tuple[list[str], int, int]:
    """An async iterable of queue posts through ``submit_many``: two posts lingered out,
    Redis stopped, two more taken and their linger send failed; then ``after`` more posts
    at once (``late``, if given, is taken but handed over a few loop steps later: not in
    the run). The posts taken, the call's ``sent``, and the taken, unsent items counted."""
    taken: list[str] = []
    out: list[int] = []

    async def main() -> None:
        inbox: asyncio.Queue[str] = asyncio.Queue()

        async def source() -> AsyncIterator[str]:
            while True:
                post = await inbox.get()
                taken.append(post)
                if post == late:
                    for _ in range(3):
                        await asyncio.sleep(0)
                yield post

        items = _AsyncItems(source(), asyncio.get_running_loop())
        with Client(settings) as client:
            call = asyncio.create_task(asyncio.to_thread(
                client.submit_many, items, chunk_size=100, linger_s=LINGER_S))
            for i in range(2):
                inbox.put_nowait(f"post {i}")
            assert await asyncio.to_thread(
                until, lambda: len(_queued(server, settings)) == 2, 30)
            await asyncio.to_thread(server.stop)
            for i in range(2, 4):
                inbox.put_nowait(f"post {i}")
            assert await asyncio.to_thread(until, lambda: len(taken) == 4, 30)
            assert await asyncio.to_thread(until, lambda: not _lingering(), 30)
            for i in range(4, 4 + after):
                inbox.put_nowait(f"post {i}")
            with pytest.raises(BrokerUnavailable) as failed:
                await asyncio.wait_for(call, 30)
            items.stop()  # as a stopped AsyncClient call does
            await asyncio.sleep(0.1)
        out.extend((failed.value.sent or 0, items.pending()))

    asyncio.run(main())
    return taken, out[0], out[1]


def test_an_async_iterable_s_run_read_after_the_linger_send_failed_stays_counted(
        sqlite_url: str, redis_server: RedisServer) -> None:
    """An async iterable hands its items over in runs (those ready at once): a run read
    while the linger's send failed was taken from the source in full; every item of it is
    kept with the unsent ones (the call's count of taken, unsent items), none dropped."""
    taken, sent, pending = _async_iterable_after_the_failure(
        redis_server, _settings(redis_server, sqlite_url), after=3)  # one run of three
    assert (len(taken), sent) == (7, 2)
    assert pending == 5  # posts 2 to 6: taken from the source, not sent, all counted


def test_a_sync_call_reports_what_was_sent_and_reads_no_more_after_the_failure(
        sqlite_url: str, redis_server: RedisServer, posts: _Posts) -> None:
    """Client.submit_many: ``sent`` is the number of leading items queued (a replay from
    it sends the post its read gave after the failure again, and none twice), and once
    the linger's send failed no further post is read: it stays in the queue."""
    settings = _settings(redis_server, sqlite_url)
    failure: list[BaseException] = []

    def call() -> None:
        with Client(settings) as client:
            try:
                client.submit_many(posts, chunk_size=100, linger_s=LINGER_S)
            except BaseException as exc:  # noqa: BLE001 - checked below
                failure.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    _fed_until_the_linger_send_failed(redis_server, settings, posts)
    posts.queue.put("post 4")
    posts.queue.put("post 5")
    thread.join(30)
    assert not thread.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], BrokerUnavailable), failure
    error: Any = failure[0]
    redis_server.start()
    queued = _queued(redis_server, settings)
    assert queued == ["post 0", "post 1"]
    assert error.sent == len(queued)
    assert posts.taken == ["post 0", "post 1", "post 2", "post 3", "post 4"]
    assert posts.queue.get_nowait() == "post 5"


def test_the_item_the_read_in_flight_took_after_the_failure_is_kept_too(
        sqlite_url: str, redis_server: RedisServer) -> None:
    """A run leaves a read of the async iterable in flight (asking for the next item, so
    the source reads on between runs). Once the linger's send failed no run is read any
    more: an item that read took before the call ended (one that was not ready at once,
    so not in the run) is kept with the unsent ones too, not taken from the source and
    dropped (it was in no count)."""
    taken, sent, pending = _async_iterable_after_the_failure(
        redis_server, _settings(redis_server, sqlite_url), after=4, late="post 7")
    assert taken == [f"post {i}" for i in range(8)] and sent == 2
    assert pending == 6  # posts 2 to 7: taken from the source, not sent, all counted
