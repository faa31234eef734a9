"""AsyncClient.submit_many over a blocking source, cancelled, then aclose() at once.

A gateway feeds queues and websockets into submit_many; a handler's end cancels its
call, and shutdown calls aclose() right after. The items the call took from its source
before the cancel are sent, not lost under the closing client: aclose() lets those sends
end (bounded by its timeout); without linger they go out at the stop, not after a next
item that a quiet queue never gives. What cannot be sent is logged with its count.
Messages are counted in the real Redis queue list.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.faults import RedisServer
from contract.results import ResultStore
from contract.settings import Settings
from producer import AsyncClient, ClientClosed
from tests.producer_helpers import broker_settings, lane_messages, until
from worker.process import free_port

ROOT = Path(__file__).resolve().parent.parent

#: A gateway process: a queue-fed call, three posts taken, the handler's task cancelled,
#: aclose() at once, then the process exits (its daemon threads with it).
GATEWAY = textwrap.dedent("""
    import asyncio, json, queue, sys
    from contract.settings import Settings
    from producer import AsyncClient

    broker, database, name, linger = sys.argv[1:5]

    async def main() -> None:
        client = AsyncClient(Settings(broker_url=broker, database_url=database, queue=name))
        posts = queue.Queue()

        def source():
            while True:
                yield posts.get()

        task = asyncio.create_task(client.submit_many(
            source(), chunk_size=100, linger_s=None if linger == "none" else float(linger)))
        for i in range(3):
            posts.put(f"post {i}")
        while not posts.empty():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the last one taken and buffered, not yet lingered out
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        await client.aclose()
        print(json.dumps({"left_in_source": posts.qsize()}), flush=True)

    asyncio.run(main())
""")


def _queued(redis_url: str, settings: Settings) -> list[str]:
    """The texts of the items waiting in the settings' bulk lane, oldest first."""
    return [it["text"] for m in lane_messages(redis_url, f"{settings.queue}.bulk")
            for it in m["items"]]


@pytest.fixture
def settings(redis_url: str, sqlite_url: str, sqlite_store: ResultStore) -> Settings:
    """Settings on the test Redis (a queue of their own) and a SQLite store."""
    return broker_settings(redis_url, sqlite_url)


def _posts(source: queue.Queue[str | None]) -> Iterator[str]:
    """A websocket reader's shape: blocks on the queue until None (the test's end)."""
    while (post := source.get()) is not None:
        yield post


@pytest.fixture
def posts() -> Iterator[queue.Queue[str | None]]:
    """The queue a test's source reads; at the end its blocked read is let go (None) and
    its thread ends, so that no later test sees it."""
    source: queue.Queue[str | None] = queue.Queue()
    yield source
    source.put(None)
    assert until(lambda: not any(t.name.startswith("bertstream-source")
                                 for t in threading.enumerate()), 30), "a source thread stayed"


async def _taken(source: queue.Queue[str | None]) -> None:
    """Wait until the call's thread took every post (and buffered the last)."""
    while not source.empty():
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)


async def _cancelled(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("linger", ["0.25", "none"])
def test_a_gateway_shut_down_after_a_cancel_sends_the_posts_it_took(
        settings: Settings, redis_url: str, tmp_path: Path, linger: str) -> None:
    """The real shape: a gateway process cancels its queue-fed call, awaits aclose() at
    once and exits. The three posts its thread took from the queue are in the broker's
    queue list (they were lost: closed under the linger, or waiting for a fourth post)."""
    script = tmp_path / "gateway.py"
    script.write_text(GATEWAY)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script), redis_url, settings.database_url, settings.queue, linger],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"left_in_source": 0}
    assert _queued(redis_url, settings) == ["post 0", "post 1", "post 2"], done.stderr


def test_a_cancelled_call_without_linger_sends_its_buffer_at_once(
        settings: Settings, redis_url: str, posts: queue.Queue[str | None]) -> None:
    """linger_s=None: the posts buffered before the cancel go out at the stop, while the
    queue stays quiet and the call's thread still waits in its get (no aclose)."""
    source = posts

    async def main() -> bool:
        async with AsyncClient(settings) as client:
            task = await _three_posts_taken(client, source, None)
            await _cancelled(task)
            return await asyncio.to_thread(
                until, lambda: len(_queued(redis_url, settings)) == 3, 10)

    assert _run(main()), _queued(redis_url, settings)
    assert _queued(redis_url, settings) == ["post 0", "post 1", "post 2"]


async def _async_posts(source: asyncio.Queue[str]) -> AsyncIterator[str]:
    while True:
        yield await source.get()


def test_an_async_source_cancelled_then_closed_at_once_sends_what_it_gave(
        settings: Settings, redis_url: str) -> None:
    """An async iterable (a websocket): the items it gave before the cancel are sent
    though aclose() follows at once."""

    async def main() -> None:
        source: asyncio.Queue[str] = asyncio.Queue()
        client = AsyncClient(settings)
        task = asyncio.create_task(
            client.submit_many(_async_posts(source), chunk_size=100, linger_s=5.0))
        for i in range(3):
            source.put_nowait(f"post {i}")
        while not source.empty():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        await _cancelled(task)
        await client.aclose()

    _run(main())
    assert _queued(redis_url, settings) == ["post 0", "post 1", "post 2"]


def test_aclose_does_not_wait_for_a_blocked_read_and_logs_the_post_it_gives_after(
        settings: Settings, redis_url: str, caplog: pytest.LogCaptureFixture,
        posts: queue.Queue[str | None]) -> None:
    """A call whose thread waits in the queue's get, nothing buffered: aclose() (with a
    long timeout) does not wait for it. The post that get returns after the close was
    taken from the queue and cannot be sent: it is logged with its count, not dropped
    silently."""
    source = posts
    caplog.set_level(logging.WARNING, logger="producer.aclient")

    async def main() -> None:
        client = AsyncClient(settings)
        task = asyncio.create_task(client.submit_many(_posts(source), chunk_size=100))
        source.put("before")
        await asyncio.to_thread(until, lambda: len(_queued(redis_url, settings)) == 1, 10)
        await _cancelled(task)
        await asyncio.wait_for(client.aclose(timeout=600), 60)
        source.put("after")

    _run(main())
    assert until(lambda: "1 item(s)" in caplog.text, 10), caplog.text
    assert source.empty()  # taken by the abandoned thread
    assert _queued(redis_url, settings) == ["before"]
    assert "not sent" in caplog.text and "closed" in caplog.text, caplog.text


async def _three_posts_taken(client: AsyncClient, source: queue.Queue[str | None],
                             linger_s: float | None) -> asyncio.Task[Any]:
    """A submit_many call of ``client`` reading ``source``, once it took 3 posts."""
    task = asyncio.create_task(
        client.submit_many(_posts(source), chunk_size=100, linger_s=linger_s))
    for i in range(3):
        source.put(f"post {i}")
    await _taken(source)
    return task


async def _closed_under_three_posts(sqlite_url: str,
                                    source: queue.Queue[str | None]) -> AsyncClient:
    """A client with Redis absent whose submit_many took 3 posts, then was cancelled,
    and which aclose() closed after 0.2 s under the call's send that cannot end."""
    settings = Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0",
                        database_url=sqlite_url, publish_retries=3)
    client = AsyncClient(settings)
    task = await _three_posts_taken(client, source, None)
    await _cancelled(task)
    await asyncio.wait_for(client.aclose(timeout=0.2), 60)
    return client


def test_aclose_under_a_send_that_cannot_end_gives_up_after_its_timeout_and_logs(
        sqlite_url: str, caplog: pytest.LogCaptureFixture,
        posts: queue.Queue[str | None]) -> None:
    """Redis absent: the stopped call's send retries past aclose()'s timeout. aclose()
    closes the client then, and the items it holds are logged with their count."""
    caplog.set_level(logging.WARNING, logger="producer.aclient")
    _run(_closed_under_three_posts(sqlite_url, posts))
    assert "1 submit_many call(s) still sending" in caplog.text, caplog.text
    assert "3 item(s)" in caplog.text, caplog.text
    assert until(lambda: "were not sent" in caplog.text, 30), caplog.text


def test_a_second_aclose_does_not_wait_again_for_calls_the_first_closed_under(
        sqlite_url: str, caplog: pytest.LogCaptureFixture,
        posts: queue.Queue[str | None]) -> None:
    """aclose() gave up on a call's send (Redis absent) and closed the client under it:
    nothing that call holds can be sent any more. A later aclose() (an ``async with``
    exit after an explicit aclose()) returns at once: it waited its whole timeout again
    for a call that sends nothing, and logged the same items once more."""
    caplog.set_level(logging.WARNING, logger="producer.aclient")

    async def main() -> None:
        client = await _closed_under_three_posts(sqlite_url, posts)
        caplog.clear()
        await asyncio.wait_for(client.aclose(timeout=600), 30)

    _run(main())
    assert "still sending" not in caplog.text, caplog.text


def test_a_cancelled_call_whose_linger_send_failed_logs_its_posts_at_once(
        sqlite_url: str, caplog: pytest.LogCaptureFixture,
        posts: queue.Queue[str | None]) -> None:
    """Redis absent: the linger's send of the buffered posts failed before the cancel.
    The cancel logs those posts as not sent at once (nothing was logged while the queue
    stayed quiet), and aclose() does not wait for a send no one makes (it waited its
    whole timeout, logging the call as still sending)."""
    settings = Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0",
                        database_url=sqlite_url, publish_retries=1)
    source = posts
    caplog.set_level(logging.WARNING, logger="producer.aclient")

    def lingering() -> bool:
        return any(t.name == "bertstream-linger" for t in threading.enumerate())

    async def main() -> None:
        client = AsyncClient(settings)
        task = await _three_posts_taken(client, source, 0.05)
        # the linger thread's send failed: it ended, leaving the posts buffered
        assert await asyncio.to_thread(until, lambda: not lingering(), 30)
        await _cancelled(task)
        assert await asyncio.to_thread(until, lambda: "were not sent" in caplog.text, 10), \
            caplog.text
        await asyncio.wait_for(client.aclose(timeout=600), 30)

    _run(main())
    assert "3 item(s)" in caplog.text, caplog.text
    assert "still sending" not in caplog.text, caplog.text


def test_posts_logged_as_not_sent_then_sent_after_all_are_logged_as_sent(
        sqlite_url: str, caplog: pytest.LogCaptureFixture, redis_server: RedisServer,
        posts: queue.Queue[str | None]) -> None:
    """Redis down at the cancel: the stop's send fails and the three posts are logged as
    not sent. Redis is back when the queue gives a fourth post: the call's thread sends
    all four. The log says the three were sent after all (it left them as lost, and a
    gateway replaying what the log calls lost would queue them twice)."""
    settings = Settings(broker_url=redis_server.url, database_url=sqlite_url,
                        queue="blip", publish_retries=1)
    source = posts
    caplog.set_level(logging.WARNING, logger="producer.aclient")

    async def main() -> None:
        client = AsyncClient(settings)
        task = await _three_posts_taken(client, source, None)
        redis_server.stop()
        await _cancelled(task)
        assert await asyncio.to_thread(until, lambda: "were not sent" in caplog.text, 30), \
            caplog.text
        await asyncio.to_thread(redis_server.start)
        source.put("post 3")
        assert await asyncio.to_thread(
            until, lambda: len(_queued(redis_server.url, settings)) == 4, 30)
        await client.aclose()

    _run(main())
    assert _queued(redis_server.url, settings) == ["post 0", "post 1", "post 2", "post 3"]
    assert until(lambda: "the 3 item(s) of a stopped submit_many call logged as not sent "
                         "were sent after all" in caplog.text, 10), caplog.text


@pytest.mark.parametrize("timeout", [-1, float("nan"), "5", None])
def test_aclose_refuses_a_timeout_no_wait_can_take(settings: Settings, timeout: Any) -> None:
    """A timeout that is not a number of seconds (0 or more) is refused, the client
    left open; a right one closes it."""

    async def main() -> None:
        client = AsyncClient(settings)
        with pytest.raises(Exception, match="timeout must be a number of seconds"):
            await client.aclose(timeout=timeout)
        assert await client.queue_length() == 0
        await client.aclose(timeout=0)
        with pytest.raises(ClientClosed):
            await client.queue_length()

    _run(main())


def _run(main: Any) -> Any:
    return asyncio.run(main)
