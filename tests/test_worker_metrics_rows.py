"""A worker's row counts in its metrics: every row it stored, and only those.

``bertstream_items_total`` and ``bertstream_flush_messages_total`` used to
miss the rows of refused (non-Celery) and dead-lettered messages, and to
count a second copy of an id that the store did not write.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.constants import DELIVERY_KEY_PREFIX, TASK_ANALYZE
from contract.results import ResultStore
from contract.settings import Settings
from tests.test_metrics import _samples
from tests.test_pipeline import publish_raw, wait_rows
from tests.test_poison_worker import _publish_message
from worker.app import build_runner
from worker.flush import FlushProcessor, derived_key
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
