"""A real database outage mid-stream: nothing lost, no duplicate rows, nothing dead-lettered.

The worker writes to PostgreSQL through a TCP proxy the test cuts: open
connections are reset and new ones refused for longer than the worker's
commit retries last, so flushes fail, their messages are requeued (never
acked), and once the database is reachable again every text gets exactly
one row.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from contract.constants import STATUS_DONE
from contract.results import ResultStore
from contract.settings import Settings
from producer.client import Client
from tests.tcpproxy import proxied_pg

pytestmark = pytest.mark.slow


def test_database_outage_loses_nothing(pg_url: str, redis_url: str, tiny_model_dir: Path,
                                       worker_factory: Any, tmp_path: Path) -> None:
    direct = ResultStore.from_url(pg_url)
    direct.create_schema()
    proxy, proxied = proxied_pg(pg_url)
    settings = Settings(broker_url=redis_url, database_url=proxied, queue="bst-outage",
                        cache_dir=str(tmp_path / "cache"), model=str(tiny_model_dir),
                        max_wait_ms=20, flush_every=8, bulk_chunk_size=20)
    texts = [f"the hotel room was very good {i}" for i in range(300)]
    try:
        worker = worker_factory(settings)
        with Client(settings.replace(database_url=pg_url)) as client:
            first = client.submit_many(texts[:100]).ids
            client.wait(first, timeout=60)

            proxy.down()
            second = client.submit_many(texts[100:]).ids  # Redis is fine: all enqueued
            time.sleep(7)  # past the commit's ~3 s of retries, so flushes are requeued
            assert direct.count() == 100, "nothing can be written during the outage"
            assert worker.proc.poll() is None, "the worker must survive the outage"

            proxy.up()
            rows = client.wait(first + second, timeout=120)
    finally:
        proxy.close()
        direct.close()
    recount = ResultStore.from_url(pg_url)
    try:
        assert len(rows) == len(texts) == recount.count()
    finally:
        recount.close()
    assert all(r.status == STATUS_DONE for r in rows.values())
    # requeued, not counted as failed deliveries: nothing was dead-lettered
    assert all(r.attempts == 1 for r in rows.values())
    log = worker.log()
    assert "commit failed" in log and "requeueing" in log
