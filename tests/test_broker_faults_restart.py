"""A stream whose Redis restarts mid-run, on a private redis-server restarted for real.

Restarted without its data (no persistence; here its files removed), Redis came back
with an empty queue: the stream rode the restart out, printed every text as accepted and
exited 0, though the texts it had queued were gone; a Redis Stream reader exited 2 on
its vanished group, without saying how many texts it had sent. Now the stream stops with
:class:`producer.stream.QueueLost` (exit 3), the count sent and the line to resume from, and sends
nothing more into the emptied queue. A restart that keeps the data (AOF) is ridden out.

The watch key alone can go while the queue stays: Redis evicts it (a ``maxmemory-policy``
such as ``volatile-lru``, the default of managed Redis services, evicts keys with a TTL
first, and the key is the least recently used one while backpressure pauses the stream),
or it expires (a source quiet for longer than its TTL: a Redis Stream read for weeks).
The stream then stopped with "lost the queue", exit 3, and a resume line that sends
every text again, though Redis had lost nothing. A restart or a flush is still told.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from bench.faults import RedisServer
from contract.errors import BrokerUnavailable
from contract.settings import Settings
from producer.client import Client
from producer.sources import SourceRecord
from producer.stream import QueueLost, stream
from tests.polling import until
from worker.process import free_port

ROOT = Path(__file__).resolve().parent.parent
stream_module = sys.modules["producer.stream"]


def _records(n: int, at: int, event: Callable[[], None]) -> Iterator[SourceRecord]:
    """Lines 1..n; ``event`` (a restart, an eviction, a quiet spell) runs before line
    ``at`` is read."""
    for line in range(1, n + 1):
        if line == at:
            event()
        yield SourceRecord(line, {"text": f"text number {line}"})


def _client(server: RedisServer, sqlite_url: str) -> Client:
    return Client(Settings(broker_url=server.url, database_url=sqlite_url))


def _restart(server: RedisServer, *, lose_data: bool) -> Callable[[], None]:
    def restart() -> None:
        server.stop(lose_data=lose_data)
        server.start()
    return restart


def test_redis_back_without_its_data_stops_the_stream_at_the_first_lost_line(
        redis_server: RedisServer, sqlite_url: str) -> None:
    with _client(redis_server, sqlite_url) as client:
        with pytest.raises(BrokerUnavailable) as caught:
            stream(client, _records(50, 25, _restart(redis_server, lose_data=True)),
                   chunk_size=10, linger_s=None, progress=False)
        assert caught.value.sent == 20
        assert caught.value.resume_line == 1  # Redis kept none of them
        assert "lost the queue" in str(caught.value)
        assert client.queue_length() == 0  # nothing more sent into the emptied queue


def test_redis_back_with_its_data_is_ridden_out(redis_server: RedisServer,
                                                sqlite_url: str) -> None:
    with _client(redis_server, sqlite_url) as client:
        report = stream(client, _records(50, 25, _restart(redis_server, lose_data=False)),
                        chunk_size=10, linger_s=None, progress=False)
        assert report.accepted == 50
        assert client.queue_length() == 5
        # the key the stream watched Redis with is gone with the run
        assert redis.Redis.from_url(redis_server.url).keys("bertstream:stream:*") == []


def _cli(server: RedisServer, sqlite_url: str, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTSTREAM_")}
    env.update(BERTSTREAM_BROKER_URL=server.url, BERTSTREAM_DATABASE_URL=sqlite_url)
    return subprocess.Popen(
        [sys.executable, "-c", "from producer.cli import main; main()", "stream",
         "--chunk-size", "10", "--no-progress", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, cwd=ROOT)


def _queued(server: RedisServer, messages: int) -> Callable[[], bool]:
    r = redis.Redis.from_url(server.url)
    return lambda: int(r.llen("bertstream.bulk")) >= messages


def test_cli_stream_from_a_pipe_says_what_redis_lost_and_exits_3(
        redis_server: RedisServer, sqlite_url: str) -> None:
    proc = _cli(redis_server, sqlite_url, "-")
    assert proc.stdin is not None
    try:
        proc.stdin.write("".join(f"text number {i}\n" for i in range(1, 31)))
        proc.stdin.flush()
        until(_queued(redis_server, 3), 60, "the first 30 lines queued")
        redis_server.stop(lose_data=True)
        redis_server.start()
        out, err = proc.communicate("".join(f"text number {i}\n" for i in range(31, 51)),
                                    timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 3, (out, err)
    assert "lost the queue this stream filled" in err
    assert "resume from line 1" in err
    assert "accepted 50" not in out


def test_cli_redis_stream_reader_says_what_was_sent_when_redis_lost_its_data(
        redis_server: RedisServer, sqlite_url: str) -> None:
    r = redis.Redis.from_url(redis_server.url)
    for i in range(1, 31):
        r.xadd("posts", {"text": f"text number {i}"})
    proc = _cli(redis_server, sqlite_url, "--from-redis-stream", "posts", "--group", "g",
                "--idle-exit", "60")
    try:
        until(_queued(redis_server, 3), 60, "the 30 entries queued")
        redis_server.stop(lose_data=True)
        redis_server.start()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 3, (out, err)
    assert "lost the queue this stream filled" in err
    assert "30 item(s) were sent" in err
    assert "went with it" in err


def test_redis_back_from_an_older_snapshot_resumes_after_what_it_kept(
        tmp_path: Path, sqlite_url: str) -> None:
    """RDB only: Redis saved after line 20 and came back from that save; lines 21 on are
    the ones it lost, and nothing more is sent."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir",
            str(tmp_path), "--appendonly", "no", "--save", ""]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    r = redis.Redis.from_url(url)
    until(lambda: _answers(r), 30, "redis-server up")

    def at(line: int) -> None:
        nonlocal server
        if line == 25:
            r.save()  # lines 1-20 are queued
        elif line == 45:
            server.terminate()  # SIGTERM without a save point: no save at exit
            server.wait(30)
            server = subprocess.Popen(args, stdout=subprocess.DEVNULL)
            until(lambda: _answers(r), 30, "redis-server back")

    def records() -> Iterator[SourceRecord]:
        for line in range(1, 61):
            at(line)
            yield SourceRecord(line, {"text": f"text number {line}"})

    try:
        with Client(Settings(broker_url=url, database_url=sqlite_url)) as client:
            with pytest.raises(BrokerUnavailable) as caught:
                stream(client, records(), chunk_size=10, linger_s=None, progress=False)
            assert caught.value.resume_line == 21
            assert caught.value.sent == 40
            assert client.queue_length() == 2  # lines 1-20, from the save
    finally:
        r.close()
        server.kill()
        server.wait(30)


def _answers(r: redis.Redis) -> bool:
    try:
        return bool(r.ping())
    except redis.ConnectionError:
        return False


# --- the watch key gone, the queue intact ----------------------------------------------

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
