"""Scale-out is Celery's: several workers on one Redis and one database share
the work, and every task still ends as exactly one row."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from contract.constants import RESULTS_TABLE, STATUS_DONE
from contract.settings import Settings
from producer.client import Client

pytestmark = pytest.mark.slow

WORKERS = 3


def test_three_workers_share_the_work_and_store_each_task_once(
        settings: Settings, tiny_model_dir: Path, worker_factory: Any) -> None:
    # Small flushes and chunks: many messages, so each worker gets some.
    s = settings.replace(model=str(tiny_model_dir), flush_every=4, bulk_chunk_size=8,
                         max_wait_ms=20)
    workers = [worker_factory(s) for _ in range(WORKERS)]
    texts = [f"text number {i}, the room was clean" if i % 2 else f"第{i}条:服务很差"
             for i in range(1200)]
    with Client(s) as client:
        report = client.submit_many(texts)
        rows = client.wait(report.ids, timeout=180)
        with client.store.engine.connect() as conn:
            total, distinct = conn.execute(sa.text(
                f"SELECT count(*), count(DISTINCT id) FROM {RESULTS_TABLE}")).one()
            per_worker = dict(conn.execute(sa.text(
                f"SELECT worker, count(*) FROM {RESULTS_TABLE} GROUP BY worker")).all())
    assert total == distinct == len(texts)
    assert all(r.status == STATUS_DONE for r in rows.values())
    # Every worker stored some of them, recorded under its own name.
    assert set(per_worker) == {w.hostname for w in workers}, per_worker
    assert all(n > 0 for n in per_worker.values()), per_worker
    assert collections.Counter(r.worker for r in rows.values()) == per_worker
