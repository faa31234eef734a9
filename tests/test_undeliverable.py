"""List items kombu cannot make a message of: parked on ``<queue>.undeliverable``, never fatal.

Any Redis client can push anything onto a queue. Before, such an item made
kombu raise out of the worker's event loop (``Unrecoverable error``, exit 1);
one with a kombu-shaped envelope was first recorded as unacked by the
atomic receive, so it came back after the visibility timeout and stopped
the next worker too, forever.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Queue

from contract.broker import lane_queue
from contract.constants import STATUS_DONE
from contract.settings import Settings
from producer.client import Client
from tests.conftest import RedisServer
from tests.test_kombu_receive import FIRST, _consumer, _drain, _publish, _send_receive
from worker import kombu_redis

GARBAGE = b"this is not json"


def bad_body(queue: str, exchange: str, tag: str) -> bytes:
    """A well-formed kombu envelope (recorded by the receive script) whose base64 body
    does not decode."""
    return json.dumps({
        "body": "YWJjZ", "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"task": "bertstream.analyze", "id": f"bad-body-{tag}"},
        "properties": {"body_encoding": "base64", "delivery_tag": tag, "priority": 0,
                       "delivery_mode": 2,
                       "delivery_info": {"exchange": exchange, "routing_key": queue}},
    }).encode()


def test_unreadable_items_are_parked_and_the_next_message_delivered(broker: Any) -> None:
    conn, r = broker
    got: list[Any] = []
    _consumer(conn, got)
    _publish(conn, "before")
    r.lpush(FIRST, GARBAGE, bad_body(FIRST, "bst-recv", "tag-bad"))
    _publish(conn, "after")
    _drain(conn, got, 2)
    assert [body for body, _ in got] == ["before", "after"]
    side = FIRST + kombu_redis.UNDELIVERABLE_SUFFIX
    assert r.lrange(side, 0, -1) == [bad_body(FIRST, "bst-recv", "tag-bad"), GARBAGE]
    assert r.llen(FIRST) == 0 and r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0


def test_the_side_list_keeps_the_newest(broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    conn, r = broker
    monkeypatch.setattr(kombu_redis, "UNDELIVERABLE_KEEP", 3)
    got: list[Any] = []
    _consumer(conn, got)
    r.lpush(FIRST, *[f"junk {i}".encode() for i in range(5)])
    _publish(conn, "after")
    _drain(conn, got, 1)
    side = FIRST + kombu_redis.UNDELIVERABLE_SUFFIX
    assert r.lrange(side, 0, -1) == [b"junk 4", b"junk 3", b"junk 2"]


def test_a_failure_in_the_consumer_is_not_the_items_fault(broker: Any) -> None:
    """kombu made a message of it and handed it on: the consumer's error propagates as
    before and the message stays unacked (redelivered), nothing is parked."""
    conn, r = broker
    def failing(body: Any, message: Any) -> None:
        raise RuntimeError("the consumer failed")

    queue = Queue(FIRST, Exchange("bst-recv", type="direct"), routing_key=FIRST)
    consumer = Consumer(conn.channel(), queues=[queue], callbacks=[failing])
    consumer.qos(prefetch_count=10)
    consumer.consume()
    _publish(conn, "hello")
    with pytest.raises(RuntimeError, match="the consumer failed"):
        for _ in range(20):
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                pass
    assert r.llen(FIRST + kombu_redis.UNDELIVERABLE_SUFFIX) == 0
    assert r.hlen("unacked") == 1 and r.zcard("unacked_index") == 1


def test_a_full_redis_drops_an_item_it_cannot_keep(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """On a full noeviction server the copy to the side list is refused: the item (popped,
    never recorded) is dropped with an error, and the worker goes on."""
    assert kombu_redis.install()
    conn = Connection(redis_server.url)
    r = redis.Redis.from_url(redis_server.url)
    try:
        got: list[Any] = []
        channel = _consumer(conn, got)
        r.lpush(FIRST, GARBAGE)
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", 1)
        try:
            with caplog.at_level(logging.ERROR, logger="worker.kombu_redis"):
                _send_receive(conn, channel)
                with pytest.raises(Empty):
                    channel._brpop_read()
        finally:
            r.config_set("maxmemory", 0)
        assert r.llen(FIRST) == 0 and r.exists(FIRST + kombu_redis.UNDELIVERABLE_SUFFIX) == 0
        assert f"queue {FIRST}" in caplog.text and "dropped" in caplog.text
        _publish(conn, "after")
        _drain(conn, got, 1)
        assert got[0][0] == "after"
    finally:
        conn.release()
        r.close()


@pytest.mark.slow
def test_a_worker_survives_unreadable_items(redis_url: str, sqlite_url: str, tmp_path: Path,
                                            tiny_model_dir: Path, worker_factory: Any) -> None:
    """Not JSON, and a kombu envelope with a body that does not decode, then a task: the
    same worker stores the task, the two items are on the side list, none is unacked."""
    s = Settings(broker_url=redis_url, database_url=sqlite_url, model=str(tiny_model_dir),
                 queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                 max_wait_ms=20)
    worker = worker_factory(s)
    queue = lane_queue(s, bulk=False)
    r = redis.Redis.from_url(redis_url)
    try:
        envelope = bad_body(queue, s.queue, "tag-bad-1")
        r.lpush(queue, GARBAGE, envelope)
        with Client(s) as client:
            task_id = client.submit("the hotel is good")
            assert client.wait([task_id], timeout=30)[task_id].status == STATUS_DONE
        side = queue + kombu_redis.UNDELIVERABLE_SUFFIX
        deadline = time.monotonic() + 10
        while r.llen(side) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.proc.poll() is None, worker.log()
        assert r.lrange(side, 0, -1) == [envelope, GARBAGE]
        assert r.llen(queue) == 0 and r.zcard("unacked_index") == 0 and r.hlen("unacked") == 0
        log = worker.log()
        assert f"queue {queue}" in log and side in log and "Unrecoverable" not in log
    finally:
        r.close()
