"""A warm restart is no failed delivery; a crash is one.

A message held for its long text's windows goes back to the queue when its
worker gets SIGTERM (a rolling deploy). Its delivery count used to stay, so
``max_attempts`` restarts dead-lettered it as if its worker had died.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.broker import lane_queue
from contract.constants import DELIVERY_KEY_PREFIX
from contract.settings import Settings
from producer.client import Client
from worker.deliveries import DeliveryCounter


@pytest.mark.parametrize("memory", [False, True])
def test_undo_takes_back_one_delivery_per_id(redis_url: str, memory: bool) -> None:
    counter = DeliveryCounter(Settings(broker_url="memory://" if memory else redis_url))
    try:
        assert counter.incr(["a", "a", "a", "b", "c"]) == [1, 2, 3, 1, 1]
        counter.undo(["a", "b", "b", "never-counted"])  # b twice: gone, not negative
        assert counter.incr(["a", "b", "never-counted"]) == [3, 1, 1]
        counter.undo(["a", "a"])
        assert counter.incr(["a"]) == [2]
        counter.undo([])
    finally:
        counter.close()


@pytest.mark.parametrize("visibility_timeout_s", [300, 200_000])
def test_a_count_outlives_the_visibility_timeout(redis_url: str,
                                                 visibility_timeout_s: int) -> None:
    """A dead worker's message comes back after the visibility timeout (then waits in its
    queue): its count must still be there, a day longer. A fixed day let a poison message
    come back uncounted, for ever, when the timeout was longer than a day."""
    counter = DeliveryCounter(Settings(broker_url=redis_url,
                                       visibility_timeout_s=visibility_timeout_s))
    r = redis.Redis.from_url(redis_url)
    try:
        assert counter.incr(["m"]) == [1]
        ttl = r.ttl(DELIVERY_KEY_PREFIX + "m")
        assert visibility_timeout_s + 86_400 - 60 <= ttl <= visibility_timeout_s + 86_400
    finally:
        counter.close()
        r.close()


def _counts(r: redis.Redis) -> list[int]:
    return [int(r.get(k) or 0) for k in r.scan_iter(DELIVERY_KEY_PREFIX + "*")]


def _wait_counted(r: redis.Redis, timeout: float = 60.0) -> list[int]:
    """Until a delivery counter exists (the worker's first flush of the message ran)."""
    deadline = time.monotonic() + timeout
    while not (counts := _counts(r)):
        assert time.monotonic() < deadline, "the worker never took the message"
        time.sleep(0.01)  # polling a condition
    return counts


@pytest.mark.slow
def test_sigterm_hands_a_held_message_back_uncounted_and_kill_9_counts(
        redis_url: str, sqlite_url: str, tiny_model_dir: Path, worker_factory: Any) -> None:
    """SIGTERM while the long text waits for its windows: the message is queued again with
    no delivery counted, so with ``max_attempts=1`` the next worker runs it (it used to
    dead-letter it). kill -9 of that worker keeps its count: a crash still counts."""
    s = Settings(broker_url=redis_url, database_url=sqlite_url, model=str(tiny_model_dir),
                 queue=f"bst-test-{uuid.uuid4().hex[:8]}", max_length=16, window_slice_ms=1,
                 max_wait_ms=50, max_attempts=1, visibility_timeout_s=3600)
    r = redis.Redis.from_url(redis_url)
    queue = lane_queue(s, bulk=False)
    try:
        with Client(s) as client:
            client.submit("good " * 300 + "bad", id="long")  # tens of windows, one a flush
            first = worker_factory(s)
            assert _wait_counted(r) == [1]
            assert first.stop(timeout=30) == 0
            assert client.store.get("long") is None, "the text must still be held"
            assert r.llen(queue) == 1 and r.hlen("unacked") == 0  # queued again
            assert _counts(r) == []  # and not counted
            second = worker_factory(s)
            assert _wait_counted(r) == [1]  # a first delivery again: run, not dead-lettered
            second.kill()
            assert client.store.get("long") is None, "the text must still be held"
            assert _counts(r) == [1] and r.hlen("unacked") == 1  # the crash counts
    finally:
        r.close()
