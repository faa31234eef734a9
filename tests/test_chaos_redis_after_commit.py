"""Redis lost between a flush's commit and its end: the flush goes on with its other groups.

Found by the chaos run (``bench/chaos.py``): a Redis restart right after a group's rows
were committed and its messages acked made the delivery counter's clean-up (a DEL)
raise out of the flush. The flush was then logged as "failed unexpectedly" with a
traceback, and its groups not run yet (redelivered messages, processed alone after the
first deliveries) went back to the queue untried with their delivery counted, against
the rule that an outage never counts a delivery that did not run (repeated restarts
could so dead-letter a healthy message). The counters expire on their own: a clean-up
that fails is no reason to stop the flush.

In process, on a private redis-server stopped for real at the first commit.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from contract.constants import DELIVERY_KEY_PREFIX, STATUS_DONE
from contract.results import ResultStore
from contract.settings import Settings
from tests.conftest import RedisServer
from tests.outage_helpers import _task
from tests.test_long_texts import _QueuedRequest


def test_redis_gone_after_a_commit_leaves_the_rest_of_the_flush_to_run(
        redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import redis

    s = Settings(broker_url=redis_server.url, database_url=f"sqlite:///{tmp_path / 'r.db'}",
                 max_attempts=3, redis_socket_timeout_s=2, redis_connect_timeout_s=1)
    store = ResultStore.from_url(s.database_url)
    store.create_schema()
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.set(DELIVERY_KEY_PREFIX + "again", 1, ex=3_600)  # delivered once before
        task = _task(s, store)
        stopped: list[float] = []

        def stop_redis(conn: Any) -> None:
            if not stopped:  # the first commit: the first deliveries' group
                stopped.append(time.monotonic())
                redis_server.stop()

        sa.event.listen(store.engine, "commit", stop_redis)
        now = time.time()
        reqs = [_QueuedRequest(mid, [{"id": f"row-{mid}", "text": "the hotel is good",
                                      "submitted_at": now}]) for mid in ("fresh", "again")]
        with caplog.at_level(logging.WARNING):
            task.flush(reqs)
        assert stopped, "the flush committed nothing"
        rows = store.get_many(["row-fresh", "row-again"])
        assert "failed unexpectedly" not in caplog.text, caplog.text
        assert {k: (v.status, v.attempts) for k, v in rows.items()} == {
            "row-fresh": (STATUS_DONE, 1), "row-again": (STATUS_DONE, 2)}
        assert all(r.acknowledged and r.rejected is not True for r in reqs)
        assert "delivery counts" in caplog.text, caplog.text
    finally:
        client.close()
        store.close()


def test_redis_gone_before_a_flush_is_one_warning_not_a_traceback(
        redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Redis down when a flush starts (a restart): counting the deliveries fails, nothing
    runs and nothing is counted; that is an outage, logged as one warning, not as a flush
    that "failed unexpectedly" with a traceback. Once Redis is back, a flush of the same
    messages stores their rows (first deliveries)."""
    s = Settings(broker_url=redis_server.url, database_url=f"sqlite:///{tmp_path / 'r.db'}",
                 max_attempts=3, redis_socket_timeout_s=2, redis_connect_timeout_s=1)
    store = ResultStore.from_url(s.database_url)
    store.create_schema()
    try:
        task = _task(s, store)
        redis_server.stop()
        now = time.time()
        reqs = [_QueuedRequest(mid, [{"id": f"row-{mid}", "text": "the hotel is good",
                                      "submitted_at": now}]) for mid in ("m1", "m2")]
        with caplog.at_level(logging.WARNING):
            task.flush(reqs)
        assert "failed unexpectedly" not in caplog.text, caplog.text
        assert "Traceback" not in caplog.text, caplog.text
        assert "Redis cannot be reached" in caplog.text, caplog.text
        assert store.get_many(["row-m1", "row-m2"]) == {}
        redis_server.start()
        again = [_QueuedRequest(mid, [{"id": f"row-{mid}", "text": "the hotel is good",
                                       "submitted_at": now}]) for mid in ("m1", "m2")]
        task.flush(again)
        rows = store.get_many(["row-m1", "row-m2"])
        assert {k: (v.status, v.attempts) for k, v in rows.items()} == {
            "row-m1": (STATUS_DONE, 1), "row-m2": (STATUS_DONE, 1)}
    finally:
        store.close()
