"""The worker's receive path on real Redis: a message is always in a queue or in the unacked index.

kombu's own ``BRPOP`` leaves a message nowhere while its reply waits unread in
the worker's socket; these tests leave replies unread on purpose (what a
``kill -9`` mid-flush does) and look at where the message is.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from queue import Empty
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from tests.conftest import RedisServer
from worker import kombu_redis

FIRST, SECOND = "bst-recv.interactive", "bst-recv.bulk"


def _consumer(conn: Connection, got: list[Any]) -> Any:
    """A consuming channel on both queues (FIRST declared first), prefetch 10, late acks."""
    exchange = Exchange("bst-recv", type="direct")
    queues = [Queue(q, exchange, routing_key=q) for q in (FIRST, SECOND)]
    channel = conn.channel()
    consumer = Consumer(channel, queues=queues, callbacks=[lambda body, m: got.append((body, m))])
    consumer.qos(prefetch_count=10)
    consumer.consume()
    return channel


@contextlib.contextmanager
def private_consumer(redis_server: RedisServer) -> Iterator[tuple[Connection, redis.Redis,
                                                                  list[Any], Any]]:
    """On a private Redis (one the test may fill): a kombu connection with bertstream's
    receive installed, a plain client, and a consuming channel (:func:`_consumer`) with
    the list its messages go to."""
    assert kombu_redis.install()
    conn = Connection(redis_server.url)
    r = redis.Redis.from_url(redis_server.url)
    try:
        got: list[Any] = []
        yield conn, r, got, _consumer(conn, got)
    finally:
        conn.release()
        r.close()


@contextlib.contextmanager
def memory_full(r: redis.Redis) -> Iterator[None]:
    """Redis refuses every write (noeviction, no memory left) inside the block."""
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)
    try:
        yield
    finally:
        r.config_set("maxmemory", 0)


def _publish(conn: Connection, body: str, queue: str = FIRST) -> None:
    with conn.channel() as ch:
        Producer(ch).publish(body, exchange="bst-recv", routing_key=queue, serializer="json",
                             declare=[Queue(queue, Exchange("bst-recv", type="direct"),
                                            routing_key=queue)])


def _send_receive(conn: Connection, channel: Any) -> None:
    """Send the channel's next receive command the way the event loop does, and never read it."""
    conn.transport.cycle._register_BRPOP(channel)


def _drain(conn: Connection, got: list[Any], n: int, timeout: float = 10) -> None:
    """Receive until ``got`` holds ``n`` messages, acking each (prefetch frees up)."""
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} delivered"
        try:
            conn.drain_events(timeout=0.2)
        except TimeoutError:
            pass
        for _, message in got:
            if not message.acknowledged:
                message.ack()


def test_an_unread_pop_keeps_the_message_in_the_unacked_index(broker: Any) -> None:
    """The pop's reply is never read (the worker dies): the message is in the unacked index,
    and the visibility sweep puts it back in its queue."""
    conn, r = broker
    got: list[Any] = []
    channel = _consumer(conn, got)
    _publish(conn, "hello")
    _send_receive(conn, channel)
    time.sleep(0.2)
    channel.client.connection.disconnect()  # the reply dies unread
    assert r.llen(FIRST) == 0 and r.hlen("unacked") == 1 and r.zcard("unacked_index") == 1
    time.sleep(1.2)  # past the visibility timeout
    channel.qos.restore_visible(num=10, interval=1)
    assert r.llen(FIRST) == 1 and r.hlen("unacked") == 0


def test_kombu_brpop_loses_the_same_message(broker: Any) -> None:
    """The control: kombu's own BRPOP (``atomic_receive=False``), same steps, leaves
    the message nowhere."""
    conn, r = broker
    assert kombu_redis.install(atomic_receive=False)
    try:
        got: list[Any] = []
        channel = _consumer(conn, got)
        _publish(conn, "hello")
        _send_receive(conn, channel)
        time.sleep(0.2)
        channel.client.connection.disconnect()
    finally:
        kombu_redis.install()
    assert r.llen(FIRST) == 0 and r.hlen("unacked") == 0


def test_an_unread_wait_leaves_the_message_queued(broker: Any) -> None:
    """An idle worker's wait answered while nobody reads it: the message is still queued."""
    conn, r = broker
    got: list[Any] = []
    channel = _consumer(conn, got)
    _send_receive(conn, channel)  # the pop finds nothing...
    with pytest.raises(Empty):
        channel._brpop_read()
    _send_receive(conn, channel)  # ...so the next command waits
    assert channel.__dict__[kombu_redis._SENT] == "BLMOVE"
    _publish(conn, "hello")
    time.sleep(0.05)
    channel.client.connection.disconnect()
    assert r.llen(FIRST) == 1 and r.hlen("unacked") == 0 and got == []


def test_messages_flow_in_order_on_both_queues_and_acks_clear_the_index(broker: Any) -> None:
    conn, r = broker
    got: list[Any] = []
    _consumer(conn, got)
    for i in range(20):
        _publish(conn, f"first {i}", FIRST)
        _publish(conn, f"second {i}", SECOND)
    _drain(conn, got, 40)  # prefetch 10: the acks release the rest
    bodies = [body for body, _ in got]
    assert sorted(bodies) == sorted([f"first {i}" for i in range(20)]
                                    + [f"second {i}" for i in range(20)])
    assert [b for b in bodies if b.startswith("first")] == [f"first {i}" for i in range(20)]
    assert r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0
    assert r.llen(FIRST) == 0 and r.llen(SECOND) == 0


def test_an_idle_worker_sees_either_queue_promptly(broker: Any) -> None:
    """The first queue wakes the wait at once; the second is looked at every WAIT_S."""
    conn, r = broker
    got: list[Any] = []
    _consumer(conn, got)
    for queue in (FIRST, SECOND, FIRST, SECOND):
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.5)  # idle: waiting
        n = len(got)
        t0 = time.monotonic()
        _publish(conn, f"to {queue}", queue)
        _drain(conn, got, n + 1, timeout=5)
        waited = time.monotonic() - t0
        assert got[-1][0] == f"to {queue}"
        assert waited < 1.0, f"{queue}: {waited:.2f} s"  # kombu's own wait is 1 s per round


def test_a_full_redis_keeps_the_message_queued_until_it_has_room(
        redis_server: RedisServer) -> None:
    """A full noeviction Redis refuses the script's writes: the message stays queued
    (recorded before popped; kombu's BRPOP would pop it and fail to record it), the
    worker pauses and tries again, and takes it once Redis has room."""
    with private_consumer(redis_server) as (conn, r, got, channel):
        _publish(conn, "hello")
        sent = []
        with memory_full(r):
            # The receive steps alone: kombu's own sweep (a SET) fails on a full
            # server too, in drain_events, which would hide what is looked at here.
            for _ in range(4):
                _send_receive(conn, channel)
                sent.append(channel.__dict__[kombu_redis._SENT])
                with pytest.raises(Empty):
                    channel._brpop_read()
            assert sent == ["EVAL", "BLPOP", "EVAL", "BLPOP"]
            assert got == [] and r.llen(FIRST) == 1 and r.hlen("unacked") == 0
        _drain(conn, got, 1)
        assert got[0][0] == "hello" and r.llen(FIRST) == 0
