"""A stream reader's program on the Python client and the CLI: what a failing source
leaves sent, and what a long backpressure wait writes to a log."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.settings import Settings
from producer import AsyncClient, Client
from tests.producer_helpers import broker_settings, lane_messages

ROOT = Path(__file__).resolve().parents[1]


class SourceBroke(RuntimeError):
    """What a stream reader's own source raises (a cursor, a consumer)."""


def _items(count: int) -> Iterator[dict[str, Any]]:
    """``count`` items with caller ids, then the source fails."""
    for i in range(count):
        yield {"text": f"post {i}", "id": f"post-{i}"}
    raise SourceBroke("the source failed")


def _queued_ids(redis_url: str, settings: Settings) -> list[str]:
    return [item["id"] for m in lane_messages(redis_url, f"{settings.queue}.bulk")
            for item in m["items"]]


def test_submit_many_sends_every_item_given_before_its_iterable_fails(
        redis_url: str, sqlite_url: str) -> None:
    """A generator that raises after 300 items: the 256 of the first full chunk were
    sent and the 44 buffered after them dropped, so the caller, given no report, could
    not tell which items to send again. Every item before the failure is sent (as a
    ``bertstream stream`` sends the lines read before its source fails), then the
    source's error propagates: the caller resumes after the last item it gave."""
    settings = broker_settings(redis_url, sqlite_url)
    with Client(settings) as client, pytest.raises(SourceBroke):
        client.submit_many(_items(300), chunk_size=256)
    assert _queued_ids(redis_url, settings) == [f"post-{i}" for i in range(300)]


def test_async_submit_many_sends_every_item_given_before_its_iterable_fails(
        redis_url: str, sqlite_url: str) -> None:
    """The same through :class:`AsyncClient`, which runs ``submit_many`` in a thread."""
    settings = broker_settings(redis_url, sqlite_url)

    async def main() -> None:
        async with AsyncClient(settings) as client:
            with pytest.raises(SourceBroke):
                await client.submit_many(_items(10), chunk_size=4)

    asyncio.run(main())
    assert _queued_ids(redis_url, settings) == [f"post-{i}" for i in range(10)]


def test_a_stream_held_back_chunk_after_chunk_logs_its_pause_once(
        redis_url: str, sqlite_url: str, tmp_path: Path) -> None:
    """A reader faster than its workers (the usual case for a stream reader) pauses on the
    full queue before nearly every chunk; with stderr a log file each pause wrote its
    own ``queue full`` line, so the log grew by lines a second for as long as the
    backlog lasted. One line says it, then at most one a minute while it goes on."""
    queue = f"bst-18d-{uuid.uuid4().hex[:8]}"
    bulk = f"{queue}.bulk"
    source = tmp_path / "posts.txt"
    source.write_text("".join(f"post {i}\n" for i in range(200)))
    r = redis.Redis.from_url(redis_url)
    r.lpush(bulk, *[f"backlog-{i}" for i in range(4)])  # full before the first chunk
    stop = threading.Event()

    def drain() -> None:  # a worker taking one message at a time
        while not stop.wait(0.02):
            r.rpop(bulk)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    env = {**os.environ, "BERTSTREAM_BROKER_URL": redis_url,
           "BERTSTREAM_DATABASE_URL": sqlite_url, "BERTSTREAM_QUEUE": queue,
           "PYTHONPATH": str(ROOT)}
    log = tmp_path / "stream.log"
    try:
        with open(log, "wb") as err:
            done = subprocess.run(
                [sys.executable, "-c", "from producer.cli import main; main()", "stream",
                 str(source), "--chunk-size", "5", "--max-queue", "2"],
                stdout=subprocess.PIPE, stderr=err, env=env, cwd=tmp_path, timeout=120)
    finally:
        stop.set()
        drainer.join(timeout=5)
        r.close()
    logged = log.read_text()
    assert done.returncode == 0, logged
    assert "accepted 200" in done.stdout.decode()
    assert logged.count("queue full") == 1, logged
