"""A message buffered longer than the visibility timeout is not taken for a dead worker's.

The worker records a message in kombu's unacked index when it takes it, and
buffers it until the next flush, up to ``max_wait_ms`` later. Nothing keeps
``max_wait_ms`` below the visibility timeout: a message that waited longer
was restored by the visibility sweep (the worker's own) while still
buffered, came back as a second delivery of itself, and was counted as one
(past ``max_attempts`` dead-lettered: "the worker ... died"). Held messages
were renewed only by each flush, which comes no sooner than ``max_wait_ms``.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.broker import lane_queue
from contract.constants import STATUS_DONE
from contract.settings import Settings
from producer.client import Client

pytestmark = pytest.mark.slow


def test_a_buffered_message_outlives_a_short_visibility_timeout(
        redis_url: str, sqlite_url: str, tmp_path: Path, worker_factory: Any) -> None:
    """Visibility timeout 2 s (the sweep runs every second), a flush timer of 6 s: the
    message waits in the buffer three times the timeout. It is renewed meanwhile, so it
    is delivered once: never restored, never counted twice (``max_attempts=1`` would
    dead-letter the restored copy), done at its first attempt, nothing left unacked."""
    s = Settings(broker_url=redis_url, database_url=sqlite_url, model="null",
                 queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                 max_wait_ms=6_000, visibility_timeout_s=2, max_attempts=1)
    worker = worker_factory(s)
    queue = lane_queue(s, bulk=False)
    r = redis.Redis.from_url(redis_url)
    try:
        with Client(s) as client:
            t0 = time.monotonic()
            task_id = client.submit("the hotel is good")
            deadline = time.monotonic() + 5
            while r.hlen("unacked") == 0:  # the worker took it (and buffers it)
                assert time.monotonic() < deadline, "the worker never took the message"
                time.sleep(0.02)  # polling a condition
            restored = 0
            while client.store.get(task_id) is None:
                assert time.monotonic() - t0 < 30, worker.log()
                restored += r.llen(queue)  # a restored copy waits here until taken again
                time.sleep(0.02)  # polling a condition
            waited = time.monotonic() - t0
            row = client.wait([task_id], timeout=10)[task_id]
        assert waited > 2 * s.visibility_timeout_s, "the message must outwait the timeout"
        assert row.status == STATUS_DONE and row.attempts == 1
        deadline = time.monotonic() + 10
        while r.hlen("unacked") or r.zcard("unacked_index"):
            assert time.monotonic() < deadline, "a delivery was left unacked"
            time.sleep(0.05)  # polling a condition
        log = str(worker.tail(1 << 30))
        assert "dead-lettering" not in log, log
        assert restored == 0 and r.llen(queue) == 0
        assert worker.proc.poll() is None
    finally:
        r.close()
