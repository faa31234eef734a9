"""A database outage logs its first flush in full, then little, then one line when it ends.

Each flush that meets an outage runs the commit's retries and requeues its
messages, about every four seconds, and each used to log every retry, the
requeue and the failed lookup of done ids: about a hundred lines a minute per
worker for as long as the outage lasted. Now the first flush of an outage is
logged in full (its cause at once), then each kind of line at most once a
minute, counting what happened since its last line, and one line says when
writes succeed again, how long the outage lasted and how many flushes it
requeued. The worker reaches PostgreSQL through a TCP proxy the test cuts, as
in tests/test_outage.py.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from contract.constants import RESULTS_TABLE, STATUS_DONE
from contract.results import ResultStore
from contract.settings import Settings
from producer.client import Client
from tests import test_db_refusals
from tests.tcpproxy import proxied_pg
from tests.test_db_refusals import WorkerRole
from worker.flush import OutageLog

#: One line of the worker's log at WARNING or above: "2024-05-01 12:00:00,123 ERROR ...".
_LOUD = re.compile(r"^\S+ \S+ (?:WARNING|ERROR|CRITICAL) ", re.M)
_RECOVERED = re.compile(r"database available again after (\d+) s; (\d+) flushes requeued "
                        r"meanwhile")
#: A role of the worker's own, which the test can refuse writes (tests/test_db_refusals.py).
worker_role = test_db_refusals.worker_role
#: Seconds the database stays cut: several flushes' worth of commit retries and requeues.
OUTAGE_S = 20


def _cut_for_a_while(worker: Any, client: Client, cut: Callable[[], None],
                     restore: Callable[[], None]) -> tuple[str, str, dict[str, Any]]:
    """One task stored; ``cut``; three tasks sent; :data:`OUTAGE_S` later ``restore``.
    Gives the worker's log during the outage, its log from the cut to the end (up to 10 s
    for the line of the end), and the rows of the three tasks."""
    client.wait(client.submit_many(["the hotel is good"]).ids, timeout=30)
    offset = worker.log_size()
    cut()
    ids = client.submit_many([f"the room was clean {i}" for i in range(3)]).ids
    time.sleep(OUTAGE_S)
    during = worker.log_since(offset)
    restore()
    rows = client.wait(ids, timeout=30)
    deadline = time.monotonic() + 10
    while not _RECOVERED.search(worker.log_since(offset)) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling a condition (asserted by the caller)
    return during, worker.log_since(offset), rows


def _check(during: str, after: str, rows: dict[str, Any], cause: str) -> None:
    """The first flush in full with ``cause``, a few lines in all, the line of the end."""
    assert all(r.status == STATUS_DONE and r.attempts == 1 for r in rows.values()), rows
    assert re.search(r"WARNING worker\.flush: commit failed \(attempt 1/5\), retrying in "
                     rf"\S+: .*{cause}", during), during
    assert re.search(r"ERROR worker\.tasks: database unavailable, requeueing \d+ message\(s\): "
                     rf".*{cause}", during), during
    loud = _LOUD.findall(during)
    assert len(loud) <= 8, f"{len(loud)} lines in {OUTAGE_S} s of outage:\n{during}"
    found = _RECOVERED.search(after)
    assert found, after
    took, requeued = int(found.group(1)), int(found.group(2))
    assert OUTAGE_S - 5 <= took <= OUTAGE_S + 15, found.group(0)
    assert requeued >= 3, f"flushes went on meeting the outage:\n{after}"


@pytest.mark.slow
def test_a_refused_connection_logs_its_first_flush_then_one_line_when_it_ends(
        pg_url: str, redis_url: str, tmp_path: Path, worker_factory: Any) -> None:
    """A real worker, its database refusing connections for a while, a few tasks queued:
    flush after flush meets the outage and requeues them, yet the log holds the first
    flush's lines (each retry, the requeue, their cause) and not one more per flush.
    Once the database is back the tasks are stored, each once, and one line says how
    long the outage lasted and how many flushes it requeued."""
    direct = ResultStore.from_url(pg_url)
    direct.create_schema()
    proxy, proxied = proxied_pg(pg_url)
    s = Settings(broker_url=redis_url, database_url=proxied, model="null",
                 queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                 max_wait_ms=20)
    try:
        worker = worker_factory(s)
        with Client(s.replace(database_url=pg_url)) as client:
            during, after, rows = _cut_for_a_while(worker, client, proxy.down, proxy.up)
    finally:
        proxy.close()
        direct.close()
    _check(during, after, rows, "Connection refused")
    worker.check_alive()


@pytest.mark.slow
def test_a_read_only_database_logs_its_first_flush_then_one_line_when_it_ends(
        worker_role: WorkerRole, pg_url: str, redis_url: str, tmp_path: Path,
        worker_factory: Any) -> None:
    """As above, the database turned read-only (reads go on, every write is refused)."""
    s = Settings(broker_url=redis_url, database_url=worker_role.url, model="null",
                 queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                 max_wait_ms=20)
    db = worker_role.database

    def cut() -> None:
        worker_role.sql(f"ALTER DATABASE {db} SET default_transaction_read_only = on")
        worker_role.terminate()  # its sessions begin again, read-only

    worker = worker_factory(s)
    with Client(s.replace(database_url=pg_url)) as client:
        during, after, rows = _cut_for_a_while(
            worker, client, cut,
            lambda: worker_role.sql(f"ALTER DATABASE {db} RESET default_transaction_read_only"))
    _check(during, after, rows, "read-only transaction")
    worker.check_alive()


@pytest.mark.slow
def test_a_revoked_write_privilege_logs_no_line_of_psycopg_per_flush(
        worker_role: WorkerRole, pg_url: str, redis_url: str, tmp_path: Path,
        worker_factory: Any) -> None:
    """As above, the worker's INSERT and UPDATE revoked for a while. Each failed commit
    also made psycopg log ``error ignored terminating <psycopg.Pipeline …>: pipeline
    aborted``, the pipeline's own end after the error the worker reports: one warning
    per attempt, past the outage's throttle."""
    s = Settings(broker_url=redis_url, database_url=worker_role.url, model="null",
                 queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                 max_wait_ms=20)
    name = worker_role.name
    worker = worker_factory(s)
    with Client(s.replace(database_url=pg_url)) as client:
        during, after, rows = _cut_for_a_while(
            worker, client,
            lambda: worker_role.sql(f"REVOKE INSERT, UPDATE ON {RESULTS_TABLE} FROM {name}"),
            lambda: worker_role.sql(f"GRANT INSERT, UPDATE ON {RESULTS_TABLE} TO {name}"))
    assert "error ignored terminating" not in during, during
    _check(during, after, rows, "permission denied")
    worker.check_alive()


class _Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _flush_meets_outage(outage: OutageLog, logger: logging.Logger, clock: _Clock,
                        cause: str) -> None:
    """What one flush meeting the outage reports: a failed lookup, four failed commit
    attempts, the requeue of its message, about four seconds in all."""
    outage.new_cycle()
    outage.note(logger, "lookup", logging.WARNING,
                "cannot look up done ids, running every item: %s", cause, cause=cause)
    for attempt in range(1, 5):
        outage.note(logger, "commit", logging.WARNING,
                    "commit failed (attempt %d/5), retrying in %.1fs: %s",
                    attempt, 0.2 * 2 ** (attempt - 1), cause, cause=cause)
        clock.now += 0.2 * 2 ** (attempt - 1)
    outage.note(logger, "requeue", logging.ERROR,
                "database unavailable, requeueing %d message(s): %s", 2, cause,
                cause=cause, flushes=1, messages=2)
    clock.now += 1


def test_each_kind_of_line_comes_once_a_minute_with_what_happened_since(
        caplog: pytest.LogCaptureFixture) -> None:
    """Two and a half minutes of flushes meeting an outage: the first flush's six lines,
    then per kind one line a minute counting the failures or requeued flushes and
    messages since its last one, with the latest cause; then the line of the end."""
    clock = _Clock()
    outage = OutageLog(clock=clock)
    logger = logging.getLogger("tests.outage_log")
    with caplog.at_level(logging.INFO, logger="tests.outage_log"):
        _flush_meets_outage(outage, logger, clock, "connection refused")
        assert len(caplog.records) == 6, caplog.text
        caplog.clear()
        for n in range(36):
            _flush_meets_outage(outage, logger, clock, f"read-only transaction {n}")
        lines = caplog.messages
        assert len(lines) == 6, caplog.text  # two minutes: two lines of each kind
        requeues = [m for m in lines if "requeued" in m]
        assert len(requeues) == 2, lines
        assert re.search(r"database still unavailable after \d+ s: 1[4-6] flushes \(\d+ "
                         r"messages\) requeued since the last such line; the latest: "
                         r"read-only transaction \d+$", requeues[0]), requeues
        commits = [m for m in lines if m.startswith("commit failed")]
        assert re.search(r"^commit failed \d+ more times in \d+ s, the database still "
                         r"unavailable; the latest: read-only transaction \d+$",
                         commits[0]), commits
        caplog.clear()
        outage.recovered(logger)
        outage.recovered(logger)  # the next write: nothing more to say
    assert caplog.messages == [
        f"database available again after {36 * 4 + 4} s; 37 flushes requeued meanwhile "
        "(74 messages)"], caplog.text
    with caplog.at_level(logging.INFO, logger="tests.outage_log"):
        caplog.clear()
        _flush_meets_outage(outage, logger, clock, "connection refused")
    assert len(caplog.records) == 6, "a new outage: its first flush in full"


def test_an_outage_never_seen_to_end_is_forgotten_after_ten_quiet_minutes(
        caplog: pytest.LogCaptureFixture) -> None:
    """A worker that met an outage and then wrote nothing (idle, its messages committed by
    another worker) never saw it end: the next failure, hours later, was counted into it
    ("database still unavailable after <hours>") and not logged in full, and its requeue
    pause started at the longest. After ten quiet minutes it is another outage."""
    clock = _Clock()
    outage = OutageLog(clock=clock)
    logger = logging.getLogger("tests.outage_log")
    with caplog.at_level(logging.INFO, logger="tests.outage_log"):
        for _ in range(3):
            _flush_meets_outage(outage, logger, clock, "connection refused")
        assert outage.flushes == 3
        clock.now += 3 * 3600
        caplog.clear()
        _flush_meets_outage(outage, logger, clock, "connection refused")
    lines = caplog.messages
    assert re.fullmatch(r"no database failure for 108\d\d s: the outage that began \d+ s ago "
                        r"\(3 flushes requeued\) is taken as over, unseen by this worker, "
                        r"which wrote nothing since; this failure starts another",
                        lines[0]), lines
    assert len(lines) == 7, lines  # that line, then the new outage's first flush in full
    assert outage.flushes == 1  # the requeue pause starts again from its first step
    assert not any("still unavailable" in m for m in lines), lines
    # Within one outage, failures minutes apart (a silent server's timeouts) stay one.
    clock.now += 300
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tests.outage_log"):
        _flush_meets_outage(outage, logger, clock, "connection refused")
    assert outage.flushes == 2 and not any("taken as over" in m for m in caplog.messages)


def test_psycopg_pipeline_ends_show_when_its_logger_is_set_to_debug() -> None:
    """The filter hides only psycopg's pipeline-end warnings, and not from a worker run
    with ``--loglevel DEBUG`` (its logger then enabled for DEBUG)."""
    from worker.cli import quiet_pipeline_ends

    def record(msg: str, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord("psycopg", level, __file__, 1, msg, ("p", "e"), None)

    logger = logging.getLogger("psycopg")
    before = logger.level
    try:
        logger.setLevel(logging.INFO)
        assert not quiet_pipeline_ends(record("error ignored terminating %r: %s"))
        assert quiet_pipeline_ends(record("connection lost %r: %s"))
        assert quiet_pipeline_ends(record("error ignored terminating %r: %s", logging.ERROR))
        logger.setLevel(logging.DEBUG)
        assert quiet_pipeline_ends(record("error ignored terminating %r: %s"))
    finally:
        logger.setLevel(before)
