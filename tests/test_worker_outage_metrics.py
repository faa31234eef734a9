"""A worker's ``/metrics`` shows a database outage, requeued and dead-lettered messages.

Found by an operator's audit of the README: during a PostgreSQL outage
both workers' ``/metrics`` looked normal (``bertstream_worker_up 1``, the item counters
merely stopped), and no metric counted the messages requeued or dead-lettered: an
operator had to read the logs. Real worker processes, real Redis, a real PostgreSQL cut
by a TCP proxy (tests/tcpproxy.py) or refusing rows by a trigger.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.results import DbTimeouts, ResultStore
from contract.settings import Settings
from tests.tcpproxy import proxied_pg
from tests.test_pipeline import publish_raw, wait_rows
from tests.test_poison import _refuse_rows
from worker.process import free_port


def _sample(text: str, name: str, labels: str = "") -> float | None:
    """The value of sample ``name{labels}`` in a scrape, None when absent."""
    head = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(head + " "):
            return float(line.split()[1])
    return None


def _requeued(text: str, reason: str) -> float | None:
    return _sample(text, "bertstream_requeued_messages_total", f'reason="{reason}"')


def _wait_log(worker: Any, needle: str, offset: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in worker.log_since(offset):
        assert worker.proc.poll() is None, worker.log()
        assert time.monotonic() < deadline, f"no {needle!r} in the log:\n{worker.log()}"
        time.sleep(0.1)


def _settings(redis_url: str, database_url: str, tmp_path: Path, **kw: Any) -> Settings:
    return Settings(broker_url=redis_url, database_url=database_url, model="null",
                    queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                    metrics_port=free_port(), max_wait_ms=20, **kw)


def _item(task_id: str, text: str) -> dict[str, Any]:
    return {"id": task_id, "text": text, "submitted_at": time.time()}


@pytest.mark.slow
def test_a_database_outage_reads_database_up_0_and_counts_the_requeued_messages(
        redis_url: str, pg_url: str, tmp_path: Path, worker_factory: Any) -> None:
    """Proxy down: the worker's commits fail, it requeues the message; its scrape says
    ``bertstream_database_up 0`` and counts the requeues under ``reason="database"``.
    Proxy up: the row is stored and ``bertstream_database_up`` is 1 again."""
    direct = ResultStore.from_url(pg_url)
    direct.create_schema()
    proxy, proxied = proxied_pg(pg_url)
    s = _settings(redis_url, proxied, tmp_path, db_connect_timeout_s=1,
                  db_statement_timeout_s=2)
    try:
        worker = worker_factory(s)
        publish_raw(s, [[_item("before", "the hotel is good")]])
        wait_rows(direct, ["before"])
        text = worker.metrics_text()
        assert _sample(text, "bertstream_database_up") == 1, text
        assert _requeued(text, "database") == 0, text
        assert _sample(text, "bertstream_worker_up") == 1, text

        offset = worker.log_size()
        proxy.down()
        publish_raw(s, [[_item("during", "the room was dirty")]])
        _wait_log(worker, "database unavailable, requeueing", offset)
        # Counted once put back, after the requeue's pause (the line comes before it).
        deadline = time.monotonic() + 30
        while not _requeued(text := worker.metrics_text(), "database"):
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        requeued = _requeued(text, "database") or 0
        assert _sample(text, "bertstream_database_up") == 0, text
        assert _requeued(text, "refused") == 0, text
        assert _sample(text, "bertstream_dead_lettered_messages_total") == 0, text
        # The worker still consumes: Redis answers, only the database is away.
        assert _sample(text, "bertstream_worker_up") == 1, text

        proxy.up()
        assert wait_rows(direct, ["during"], timeout=90)["during"].attempts == 1
        deadline = time.monotonic() + 30
        while _sample(text := worker.metrics_text(), "bertstream_database_up") != 1:
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert (_requeued(text, "database") or 0) >= requeued, text
    finally:
        proxy.close()
        direct.close()


@pytest.mark.slow
def test_rows_the_database_refuses_count_as_requeued_then_dead_lettered(
        redis_url: str, pg_url: str, tmp_path: Path, worker_factory: Any) -> None:
    """A message whose rows the database refuses in every form (a trigger) is requeued
    (``reason="refused"``) once per delivery up to ``max_attempts``, then dead-lettered:
    each counted once; the database answered all along (``bertstream_database_up 1``)."""
    store = ResultStore.from_url(pg_url)
    store.create_schema()
    bad = "the database refuses this text in every form"
    _refuse_rows(store, sha=hashlib.sha256(bad.encode()).hexdigest())
    s = _settings(redis_url, pg_url, tmp_path, max_attempts=2)
    try:
        worker = worker_factory(s)
        offset = worker.log_size()
        publish_raw(s, [[_item("refused-1", bad)]], task_id="refused-msg")
        _wait_log(worker, "dead-lettering message refused-msg after 3 deliveries", offset)
        publish_raw(s, [[_item("after", "the hotel is good")]])
        wait_rows(store, ["after"])  # the dead-letter's flush is over: it came first
        text = worker.metrics_text()
        assert _requeued(text, "refused") == 2, text  # deliveries 1 and 2
        assert _sample(text, "bertstream_dead_lettered_messages_total") == 1, text
        assert _requeued(text, "database") == 0, text
        assert _sample(text, "bertstream_database_up") == 1, text
    finally:
        store.close()


def test_requeue_reasons_stay_a_fixed_set() -> None:
    """The ``reason`` label takes only :data:`REQUEUE_REASONS` (bounded cardinality): an
    unknown reason is logged, not made a series; an exception that stopped a flush is
    ``redis`` when Redis was unreachable or full, else ``error``."""
    from prometheus_client import generate_latest

    from worker.metrics import REQUEUE_REASONS, WorkerMetrics, count_requeued

    m = WorkerMetrics("default")
    count_requeued(m, "database", 3)
    count_requeued(m, "made-up", 1)
    count_requeued(m, redis.ConnectionError("gone"), 2)
    count_requeued(m, RuntimeError("bug"), 1)
    count_requeued(None, "database", 1)  # no metrics served: nothing, no error
    text = generate_latest(m.registry).decode()
    reasons = set(re.findall(r'bertstream_requeued_messages_total\{reason="([^"]*)"\}', text))
    assert reasons == set(REQUEUE_REASONS)
    assert _requeued(text, "database") == 3
    assert _requeued(text, "redis") == 2
    assert _requeued(text, "error") == 1
    # Not consuming yet, nor any heartbeat: down; no write failed: the database is up.
    assert _sample(text, "bertstream_worker_up") == 0
    assert _sample(text, "bertstream_database_up") == 1
    m.consuming(True)
    m.beat(True)
    assert _sample(generate_latest(m.registry).decode(), "bertstream_worker_up") == 1
    m.beat(False)
    assert _sample(generate_latest(m.registry).decode(), "bertstream_worker_up") == 0


def test_the_api_reads_a_database_outage_as_database_up_0(
        redis_url: str, pg_url: str) -> None:
    """The API's ``/metrics`` has ``bertstream_database_up``: 1 while the results database
    answers, 0 once it does not (the proxy cut), 1 again when it is back."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    direct = ResultStore.from_url(pg_url)
    direct.create_schema()
    proxy, proxied = proxied_pg(pg_url)
    s = Settings(broker_url=redis_url, database_url=proxied, api_tokens="t",
                 queue=f"bst-test-{uuid.uuid4().hex[:8]}", db_connect_timeout_s=2)

    def database_up(http: Any) -> float | None:
        r = http.get("/metrics", headers={"Authorization": "Bearer t"})
        assert r.status_code == 200, r.text
        return _sample(r.text, "bertstream_database_up")

    def until(http: Any, value: float) -> None:
        deadline = time.monotonic() + 30
        while (got := database_up(http)) != value:
            assert time.monotonic() < deadline, f"bertstream_database_up {got}, not {value}"
            time.sleep(0.5)

    try:
        with TestClient(create_app(s)) as http:
            until(http, 1)
            proxy.down()
            until(http, 0)
            assert _sample(http.get("/metrics", headers={"Authorization": "Bearer t"}).text,
                           "bertstream_redis_up") == 1  # only the database is away
            proxy.up()
            until(http, 1)
    finally:
        proxy.close()
        direct.close()


def test_a_silent_database_holds_no_scrape_and_runs_one_probe_at_a_time() -> None:
    """A database that accepts the connection and never answers: a scrape waits for the
    probe at most its short wait and reads 0, far within the database's own timeouts;
    later scrapes start no second probe while the first still hangs."""
    import threading

    from prometheus_client import CollectorRegistry, generate_latest

    from api.metrics import DatabaseProbe
    from contract.results import DbTimeouts
    from tests.tcpproxy import SilentListener

    silent = SilentListener()
    url = f"postgresql+psycopg://postgres@127.0.0.1:{silent.port}/test"
    store = ResultStore.from_url(url, DbTimeouts.from_settings(
        Settings(database_url=url, db_connect_timeout_s=60, db_statement_timeout_s=60)))
    registry = CollectorRegistry()
    registry.register(DatabaseProbe(lambda: store, wait_s=0.5, every_s=0))
    try:
        for _ in range(3):
            began = time.monotonic()
            text = generate_latest(registry).decode()
            assert time.monotonic() - began < 30  # not the 60 s the database may take
            assert _sample(text, "bertstream_database_up") == 0, text
            probes = [t for t in threading.enumerate()
                      if t.name == "bertstream-database-probe"]
            assert len(probes) == 1
    finally:
        silent.close()
        store.close()


def test_an_idle_worker_reads_database_up_1_once_a_select_1_answers_after_the_outage(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose outage requeues were committed by another worker once the database
    came back (the usual case on a scaled-out queue) writes nothing more: only a
    successful write cleared its outage, so it read ``bertstream_database_up 0`` for as
    long as it stayed idle, an alert that never cleared. Now, with no outage requeue for
    a few seconds, a ``SELECT 1`` that answers turns it to 1; while the database is still
    away (the proxy cut) it stays 0, and a new requeue for an outage sets it back to 0."""
    import logging

    from prometheus_client import generate_latest

    import worker.metrics as wm
    from worker.flush import OutageLog

    monkeypatch.setattr(wm, "DATABASE_QUIET_S", 0.5)
    monkeypatch.setattr(wm, "DATABASE_PROBE_EVERY_S", 0.0)
    direct = ResultStore.from_url(pg_url)
    direct.create_schema()
    proxy, proxied = proxied_pg(pg_url)
    store = ResultStore.from_url(proxied, DbTimeouts.from_settings(
        Settings(database_url=proxied, db_connect_timeout_s=1, db_statement_timeout_s=2)))
    m = wm.WorkerMetrics("default")
    outage = OutageLog()
    m.watch_database(outage, store)

    def up() -> float | None:
        return _sample(generate_latest(m.registry).decode(), "bertstream_database_up")

    try:
        assert up() == 1
        proxy.down()
        outage.note(logging.getLogger("test"), "requeue", logging.ERROR, "outage",
                    cause="cut", flushes=1, messages=1)  # what a flush's requeue notes
        wm.count_requeued(m, "database", 1)
        time.sleep(1)
        assert up() == 0  # the probe fails: still down
        proxy.up()
        deadline = time.monotonic() + 20
        while up() != 1:  # no write since: a SELECT 1 says the database is back
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert outage.began is not None  # the outage's log line still waits for a write
        wm.count_requeued(m, "database", 1)  # a requeue for an outage again: down again
        assert up() == 0
    finally:
        proxy.close()
        store.close()
        direct.close()
