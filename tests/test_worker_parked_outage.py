"""Parked items during a database outage: their tasks get ``failed`` rows once it is back.

A list item kombu cannot deliver is parked on ``<queue>.undeliverable`` and
the tasks it names are failed (tests/test_undeliverable.py). During a
database outage those rows could not be written, and nothing wrote them
later: a caller waited on the tasks until its own timeout. Here the worker
reaches PostgreSQL through a TCP proxy the test cuts, as in
tests/test_outage.py.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.broker import lane_queue
from contract.constants import STATUS_DONE, STATUS_FAILED, TASK_ANALYZE
from contract.results import ResultStore
from contract.settings import Settings
from producer.client import Client
from tests.tcpproxy import proxied_pg
from tests.test_undeliverable import untagged
from worker import kombu_redis
from worker.kombu_redis import Undeliverable

pytestmark = pytest.mark.slow

def _wait_for(what: str, check: Any, worker: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}:\n{worker.log()}"
        assert worker.proc.poll() is None, worker.log()
        time.sleep(0.1)  # polling a condition


def test_parked_items_get_their_failed_rows_once_the_database_is_back(
        pg_url: str, redis_url: str, tmp_path: Path, worker_factory: Any) -> None:
    """Two undeliverable task messages parked while the database is cut: no row can be
    written, the items stay on the side list, the worker goes on. Once the database is
    reachable again, with no other message to flush, each of their tasks gets its one
    ``failed`` row (written once: ``attempts`` 1), and the worker still serves tasks."""
    direct = ResultStore.from_url(pg_url)
    direct.create_schema()
    proxy, proxied = proxied_pg(pg_url)
    s = Settings(broker_url=redis_url, database_url=proxied, model="null",
                 queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                 max_wait_ms=20)
    queue = lane_queue(s, bulk=False)
    side = queue + kombu_redis.UNDELIVERABLE_SUFFIX
    r = redis.Redis.from_url(redis_url)
    ids = [f"park-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    try:
        worker = worker_factory(s)
        proxy.down()
        r.lpush(queue, untagged(queue, s.queue, "celery-1", [
            {"id": ids[0], "text": "the hotel is good", "source": "crawler"},
            {"id": ids[1], "text": "the room is dirty"}]))
        _wait_for("the first item parked (its rows tried, in vain)",
                  lambda: f"moved to {side}" in worker.log(), worker)
        r.lpush(queue, untagged(queue, s.queue, "celery-2", [
            {"id": ids[2], "text": "the staff were kind"}]))
        _wait_for("the second item parked", lambda: r.llen(side) == 2, worker)
        time.sleep(2)  # a retry during the outage finds it still down
        assert direct.get_many(ids) == {}, "nothing can be written during the outage"

        proxy.up()
        _wait_for("the failed rows written", lambda: len(direct.get_many(ids)) == 3, worker,
                  timeout=30)
        rows = direct.get_many(ids)
        for task in ids:
            assert rows[task].status == STATUS_FAILED and rows[task].attempts == 1
            assert rows[task].error == (
                "undeliverable message: kombu cannot make a message of it (KeyError: "
                f"'delivery_tag'); the raw item is kept on {side}")
        assert rows[ids[0]].source == "crawler"
        with Client(s.replace(database_url=pg_url)) as client:
            task_id = client.submit("the coffee was cold")
            assert client.wait([task_id], timeout=30)[task_id].status == STATUS_DONE
        time.sleep(1)  # a second write of the same rows would come with the next flushes
        again = direct.get_many(ids)
        assert all(again[task].attempts == 1 for task in ids), "a failed row written twice"
        assert r.llen(side) == 2 and r.llen(queue) == 0
        log = worker.log()
        assert "failed rows of 2 parked item(s) stored" in log, log
    finally:
        proxy.close()
        direct.close()
        r.close()


def _parked(task_id: str, items: list[dict[str, Any]], pad: int = 0) -> Undeliverable:
    """What the transport hands the worker for an undeliverable task message (``pad``: bytes
    more of raw item, what the memory bound counts)."""
    body = [[items], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    raw = json.dumps({"headers": {"id": task_id}, "body": body, "pad": "x" * pad}).encode()
    return Undeliverable("q", raw, "KeyError: 'delivery_tag'", "q.undeliverable",
                         {"id": task_id, "task": TASK_ANALYZE}, body)


def test_waiting_parked_items_are_bounded_and_written_once(
        pg_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """In process, on PostgreSQL behind a cut proxy: the first parked item costs the commit's
    retries, the next ones join it untried; past the bounds the oldest is let go (and
    said so), an item larger than the bound alone is not kept; a try while the database
    is down keeps them and backs off. Once it answers, the next flush that writes rows
    writes theirs too, each once: a later try or flush writes nothing again."""
    from celery import Celery

    from tests.test_long_texts import _QueuedRequest
    from worker import tasks
    from worker.flush import FlushProcessor
    from worker.runner import NullRunner

    direct = ResultStore.from_url(pg_url)
    direct.create_schema()
    proxy, proxied = proxied_pg(pg_url)
    s = Settings(database_url=proxied, model="null")
    store = ResultStore.from_url(proxied)
    proc = FlushProcessor(NullRunner(), store, s, "t@h", hold_windows=True)
    task = tasks.register_tasks(Celery("t", broker="memory://"), proc, s)
    task.deliveries = None
    monkeypatch.setattr(tasks, "UNSTORED_MAX", 2)
    monkeypatch.setattr(tasks, "UNSTORED_MAX_BYTES", 4_000)
    try:
        proxy.down()
        first = task.fail_undeliverable(_parked("c-1", [{"id": "p-1", "text": "good"}]))
        assert first is not None and "wait for the database" in first, first
        t0 = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="worker.tasks"):
            for i in (2, 3):
                out = task.fail_undeliverable(_parked(f"c-{i}", [{"id": f"p-{i}", "text": "ok"}]))
                assert out is not None and "unavailable at the last try" in out, out
            big = task.fail_undeliverable(_parked("c-big", [{"id": "p-big", "text": "x"}],
                                                  pad=5_000))
        assert time.monotonic() - t0 < 1, "a parked item waited for the commit's retries"
        assert big is not None and "too large" in big, big
        assert "1 parked item(s) let go without their failed rows" in caplog.text
        assert [u.mid for u in task._unstored.values()] == ["c-2", "c-3"]
        task._retry_unstored()  # still down: kept, the next try later
        assert len(task._unstored) == 2 and task._retry_at is not None
        assert task._retry_at > time.monotonic()

        proxy.up()
        task.flush([_QueuedRequest("m-1", [{"id": "live", "text": "fine"}])])
        ids = ["p-1", "p-2", "p-3", "p-big", "live"]
        rows = direct.get_many(ids)
        assert sorted(rows) == ["live", "p-2", "p-3"]
        assert rows["p-2"].status == rows["p-3"].status == STATUS_FAILED
        assert task._unstored == {} and task._retry_at is None
        task._retry_unstored()
        task.flush([_QueuedRequest("m-2", [{"id": "live-2", "text": "fine"}])])
        again = direct.get_many(ids)
        assert {k: r.attempts for k, r in again.items()} == {"live": 1, "p-2": 1, "p-3": 1}
    finally:
        proxy.close()
        store.close()
        direct.close()
