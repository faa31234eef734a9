"""Redelivered messages in one flush during a database outage: one retry, not one per message.

A redelivered message (its worker died, or its rows could not be written) is
processed alone, one group of the flush each. During a database outage each
group used to go through the commit's retries in turn, the event loop
blocked all along, so the flush's other deliveries were not renewed in the
unacked index: another worker's visibility sweep restored them as a dead
worker's, and they came back as extra deliveries, counted towards
``max_attempts`` (dead-lettered without ever being tried: false ``failed``
rows). Now the first group that meets the outage ends the flush: the
groups not yet tried go back to the queue untried, their delivery not
counted; and before each redelivered group the deliveries still waiting
are renewed, which a slow database (no outage) needs as well. The worker
reaches PostgreSQL through a TCP proxy the test cuts, as in
tests/test_outage.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.broker import lane_queue, make_celery
from contract.constants import DELIVERY_KEY_PREFIX, STATUS_DONE, TASK_ANALYZE
from contract.results import ResultStore
from contract.settings import Settings
from tests.outage_helpers import in_process_outage
from tests.tcpproxy import proxied_pg
from tests.test_pipeline import wait_rows
from tests.test_poison import _refuse_rows
from tests.test_poison_worker import wait_broker_idle

pytestmark = pytest.mark.slow

#: "2024-05-01 12:00:00,123 ERROR worker.tasks: database unavailable, requeueing 3 ..."
_REQUEUED = re.compile(r"^(\S+ \S+) ERROR worker\.tasks: database unavailable, requeueing (\d+)",
                       re.M)
_COMMIT_FAILED = re.compile(r"^(\S+ \S+) WARNING worker\.flush: commit failed \(attempt 1/", re.M)


def _at(stamp: str) -> float:
    return dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _publish(settings: Settings, messages: dict[str, list[dict[str, Any]]]) -> None:
    """One task message per id, with these items, on the bulk lane, over one connection."""
    app = make_celery(settings)
    try:
        for mid, items in messages.items():
            app.send_task(TASK_ANALYZE, args=[items], queue=lane_queue(settings, bulk=True),
                          task_id=mid)
    finally:
        app.close()


def _wait_for(what: str, check: Any, workers: list[Any], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}:\n" + "\n".join(w.log() for w in workers)
        time.sleep(0.05)  # polling a condition


def _one_flush_on_a(s: Settings, messages: dict[str, list[dict[str, Any]]], r: redis.Redis,
                    worker_factory: Any, before: Any) -> tuple[Any, Any]:
    """Workers A and B on ``s``; every message of ``messages``, delivered twice before (its
    count at 2), taken by A in one flush (``s.flush_every`` of them) while B is stopped
    (a blocked BLMOVE leaves the message queued); ``before()`` runs before they are
    published. B goes on once A holds them all: it sweeps the unacked index, and takes
    whatever its sweep restores."""
    a = worker_factory(s)
    b = worker_factory(s)
    b.proc.send_signal(signal.SIGSTOP)
    try:
        for mid in messages:
            r.set(DELIVERY_KEY_PREFIX + mid, 2, ex=3_600)
        before()
        _publish(s, messages)
        _wait_for("A takes every message", lambda: r.hlen("unacked") == len(messages), [a, b])
    finally:
        b.proc.send_signal(signal.SIGCONT)
    return a, b


def _seed(tag: str, redis_url: str, database_url: str, tmp_path: Path, *, count: int,
          visibility_timeout_s: int, poison_text: str | None = None,
          ) -> tuple[Settings, dict[str, list[dict[str, Any]]], list[str]]:
    """Settings for one flush of seven on the queue ``bst-test-<tag>`` (``max_attempts=3``);
    ``count`` messages of one healthy item each, and one of ``poison_text`` (its message
    and item id ``poison-<tag>``) where given; the healthy items' ids."""
    s = Settings(broker_url=redis_url, database_url=database_url, model="null",
                 queue=f"bst-test-{tag}", cache_dir=str(tmp_path / "cache"), flush_every=7,
                 max_wait_ms=1_000, visibility_timeout_s=visibility_timeout_s, max_attempts=3)
    now = time.time()
    messages = {f"m{i}-{tag}": [{"id": f"t{i}-{tag}", "text": f"the hotel is good {i}",
                                 "submitted_at": now}] for i in range(count)}
    if poison_text is not None:
        messages[f"poison-{tag}"] = [{"id": f"poison-{tag}", "text": poison_text,
                                      "submitted_at": now}]
    return s, messages, [f"t{i}-{tag}" for i in range(count)]


def test_redelivered_messages_wait_out_an_outage_uncounted(
        pg_url: str, redis_url: str, tmp_path: Path, worker_factory: Any) -> None:
    """Seven messages each delivered twice before (their count at 2 of ``max_attempts=3``:
    one more counted delivery dead-letters them), taken by worker A in one flush while
    the database refuses connections; worker B, on the same queue and the same database,
    sweeps the unacked index (visibility timeout 10 s). Within one group's commit retries
    A hands back every message of the flush. No message is restored by B's sweep,
    counted once more or dead-lettered; once the database is back each task is done
    once. One of them is a genuine poison (the database refuses its rows in every form):
    it is still dead-lettered after ``max_attempts`` deliveries."""
    direct = ResultStore.from_url(pg_url)
    direct.create_schema()
    poison_text = "the database refuses this text in every form"
    _refuse_rows(direct, sha=hashlib.sha256(poison_text.encode()).hexdigest())
    proxy, proxied = proxied_pg(pg_url)
    tag = uuid.uuid4().hex[:8]
    s, messages, healthy = _seed(tag, redis_url, proxied, tmp_path, count=6,
                                 visibility_timeout_s=10, poison_text=poison_text)
    r = redis.Redis.from_url(redis_url)
    try:
        a, b = _one_flush_on_a(s, messages, r, worker_factory, proxy.down)
        _wait_for("A's flush meets the outage", lambda: _COMMIT_FAILED.search(a.tail(1 << 30)),
                  [a, b])
        time.sleep(20)  # past the visibility timeout: B's sweeps run, the outage goes on
        assert direct.get_many(healthy) == {}, "nothing can be written during the outage"
        log_a, log_b = a.tail(1 << 30), b.tail(1 << 30)
        assert "dead-lettering" not in log_a + log_b, (
            f"a message counted once more during the outage:\n{log_a}\n{log_b}")
        first = _at(_COMMIT_FAILED.search(log_a).group(1))  # type: ignore[union-attr]
        handed_back = sum(int(n) for stamp, n in _REQUEUED.findall(log_a)
                          if _at(stamp) - first < 8)
        assert handed_back >= 7, (
            f"one group's commit retries (about 4 s) should hand back the whole flush; "
            f"{handed_back} of 7 in 8 s:\n{log_a}")

        proxy.up()
        rows = wait_rows(direct, healthy, timeout=60)
        _wait_for("the poison message dead-lettered",
                  lambda: "dead-lettering message poison-" in a.tail(1 << 30) + b.tail(1 << 30),
                  [a, b])
        wait_broker_idle(s)
        logs = a.tail(1 << 30) + b.tail(1 << 30)
    finally:
        proxy.close()
        r.close()
    try:
        assert all(row.status == STATUS_DONE for row in rows.values()), rows
        assert all(row.attempts <= s.max_attempts for row in rows.values()), rows
        assert direct.count() == len(healthy), "the poison has no row; no task has two"
    finally:
        direct.close()
    dead = re.findall(r"dead-lettering message (\S+) after (\d+) deliveries", logs)
    assert dead == [(f"poison-{tag}", "4")], f"dead-lettered: {dead}\n{logs}"
    assert "already done" not in logs, "a task was run again: a restored copy"
    a.check_alive()
    b.check_alive()


def test_slow_redelivered_groups_keep_the_rest_of_their_flush_visible(
        pg_url: str, redis_url: str, tmp_path: Path, worker_factory: Any) -> None:
    """No outage, a slow database: each insert takes 1.5 s (a trigger), so the seven
    redelivered messages of A's flush, one group each, take longer together than the
    visibility timeout (6 s). Before each group the deliveries still waiting are
    renewed: B's sweep restores none, none is counted once more (dead-lettered), each
    task is done once, at the delivery it was on."""
    direct = ResultStore.from_url(pg_url)
    direct.create_schema()
    with direct.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION slow_insert() RETURNS trigger AS $$ BEGIN "
            "PERFORM pg_sleep(1.5); RETURN NEW; END $$ LANGUAGE plpgsql")
        conn.exec_driver_sql("CREATE TRIGGER slow_insert BEFORE INSERT ON bertstream_results "
                             "FOR EACH ROW EXECUTE FUNCTION slow_insert()")
    s, messages, ids = _seed(uuid.uuid4().hex[:8], redis_url, pg_url, tmp_path, count=7,
                             visibility_timeout_s=6)
    r = redis.Redis.from_url(redis_url)
    try:
        t0 = time.monotonic()
        a, b = _one_flush_on_a(s, messages, r, worker_factory, lambda: None)
        rows = wait_rows(direct, ids, timeout=60)
        took = time.monotonic() - t0
        wait_broker_idle(s)
        logs = a.tail(1 << 30) + b.tail(1 << 30)
    finally:
        r.close()
        direct.close()
    assert took > s.visibility_timeout_s, "the flush must outlast the visibility timeout"
    assert {k: (v.status, v.attempts) for k, v in rows.items()} == {
        k: (STATUS_DONE, 3) for k in ids}, rows
    assert "dead-lettering" not in logs and "already done" not in logs, logs
    assert {row.worker for row in rows.values()} == {rows[ids[0]].worker}, "one flush on A"
    a.check_alive()
    b.check_alive()


@pytest.mark.parametrize("outage", ["refused", "silent"])
def test_one_flush_tries_one_group_during_an_outage(
        outage: str, pg_url: str, redis_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """In process, a flush of one first delivery and three redelivered messages while the
    database refuses connections, or accepts them and says nothing: one group meets the
    outage (one run of the commit's retries), and every other goes back to the queue at
    once, untried, its delivery count as it was before the flush. The group that met the
    outage has that delivery taken back (an outage is not the message's fault). Once the
    database answers, the same deliveries are all stored, each once."""
    from tests.test_long_texts import _QueuedRequest

    mids = ["fresh", "again-1", "again-2", "again-3"]

    def requests() -> list[Any]:
        return [_QueuedRequest(mid, [{"id": f"row-{mid}", "text": "the hotel is good"}])
                for mid in mids]

    with in_process_outage(pg_url, redis_url) as o:
        direct, proxy, store, task, r = o.direct, o.proxy, o.store, o.task, o.redis
        for mid in mids[1:]:
            r.set(DELIVERY_KEY_PREFIX + mid, 1, ex=3_600)  # delivered once before
        assert store.done_ids(["x"], model="null") == set()  # a pooled connection
        if outage == "silent":
            proxy.freeze()
        else:
            proxy.down()
        reqs = requests()
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING):
            task.flush(reqs)
        took = time.monotonic() - t0
        tried = caplog.text.count("commit failed (attempt 1/5)")
        assert tried == 1, f"{tried} groups went through the commit's retries:\n{caplog.text}"
        assert took < (10 if outage == "refused" else 40), took
        assert all(q.rejected is True and not q.acknowledged for q in reqs)
        counts = {mid: r.get(DELIVERY_KEY_PREFIX + mid) for mid in mids}
        assert counts == {"fresh": None, "again-1": b"1", "again-2": b"1", "again-3": b"1"}
        if outage == "silent":
            return  # a frozen proxy stays frozen
        proxy.up()
        task.flush(requests())
        rows = direct.get_many([f"row-{mid}" for mid in mids])
        assert {k: (v.status, v.attempts) for k, v in rows.items()} == {
            "row-fresh": (STATUS_DONE, 1), "row-again-1": (STATUS_DONE, 2),
            "row-again-2": (STATUS_DONE, 2), "row-again-3": (STATUS_DONE, 2)}
