"""List items kombu cannot make a message of: parked on ``<queue>.undeliverable``, never fatal.

Any Redis client can push anything onto a queue. Before, such an item made
kombu raise out of the worker's event loop (``Unrecoverable error``, exit 1);
one with a kombu-shaped envelope was first recorded as unacked by the
atomic receive, so it came back after the visibility timeout and stopped
the next worker too, forever. The tasks such an item names, when their ids
can be read, get ``failed`` rows: a caller waiting on them used to wait
until its timeout.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Queue

from contract.broker import lane_queue
from contract.constants import STATUS_DONE, STATUS_FAILED, TASK_ANALYZE
from contract.settings import Settings
from producer.client import Client
from tests.conftest import RedisServer
from tests.test_kombu_receive import (
    FIRST,
    SECOND,
    _consumer,
    _drain,
    _publish,
    _send_receive,
    memory_full,
    private_consumer,
)
from worker import kombu_redis
from worker.flush import derived_key

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


def untagged(queue: str, exchange: str, task_id: str, items: list[dict[str, Any]]) -> bytes:
    """A Celery task message whose body reads well but whose envelope has no delivery tag
    (a hand-written producer): kombu cannot make a message of it, its task ids can be read."""
    body = json.dumps([[items], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                     "chord": None}])
    return json.dumps({
        "body": base64.b64encode(body.encode()).decode(), "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": TASK_ANALYZE, "id": task_id},
        "properties": {"body_encoding": "base64", "priority": 0, "delivery_mode": 2,
                       "delivery_info": {"exchange": exchange, "routing_key": queue}},
    }).encode()


@pytest.fixture(autouse=True)
def no_handler() -> Iterator[None]:
    """No handler of parked items but the test's own (a worker app built in this process
    registers one), the one before restored after."""
    previous = kombu_redis.on_undeliverable(None)
    try:
        yield
    finally:
        kombu_redis.on_undeliverable(previous)


@pytest.fixture
def kombu_brpop() -> Iterator[None]:
    """kombu's own receive command (``atomic_receive=False``) for the test, then the atomic one."""
    assert kombu_redis.install(atomic_receive=False)
    try:
        yield
    finally:
        assert kombu_redis.install()


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
    with private_consumer(redis_server) as (conn, r, got, channel):
        r.lpush(FIRST, GARBAGE)
        with memory_full(r), caplog.at_level(logging.ERROR, logger="worker.kombu_redis"):
            _send_receive(conn, channel)
            with pytest.raises(Empty):
                channel._brpop_read()
        assert r.llen(FIRST) == 0 and r.exists(FIRST + kombu_redis.UNDELIVERABLE_SUFFIX) == 0
        assert f"queue {FIRST}" in caplog.text and "dropped" in caplog.text
        _publish(conn, "after")
        _drain(conn, got, 1)
        assert got[0][0] == "after"


def test_the_handler_gets_what_can_be_read(broker: Any) -> None:
    """Each parked item goes to the registered handler with its envelope's headers and
    its body decoded, as far as they read, and the side list that keeps it."""
    conn, r = broker
    seen: list[kombu_redis.Undeliverable] = []

    def collect(parked: kombu_redis.Undeliverable) -> str:
        seen.append(parked)
        return "handled"

    kombu_redis.on_undeliverable(collect)
    got: list[Any] = []
    _consumer(conn, got)
    items = [{"id": "und-a", "text": "good"}]
    r.lpush(FIRST, untagged(FIRST, "bst-recv", "celery-1", items),
            bad_body(FIRST, "bst-recv", "tag-bad"), GARBAGE, b"[1, 2]")
    _publish(conn, "after")
    _drain(conn, got, 1)
    side = FIRST + kombu_redis.UNDELIVERABLE_SUFFIX
    assert [(p.queue, p.side) for p in seen] == [(FIRST, side)] * 4
    no_tag, no_body, garbage, array = seen
    assert no_tag.headers is not None and no_tag.headers["id"] == "celery-1"
    assert no_tag.body[0] == [items] and "delivery_tag" in no_tag.reason
    assert no_body.headers is not None and no_body.headers["id"] == "bad-body-tag-bad"
    assert no_body.body is None
    assert (garbage.headers, garbage.body, garbage.item) == (None, None, GARBAGE)
    assert (array.headers, array.body) == (None, None)


def test_a_failing_handler_does_not_stop_the_consumer(
        broker: Any, caplog: pytest.LogCaptureFixture) -> None:
    conn, r = broker

    def failing(parked: kombu_redis.Undeliverable) -> str:
        raise RuntimeError("handler bug")

    kombu_redis.on_undeliverable(failing)
    got: list[Any] = []
    _consumer(conn, got)
    r.lpush(FIRST, GARBAGE)
    _publish(conn, "after")
    with caplog.at_level(logging.ERROR, logger="worker.kombu_redis"):
        _drain(conn, got, 1)
    assert got[0][0] == "after"
    assert r.lrange(FIRST + kombu_redis.UNDELIVERABLE_SUFFIX, 0, -1) == [GARBAGE]
    assert "handler bug" in caplog.text and "its handler failed: RuntimeError" in caplog.text


def test_parked_items_are_logged_once_per_queue_per_interval(
        broker: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of bad items gives one error line per queue per PARK_LOG_EVERY_S; the next
    line counts the items parked meanwhile."""
    conn, r = broker
    monkeypatch.setattr(kombu_redis, "PARK_LOG_EVERY_S", 3600.0)
    got: list[Any] = []
    _consumer(conn, got)
    with caplog.at_level(logging.ERROR, logger="worker.kombu_redis"):
        r.lpush(FIRST, *[f"junk {i}".encode() for i in range(5)])
        r.lpush(SECOND, b"other junk")
        _publish(conn, "after")
        _drain(conn, got, 1)
        lines = [rec.getMessage() for rec in caplog.records]
        assert len(lines) == 2, lines
        assert sum(line.startswith(f"queue {FIRST}:") for line in lines) == 1
        assert sum(line.startswith(f"queue {SECOND}:") for line in lines) == 1
        assert all("more parked since" not in line for line in lines)
        caplog.clear()
        monkeypatch.setattr(kombu_redis, "PARK_LOG_EVERY_S", 0.0)
        r.lpush(FIRST, b"junk 5")
        _publish(conn, "after 2")
        _drain(conn, got, 2)
    lines = [rec.getMessage() for rec in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"queue {FIRST}:"), lines
    assert "(4 more parked since the last such line, not logged)" in lines[0]
    assert r.llen(FIRST + kombu_redis.UNDELIVERABLE_SUFFIX) == 6


def test_the_worker_fails_the_tasks_it_can_read(
        broker: Any, redis_url: str, db_url: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The worker app's handler, on the real store: the items of a readable body fail
    under their own ids (what a caller waits on), a body that does not read fails under
    its task id header, an item with nothing readable stores nothing."""
    from worker.app import build_worker_app
    from worker.runner import NullRunner

    conn, r = broker
    s = Settings(broker_url=redis_url, database_url=db_url, model="null",
                 queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"))
    wapp = build_worker_app(s, NullRunner())
    store = wapp.processor.store
    try:
        got: list[Any] = []
        _consumer(conn, got)
        items = [{"id": "und-a", "text": "the hotel is good", "source": "crawler"},
                 {"id": "und-b", "text": "   "}]
        r.lpush(FIRST, untagged(FIRST, "bst-recv", "celery-1", items),
                bad_body(FIRST, "bst-recv", "tag-bad"), GARBAGE)
        _publish(conn, "after")
        with caplog.at_level(logging.ERROR, logger="worker.kombu_redis"):
            _drain(conn, got, 1)
        side = FIRST + kombu_redis.UNDELIVERABLE_SUFFIX
        assert r.llen(side) == 3
        rows = store.get_many(["und-a", "und-b", derived_key("bad-body-tag-bad", 0)])
        assert {k: v.status for k, v in rows.items()} == {
            "und-a": STATUS_FAILED, "und-b": STATUS_FAILED,
            derived_key("bad-body-tag-bad", 0): STATUS_FAILED}
        a = rows["und-a"]
        assert a.error is not None and a.error.startswith(
            "undeliverable message: kombu cannot make a message of it (KeyError: "
            "'delivery_tag'); the raw item is kept on " + side)
        assert a.source == "crawler" and a.text == "the hotel is good"
        # an item invalid in itself keeps its own reason
        assert rows["und-b"].error == "text is empty or whitespace only"
        bad = rows[derived_key("bad-body-tag-bad", 0)].error
        assert bad is not None and bad.startswith("undeliverable message: kombu cannot make "
                                                  "a message of it (binascii.Error: ")
        assert "2 task(s) stored as failed" in caplog.text  # the first line of the queue
        assert store.count() == 3  # the non-JSON item: nothing to fail
    finally:
        store.close()


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


def test_kombu_brpop_parks_unreadable_items_too(broker: Any, kombu_brpop: None) -> None:
    """With kombu's own BRPOP (``atomic_receive=False``) such an item raised out of
    kombu's read (the worker stopped, the item popped and lost): it is parked too."""
    conn, r = broker
    got: list[Any] = []
    channel = _consumer(conn, got)
    _publish(conn, "before")
    r.lpush(FIRST, GARBAGE, bad_body(FIRST, "bst-recv", "tag-bad"))
    _publish(conn, "after")
    _drain(conn, got, 2)
    assert kombu_redis._SENT not in channel.__dict__  # kombu's BRPOP, not the script
    assert [body for body, _ in got] == ["before", "after"]
    side = FIRST + kombu_redis.UNDELIVERABLE_SUFFIX
    assert r.lrange(side, 0, -1) == [bad_body(FIRST, "bst-recv", "tag-bad"), GARBAGE]
    assert r.llen(FIRST) == 0 and r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0


def test_a_global_keyprefix_parks_under_the_prefix(redis_url: str) -> None:
    """kombu's ``global_keyprefix`` keeps kombu's BRPOP: the item is parked on the prefixed
    side list, and trimmed there (kombu does not prefix LTRIM)."""
    assert kombu_redis.install()
    conn = Connection(redis_url, transport_options={"global_keyprefix": "pfx:"})
    r = redis.Redis.from_url(redis_url)
    try:
        got: list[Any] = []
        _consumer(conn, got)
        r.lpush("pfx:" + FIRST, *[f"junk {i}".encode() for i in range(3)])
        _publish(conn, "after")
        _drain(conn, got, 1)
        assert got[0][0] == "after"
        side = FIRST + kombu_redis.UNDELIVERABLE_SUFFIX
        assert r.lrange("pfx:" + side, 0, -1) == [b"junk 2", b"junk 1", b"junk 0"]
        assert r.exists(side) == 0 and r.llen("pfx:" + FIRST) == 0
    finally:
        conn.release()
        r.close()


@pytest.mark.slow
def test_a_worker_on_kombu_brpop_survives_unreadable_items(
        redis_url: str, sqlite_url: str, tmp_path: Path, tiny_model_dir: Path,
        worker_factory: Any) -> None:
    """``BERTSTREAM_ATOMIC_RECEIVE=false``: a non-JSON item used to stop the worker with
    ``Unrecoverable error`` (and was lost); it is parked and the worker goes on."""
    s = Settings(broker_url=redis_url, database_url=sqlite_url, model=str(tiny_model_dir),
                 queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                 max_wait_ms=20, atomic_receive=False)
    worker = worker_factory(s)
    queue = lane_queue(s, bulk=False)
    r = redis.Redis.from_url(redis_url)
    try:
        r.lpush(queue, GARBAGE)
        with Client(s) as client:
            task_id = client.submit("the hotel is good")
            assert client.wait([task_id], timeout=30)[task_id].status == STATUS_DONE
        side = queue + kombu_redis.UNDELIVERABLE_SUFFIX
        assert worker.proc.poll() is None, worker.log()
        assert r.lrange(side, 0, -1) == [GARBAGE]
        log = worker.log()
        assert f"queue {queue}" in log and side in log and "Unrecoverable" not in log
    finally:
        r.close()


@pytest.mark.slow
def test_a_worker_fails_the_tasks_of_an_undeliverable_item(
        redis_url: str, db_url: str, tmp_path: Path, tiny_model_dir: Path,
        worker_factory: Any) -> None:
    """A task message kombu cannot deliver (no delivery tag) whose items' ids read: the
    caller waiting on them gets ``failed`` rows with the reason, not a timeout."""
    s = Settings(broker_url=redis_url, database_url=db_url, model=str(tiny_model_dir),
                 queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                 max_wait_ms=20)
    worker = worker_factory(s)
    queue = lane_queue(s, bulk=False)
    side = queue + kombu_redis.UNDELIVERABLE_SUFFIX
    r = redis.Redis.from_url(redis_url)
    try:
        ids = [f"und-{uuid.uuid4().hex[:8]}" for _ in range(2)]
        r.lpush(queue, untagged(queue, s.queue, "celery-1", [
            {"id": ids[0], "text": "the hotel is good", "source": "crawler"},
            {"id": ids[1], "text": "the room is dirty"}]))
        with Client(s) as client:
            rows = client.wait(ids, timeout=30)
            task_id = client.submit("the staff were kind")
            assert client.wait([task_id], timeout=30)[task_id].status == STATUS_DONE
        for task in ids:
            assert rows[task].status == STATUS_FAILED
            assert rows[task].error == (
                "undeliverable message: kombu cannot make a message of it (KeyError: "
                f"'delivery_tag'); the raw item is kept on {side}")
        assert rows[ids[0]].source == "crawler"
        assert worker.proc.poll() is None, worker.log()
        assert r.llen(side) == 1
        log = worker.log()
        assert f"queue {queue}" in log and "2 task(s) stored as failed" in log
    finally:
        r.close()
