"""A worker's row counts in its metrics: every row it stored, and only those.

``bertstream_items_total`` and ``bertstream_flush_messages_total`` used to
miss the rows of refused (non-Celery) and dead-lettered messages, and to
count a second copy of an id that the store did not write. Then they still
counted a row written twice in one flush (an early commit, then the end of
the flush) once per write, and a row that a done row already stored (by
another worker, or before a dead-letter) kept out.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import generate_latest

from contract.constants import DELIVERY_KEY_PREFIX, TASK_ANALYZE
from contract.results import ResultStore
from contract.settings import Settings
from tests.test_metrics import _samples
from tests.test_pipeline import publish_raw, wait_rows
from tests.test_poison_worker import _publish_message
from worker import flush
from worker.app import build_runner
from worker.flush import FlushProcessor, FlushStats, derived_key
from worker.metrics import WorkerMetrics
from worker.process import free_port


@pytest.mark.slow
def test_refused_dead_lettered_and_duplicate_rows_are_counted_as_stored(
        redis_url: str, sqlite_url: str, tiny_model_dir: Path, worker_factory: Any) -> None:
    s = Settings(broker_url=redis_url, database_url=sqlite_url, model=str(tiny_model_dir),
                 queue=f"bst-test-{uuid.uuid4().hex[:8]}", max_wait_ms=20,
                 metrics_port=free_port())
    worker = worker_factory(s)
    now = time.time()
    r = redis.Redis.from_url(redis_url)
    try:
        # delivered max_attempts times already (its workers died): dead-lettered, 2 rows
        r.set(DELIVERY_KEY_PREFIX + "dead-1", s.max_attempts)
    finally:
        r.close()
    _publish_message(s, None, {"task": TASK_ANALYZE, "id": "null-body"})  # refused: 1 row
    publish_raw(s, [[{"id": "dl-a", "text": "good", "submitted_at": now},
                     {"id": "dl-b", "text": "bad", "submitted_at": now}]], task_id="dead-1")
    # "dup" twice: a failed copy, then a done one; the store keeps the done row only
    publish_raw(s, [[{"id": "dup", "text": "", "submitted_at": now},
                     {"id": "dup", "text": "the hotel is good", "submitted_at": now},
                     {"id": "ok-1", "text": "good", "submitted_at": now}]])
    store = ResultStore.from_url(s.database_url)
    try:
        rows = wait_rows(store, [derived_key("null-body", 0), "dl-a", "dl-b", "dup", "ok-1"])
    finally:
        store.close()
    assert [rows[k].status for k in ("dl-a", "dl-b", "dup", "ok-1")] == [
        "failed", "failed", "done", "done"]
    model = tiny_model_dir.name

    def count(status: str) -> float:
        return samples.get(("bertstream_items_total", (("model", model), ("source", ""),
                                                       ("status", status))), 0.0)

    deadline = time.monotonic() + 5
    while True:  # the metrics follow each commit: poll past that gap
        samples = _samples(worker.metrics_text())
        if (count("failed"), count("done")) == (3, 2) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (count("failed"), count("done")) == (3, 2)
    assert samples[("bertstream_flush_messages_total", ())] == 3
    # queue wait and end to end: the rows with a submission time (the refusal has none)
    assert samples[("bertstream_end_to_end_seconds_count", ())] == 4
    assert samples[("bertstream_queue_wait_seconds_count", ())] == 4


def test_a_dead_letter_has_its_start_time(tiny_model_dir: Path, store: ResultStore) -> None:
    """Its queue wait is measured to its own start, not to 1970 (0 s for every row)."""
    s = Settings(model=str(tiny_model_dir), database_url="sqlite://")
    processor = FlushProcessor(build_runner(s), store, s, worker_name="t@h")
    before = time.time()
    stats = processor.dead_letter(
        [("m", [[{"id": "a", "text": "good", "submitted_at": before}]])], "dead", 4)
    assert before <= stats.began <= time.time() and len(stats.rows) == 1
    refused = processor.refuse("m2", None, "not a request")
    assert before <= refused.began <= time.time() and len(refused.rows) == 1


def _items(*flushes: FlushStats) -> dict[str, float]:
    """``bertstream_items_total`` by status after the metrics observed ``flushes``."""
    metrics = WorkerMetrics("tiny")
    for stats in flushes:
        metrics.observe(stats)
    samples = _samples(generate_latest(metrics.registry).decode())
    return {dict(labels)["status"]: value for (name, labels), value in samples.items()
            if name == "bertstream_items_total"}


@pytest.mark.parametrize("first", ["failed", "done"])
def test_a_row_written_twice_in_one_flush_counts_once_with_its_final_status(
        poison_model_dir: Path, store: ResultStore, monkeypatch: pytest.MonkeyPatch,
        first: str) -> None:
    """Two copies of one id in two batches, the first committed early: a failed first
    copy is replaced by the done one (counted once, done: it used to count failed and
    done); a done first copy keeps the later failed one out (counted once, done: the
    failed copy used to count too)."""
    monkeypatch.setattr(flush, "EARLY_COMMIT_MIN_WAIT_S", 0.0)  # commit after each batch
    s = Settings(model=str(poison_model_dir), database_url="sqlite://", max_batch_size=1)
    processor = FlushProcessor(build_runner(s), store, s, worker_name="t@h")
    now = time.time()
    # batches run shortest first: the short copy is committed before the long one runs
    short, long = "poisonpill", "the hotel is good and the room is clean"
    if first == "done":
        short, long = "good", "poisonpill the hotel is good and the room is clean"
    stats = processor.process([("m", [[{"id": "dup", "text": short, "submitted_at": now},
                                       {"id": "dup", "text": long, "submitted_at": now}]])])
    assert stats.commits == 2 and stats.failed == 1
    row = store.get("dup")
    assert row is not None and row.status == "done"
    assert [status for status, *_ in stats.rows] == ["done"]
    assert _items(stats) == {"done": 1}


def test_a_row_another_worker_stored_done_meanwhile_is_not_counted(
        tiny_model_dir: Path, db_url: str, store: ResultStore) -> None:
    """Another worker stores the id done while this flush runs the model: the store keeps
    that row, and this flush counts only the row it wrote."""
    s = Settings(model=str(tiny_model_dir), database_url="sqlite://")
    runner = build_runner(s)
    now = time.time()
    raced = {"id": "raced", "text": "the hotel is good", "submitted_at": now}
    other_store = ResultStore.from_url(db_url)
    other = FlushProcessor(runner, other_store, s, worker_name="other@h")

    class OtherWorkerFirst:
        """The tiny model; while this flush tokenizes, the other worker commits ``raced``."""

        def __getattr__(self, name: str) -> Any:
            return getattr(runner, name)

        def encode(self, texts: list[str]) -> Any:
            if store.get("raced") is None:
                other.process([("m0", [[raced]])])
            return runner.encode(texts)

    try:
        processor = FlushProcessor(OtherWorkerFirst(), store, s,  # type: ignore[arg-type]
                                   worker_name="t@h")
        stats = processor.process([("m1", [[raced, {"id": "ok", "text": "good",
                                                    "submitted_at": now}]])])
    finally:
        other_store.close()
    row = store.get("raced")
    assert row is not None and row.status == "done" and row.worker == "other@h"
    assert stats.skipped == 0 and stats.items == 2  # the done row came after the check
    assert len(stats.rows) == 1 and _items(stats) == {"done": 1}  # "ok" alone


def test_a_dead_letter_of_an_id_already_done_counts_nothing(
        tiny_model_dir: Path, store: ResultStore) -> None:
    """A message dead-lettered after a worker stored its rows and died before its ack:
    the failed rows are kept out by the done ones, and not counted."""
    s = Settings(model=str(tiny_model_dir), database_url="sqlite://")
    processor = FlushProcessor(build_runner(s), store, s, worker_name="t@h")
    item = {"id": "k", "text": "the hotel is good", "submitted_at": time.time()}
    assert _items(processor.process([("m", [[item]])])) == {"done": 1}
    dead = processor.dead_letter([("m", [[item]])], "dead", 4)
    row = store.get("k")
    assert row is not None and row.status == "done" and row.attempts == 1
    assert dead.rows == [] and _items(dead) == {}
