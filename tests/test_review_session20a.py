"""Review of the stream's :class:`producer.stream.QueueWatch` and the worker's stop check.

The watch key alone can go while the queue stays: Redis evicts it (a ``maxmemory-policy``
such as ``volatile-lru``, the default of managed Redis services, evicts keys with a TTL
first, and the key is the least recently used one while backpressure pauses the stream),
or it expires (a source quiet for longer than its TTL: a Redis Stream read for weeks).
The stream then stopped with "lost the queue", exit 3, and a resume line that sends
every text again, though Redis had lost nothing. A restart or a flush is still told.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.faults import RedisServer
from contract.broker import lane_queue
from contract.constants import STATUS_DONE
from contract.results import ResultStore
from contract.settings import Settings
from producer.client import Client
from producer.sources import SourceRecord
from producer.stream import QueueLost, stream
from tests.polling import until
from tests.tcpproxy import TcpProxy, proxied_pg

stream_module = sys.modules["producer.stream"]


def _records(n: int, at: int, event: Callable[[], None]) -> Iterator[SourceRecord]:
    """Lines 1..n; ``event`` runs before line ``at`` is read."""
    for line in range(1, n + 1):
        if line == at:
            event()
        yield SourceRecord(line, {"text": f"text number {line}"})


def _client(server: RedisServer, sqlite_url: str) -> Client:
    return Client(Settings(broker_url=server.url, database_url=sqlite_url))


def _evict_volatile_keys(url: str) -> Callable[[], None]:
    """Memory pressure on a ``volatile-lru`` Redis: another application's cache key (with a
    TTL) written, the limit lowered below what is used without both keys with a TTL, one
    write evicting them, the limit raised again (the pressure passed). The queue (no TTL)
    is not a candidate."""
    def evict() -> None:
        r = redis.Redis.from_url(url)
        r.set("other:cache", b"x" * 1_000_000, ex=3600)
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory", str(used - 1_200_000))
        try:
            r.set("other:probe", b"y")  # the write that evicts
        except redis.ResponseError:
            pass  # out of memory still: every key with a TTL is gone
        r.config_set("maxmemory", "0")
        assert r.exists(*r.keys("bertstream:stream:*") or ["none"]) == 0, "no key evicted"
        assert r.llen("bertstream.bulk") == 2  # the queue is intact
        r.close()
    return evict


def test_an_evicted_watch_key_is_no_lost_queue(redis_server: RedisServer,
                                               sqlite_url: str) -> None:
    redis.Redis.from_url(redis_server.url).config_set("maxmemory-policy", "volatile-lru")
    with _client(redis_server, sqlite_url) as client:
        report = stream(client, _records(50, 25, _evict_volatile_keys(redis_server.url)),
                        chunk_size=10, linger_s=None, progress=False)
        assert report.accepted == 50
        assert client.queue_length() == 5


def test_a_watch_key_expired_during_a_quiet_source_is_no_lost_queue(
        redis_server: RedisServer, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_module, "WATCH_TTL_S", 1)  # a quiet spell past the TTL
    with _client(redis_server, sqlite_url) as client:
        report = stream(client, _records(30, 15, lambda: time.sleep(2.5)),
                        chunk_size=10, linger_s=None, progress=False)
        assert report.accepted == 30
        assert client.queue_length() == 3


def test_a_flush_after_an_eviction_is_still_a_lost_queue(redis_server: RedisServer,
                                                         sqlite_url: str) -> None:
    """Evictions forgiven once do not hide a later loss."""
    redis.Redis.from_url(redis_server.url).config_set("maxmemory-policy", "volatile-lru")
    evict = _evict_volatile_keys(redis_server.url)

    def events() -> Iterator[SourceRecord]:
        for line in range(1, 61):
            if line == 25:
                evict()
            elif line == 45:
                redis.Redis.from_url(redis_server.url).flushall()
            yield SourceRecord(line, {"text": f"text number {line}"})

    with _client(redis_server, sqlite_url) as client:
        with pytest.raises(QueueLost) as caught:
            stream(client, events(), chunk_size=10, linger_s=None, progress=False)
        assert caught.value.resume_line == 1
        assert caught.value.sent == 40


# --- the worker's stop check -------------------------------------------------------------

@pytest.fixture
def proxy(pg_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A proxy in front of the test PostgreSQL, and the database URL through it."""
    p, url = proxied_pg(pg_url)
    try:
        yield p, url
    finally:
        p.close()


@pytest.mark.slow
def test_a_cold_shutdown_does_not_wait_out_the_commit_retries_either(
        redis_url: str, tiny_model_dir: Any, pg_url: str, proxy: tuple[TcpProxy, str],
        worker_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery's ``REMAP_SIGTERM=SIGQUIT`` (SIGTERM as a cold shutdown, as on platforms that
    kill soon after it) and SIGQUIT set ``should_terminate``, not ``should_stop``: the
    stop check missed them, and the shutdown waited out the commit's five attempts."""
    monkeypatch.setenv("REMAP_SIGTERM", "SIGQUIT")
    tcp, url = proxy
    s = Settings(broker_url=redis_url, database_url=url, queue=f"bst-cold-{uuid.uuid4().hex[:8]}",
                 cache_dir=str(tmp_path / "cache"), model=str(tiny_model_dir),
                 bulk_chunk_size=10, db_connect_timeout_s=2, db_statement_timeout_s=2)
    worker = worker_factory(s)
    r = redis.Redis.from_url(s.broker_url)
    store = ResultStore.from_url(pg_url)
    try:
        with Client(s) as client:
            ids = client.submit_many([f"before the outage {i}" for i in range(40)]).ids
            until(lambda: store.count() == 40, 60, "the first texts stored")
            mark = worker.log_size()
            tcp.freeze()
            ids += client.submit_many([f"during the outage {i}" for i in range(40)]).ids
            until(lambda: "commit failed (attempt 1/5)" in worker.log_since(mark), 60,
                  "the worker retrying its commit")
            code = worker.stop(timeout=120)
            after = worker.log_since(mark)
            queued, unacked = r.llen(lane_queue(s, bulk=True)), r.hlen("unacked")
            tcp.thaw()
            worker_factory(s)
            rows = client.wait(ids, timeout=60)
    finally:
        store.close()
        r.close()
    assert "commit failed (attempt 3/5)" not in after, after[-3000:]
    assert "not retrying" in after, after[-3000:]
    assert code == 0, after[-3000:]
    assert queued == 4 and unacked == 0, (queued, unacked)
    assert all(row.status == STATUS_DONE and row.attempts == 1 for row in rows.values())
