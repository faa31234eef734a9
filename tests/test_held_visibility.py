"""A message held for its long text outlives the visibility timeout, with a real worker.

The worker holds (does not ack) a message while its long text's windows are
scored over several flushes. kombu's visibility sweep restores any unacked
message older than the visibility timeout, and each restored copy used to
count as one more delivery: past ``max_attempts`` the text got a false
``failed`` row ("dead-lettered ... the worker died") although no worker
died, and a later flush turned it ``done``.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.broker import lane_queue
from contract.constants import DELIVERY_KEY_PREFIX, STATUS_DONE, STATUS_FAILED
from contract.settings import Settings
from producer.client import Client

pytestmark = pytest.mark.slow

#: Hundreds of windows at ``max_length=16``, one a flush: several seconds held.
LONG = " ".join(["good movie nice."] * 500)
JOINED = "came back while held"


def _settings(redis_url: str, sqlite_url: str, tiny_model_dir: Path,
              visibility_timeout_s: int) -> Settings:
    # max_attempts=1: a single restored copy counted as a delivery is dead-lettered.
    return Settings(broker_url=redis_url, database_url=sqlite_url, model=str(tiny_model_dir),
                    queue=f"bst-test-{uuid.uuid4().hex[:8]}", max_length=16, window_slice_ms=1,
                    max_wait_ms=50, max_attempts=1, visibility_timeout_s=visibility_timeout_s)


def _counts(r: redis.Redis) -> list[int]:
    """The delivery counts in Redis; a key deleted between SCAN and GET (its message acked
    and forgotten) is no count, not a count of 0."""
    values = (r.get(k) for k in r.scan_iter(DELIVERY_KEY_PREFIX + "*"))
    return [int(v) for v in values if v is not None]


class _Watch:
    """Polls the text's row and its delivery count; keeps every status and count seen."""

    def __init__(self, client: Client, r: redis.Redis, task_id: str) -> None:
        self.client, self.r, self.task_id = client, r, task_id
        self.statuses: list[tuple[str, int]] = []
        self.counts: set[int] = set()

    def poll(self) -> Any:
        row = self.client.store.get(self.task_id)
        if row is not None and (not self.statuses
                                or self.statuses[-1] != (row.status, row.attempts)):
            self.statuses.append((row.status, row.attempts))
        self.counts.update(_counts(self.r))
        return row

    def until_done(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while (row := self.poll()) is None or row.status != STATUS_DONE:
            assert time.monotonic() < deadline, f"not done: {self.statuses}"
            time.sleep(0.05)  # polling the store, as a reader would


def _log(worker: Any) -> str:
    """The worker's whole output (its ``log()`` is the tail)."""
    return str(worker.tail(1 << 30))


def _wait_idle(r: redis.Redis, queue: str, timeout: float = 30.0) -> None:
    """Until nothing is queued or unacked (the original and every copy acked)."""
    deadline = time.monotonic() + timeout
    while r.llen(queue) or r.hlen("unacked") or r.zcard("unacked_index"):
        assert time.monotonic() < deadline, (r.llen(queue), r.hlen("unacked"))
        time.sleep(0.05)  # polling a condition


def test_a_held_message_is_kept_visible_past_a_short_visibility_timeout(
        redis_url: str, sqlite_url: str, tiny_model_dir: Path, worker_factory: Any) -> None:
    """Visibility timeout 2 s, a long text held for several times that: each flush renews
    the held message's place in kombu's unacked index, so the worker's own sweep never
    restores it; the text is never failed and ends done at its first attempt."""
    s = _settings(redis_url, sqlite_url, tiny_model_dir, visibility_timeout_s=2)
    r = redis.Redis.from_url(redis_url)
    try:
        with Client(s) as client:
            worker = worker_factory(s)
            t0 = time.monotonic()
            client.submit(LONG, id="long")
            watch = _Watch(client, r, "long")
            watch.until_done()
            held_s = time.monotonic() - t0
            assert held_s > 3 * s.visibility_timeout_s, "the text must outlast the timeout"
            assert watch.statuses == [(STATUS_DONE, 1)], watch.statuses
            assert STATUS_FAILED not in {st for st, _ in watch.statuses}
            assert watch.counts <= {1}, watch.counts
            _wait_idle(r, lane_queue(s, bulk=False))
            assert JOINED not in _log(worker), "the sweep restored the held message"
    finally:
        r.close()


def test_a_restored_copy_of_a_held_message_is_no_new_delivery(
        redis_url: str, sqlite_url: str, tiny_model_dir: Path, worker_factory: Any) -> None:
    """Another worker's sweep (here: kombu's ``QoS.restore_by_tag``, what the sweep runs
    for each message past the visibility timeout) restores the held message three times:
    each copy joins its original, is not counted (``max_attempts=1`` would dead-letter it)
    and is acked with it."""
    from kombu import Connection

    s = _settings(redis_url, sqlite_url, tiny_model_dir, visibility_timeout_s=3600)
    r = redis.Redis.from_url(redis_url)
    queue = lane_queue(s, bulk=False)
    sweeper = Connection(redis_url)
    try:
        with Client(s) as client:
            worker = worker_factory(s)
            client.submit(LONG, id="long")
            watch = _Watch(client, r, "long")
            for _ in range(3):
                deadline = time.monotonic() + 60
                # the worker took the message (or the last copy) and counted it
                while not (_counts(r) and r.llen(queue) == 0 and r.hlen("unacked") == 1):
                    assert watch.poll() is None, f"must still be held: {watch.statuses}"
                    assert time.monotonic() < deadline, "the worker never held the message"
                    time.sleep(0.02)  # polling a condition
                [tag] = r.hkeys("unacked")
                sweeper.default_channel.qos.restore_by_tag(tag)  # one copy queued
            watch.until_done()
            assert watch.statuses == [(STATUS_DONE, 1)], watch.statuses
            assert watch.counts == {1}, watch.counts
            _wait_idle(r, queue)
            assert _log(worker).count(JOINED) == 3
    finally:
        sweeper.release()
        r.close()


def test_keep_visible_renews_recorded_messages_only(broker: Any) -> None:
    """On real Redis (visibility timeout 1 s): a renewed message outlives the timeout in a
    sweep; once acked (or restored) it is not recorded again."""
    from tests.test_kombu_receive import FIRST, _consumer, _publish
    from worker import kombu_redis

    conn, r = broker
    got: list[Any] = []
    channel = _consumer(conn, got)
    _publish(conn, "held")
    _publish(conn, "other")
    deadline = time.monotonic() + 10
    while len(got) < 2:
        assert time.monotonic() < deadline, "nothing delivered"
        conn.drain_events(timeout=1)
    (_, held), (_, other) = got
    other.ack()
    time.sleep(1.2)  # past the visibility timeout
    kombu_redis.keep_visible([held, other, None])
    assert r.zcard("unacked_index") == 1  # the acked one is not recorded again
    assert time.time() - float(r.zscore("unacked_index", held.delivery_tag) or 0) < 1
    channel.qos.restore_visible(num=10, interval=1)
    assert r.llen(FIRST) == 0 and r.hlen("unacked") == 1  # still held
    time.sleep(1.2)
    channel.qos.restore_visible(num=10, interval=1)  # not renewed: restored
    assert r.llen(FIRST) == 1 and r.zcard("unacked_index") == 0
    kombu_redis.keep_visible([held])
    assert r.zcard("unacked_index") == 0
