"""A worker whose database goes silent keeps its messages from the visibility sweep.

A silent database accepts connections and answers nothing: each commit
attempt waits out the connect timeout or the statement guard, and the
commit's five attempts block the worker's event loop (and with it the
consumer timer that renews its deliveries in kombu's unacked index) far
longer than a short visibility timeout. Another worker's sweep then
restored the messages as a dead worker's, and their next delivery was
counted (dead-lettered with ``max_attempts=1``) though nothing had failed.
Now the processor renews the deliveries the worker holds, when due, before
each database operation. The worker reaches PostgreSQL through a TCP
proxy the test freezes (tests/tcpproxy.py).

Also here: a group that meets an outage has its delivery taken back, not
its count forgotten, so the deliveries counted before it still count.
"""

from __future__ import annotations

import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.constants import DELIVERY_KEY_PREFIX, STATUS_DONE
from contract.results import ResultStore
from contract.settings import Settings
from tests.outage_helpers import in_process_outage
from tests.tcpproxy import proxied_pg
from tests.test_pipeline import wait_rows
from tests.test_poison_worker import wait_broker_idle
from tests.test_worker_outage_redelivered import _publish, _wait_for

pytestmark = pytest.mark.slow

_REQUEUED = re.compile(r"^\S+ \S+ ERROR worker\.tasks: database unavailable, requeueing", re.M)


def test_a_silent_database_does_not_let_the_sweep_restore_the_flush(
        pg_url: str, redis_url: str, tmp_path: Path, worker_factory: Any) -> None:
    """Worker A takes five messages in one flush while its database is silent; worker B,
    on the same queue, sweeps the unacked index (visibility timeout 10 s,
    ``max_attempts=1``). A's commit retries outlast the timeout; all along no delivery
    is counted twice and B takes nothing: A keeps its deliveries renewed, then hands them
    back, uncounted. Once the database answers, every task is done once, at its first
    counted delivery."""
    direct = ResultStore.from_url(pg_url)
    direct.create_schema()
    proxy, proxied = proxied_pg(pg_url)
    tag = uuid.uuid4().hex[:8]
    s = Settings(broker_url=redis_url, database_url=proxied, model="null",
                 queue=f"bst-test-{tag}", cache_dir=str(tmp_path / "cache"),
                 flush_every=5, max_wait_ms=1_000, visibility_timeout_s=10, max_attempts=1,
                 db_connect_timeout_s=2, db_statement_timeout_s=1)
    now = time.time()
    messages = {f"m{i}-{tag}": [{"id": f"t{i}-{tag}", "text": f"the hotel is good {i}",
                                 "submitted_at": now}] for i in range(5)}
    ids = [f"t{i}-{tag}" for i in range(5)]
    r = redis.Redis.from_url(redis_url)
    try:
        a = worker_factory(s)
        b = worker_factory(s)
        b.proc.send_signal(signal.SIGSTOP)  # A takes every message in one flush
        try:
            proxy.freeze()
            t0 = time.monotonic()
            _publish(s, messages)
            _wait_for("A takes every message", lambda: r.hlen("unacked") == len(messages),
                      [a, b])
        finally:
            b.proc.send_signal(signal.SIGCONT)
        # Until A hands the flush back (its commit retries run out), no delivery may be
        # counted twice: that is another worker taking a message A still holds.
        most = 0
        while not _REQUEUED.search(a.tail(1 << 30)):
            counts = r.mget([DELIVERY_KEY_PREFIX + mid for mid in messages])
            most = max([most, *(int(n) for n in counts if n is not None)])
            assert most <= 1, f"a message was delivered again:\n{a.log()}\n{b.log()}"
            assert time.monotonic() - t0 < 60, f"A never handed back:\n{a.log()}\n{b.log()}"
            time.sleep(0.05)  # polling the counts
        took = time.monotonic() - t0
        log_b = b.tail(1 << 30)
        assert took > s.visibility_timeout_s + 2, (
            f"the retries ({took:.1f} s) must outlast the visibility timeout:\n{a.log()}")
        assert not re.search(r"done ids|commit failed|dead-letter|requeueing", log_b), (
            f"B took a message A held:\n{log_b}")

        proxy.thaw()
        rows = wait_rows(direct, ids, timeout=60)
        wait_broker_idle(s)
        logs = a.tail(1 << 30) + b.tail(1 << 30)
    finally:
        proxy.close()
        r.close()
    try:
        assert {k: (v.status, v.attempts) for k, v in rows.items()} == {
            k: (STATUS_DONE, 1) for k in ids}, rows
        assert direct.count() == len(ids)
    finally:
        direct.close()
    assert "dead-lettering" not in logs, logs
    a.check_alive()
    b.check_alive()


def test_an_outage_takes_back_the_delivery_and_keeps_the_earlier_ones(
        pg_url: str, redis_url: str) -> None:
    """In process: a message delivered once before (its worker died) meets a database
    outage on its second delivery. The outage's delivery is taken back, the earlier one
    still counts (a forgotten count made the next delivery a first one again: a poison
    message could escape dead-lettering, and run with batch-mates). Once the database
    answers, its row says two attempts."""
    from tests.test_long_texts import _QueuedRequest

    def request() -> Any:
        return _QueuedRequest("again", [{"id": "row-again", "text": "the hotel is good"}])

    with in_process_outage(pg_url, redis_url) as o:
        direct, proxy, task, r = o.direct, o.proxy, o.task, o.redis
        r.set(DELIVERY_KEY_PREFIX + "again", 1, ex=3_600)
        proxy.down()
        first = request()
        task.flush([first])
        assert first.rejected is True and not first.acknowledged
        assert r.get(DELIVERY_KEY_PREFIX + "again") == b"1", "the earlier delivery still counts"
        proxy.up()
        task.flush([request()])
        row = direct.get_many(["row-again"])["row-again"]
        assert (row.status, row.attempts) == (STATUS_DONE, 2)
