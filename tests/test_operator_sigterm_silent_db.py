"""SIGTERM while the database has gone silent (a hung host, a partition, a failover whose
old address drops packets).

The warm shutdown waited for the running flush's commit to spend all five of its
attempts, each up to the connect timeout or the statement guard: with the default
timeouts over a minute, past Kubernetes' 30 s grace period and the 60 s the systemd unit
and compose give. The SIGKILL that followed left the flush's messages unacked until the
visibility timeout, and their next delivery counted towards dead-lettering. Once a warm
shutdown is asked for, a commit that meets the outage is not retried: its messages go
back to the queue at once, uncounted, and the worker exits 0. A cold shutdown (SIGQUIT,
or SIGTERM under Celery's ``REMAP_SIGTERM=SIGQUIT``) gives up the same way.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import redis

from contract.broker import lane_queue
from contract.constants import STATUS_DONE
from contract.results import ResultStore
from contract.settings import Settings
from producer.client import Client
from tests.polling import until
from tests.tcpproxy import TcpProxy, proxied_pg

pytestmark = pytest.mark.slow


@pytest.fixture
def proxy(pg_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A proxy in front of the test PostgreSQL, and the database URL through it."""
    p, url = proxied_pg(pg_url)
    try:
        yield p, url
    finally:
        p.close()


class Stopped(NamedTuple):
    """What a worker stopped during a database outage left: its exit code, its log since
    the outage, the queue's length and the unacked count then, and the rows once the
    database came back and a fresh worker served the queue."""

    code: int
    after: str
    queued: int
    unacked: int
    rows: dict[str, Any]


def _stop_during_a_silent_database(prefix: str, redis_url: str, tiny_model_dir: Any,
                                   pg_url: str, proxy: tuple[TcpProxy, str],
                                   worker_factory: Any, tmp_path: Path) -> Stopped:
    """A worker on a queue named ``prefix``-..., stored 40 texts; the database silenced,
    40 more sent, the worker stopped once its commit is retried; then the database back
    and a fresh worker started."""
    tcp, url = proxy
    s = Settings(broker_url=redis_url, database_url=url, queue=f"{prefix}-{uuid.uuid4().hex[:8]}",
                 cache_dir=str(tmp_path / "cache"), model=str(tiny_model_dir),
                 bulk_chunk_size=10, db_connect_timeout_s=2, db_statement_timeout_s=2)
    worker = worker_factory(s)
    r = redis.Redis.from_url(s.broker_url)
    store = ResultStore.from_url(pg_url)
    try:
        with Client(s) as client:
            ids = client.submit_many([f"before the outage {i}" for i in range(40)]).ids
            until(lambda: store.count() == 40, 60, "the first texts stored")
            mark = worker.log_size()
            tcp.freeze()
            ids += client.submit_many([f"during the outage {i}" for i in range(40)]).ids
            until(lambda: "commit failed (attempt 1/5)" in worker.log_since(mark), 60,
                  "the worker retrying its commit")
            code = worker.stop(timeout=120)
            after = worker.log_since(mark)
            queued, unacked = r.llen(lane_queue(s, bulk=True)), r.hlen("unacked")
            tcp.thaw()
            worker_factory(s)
            rows = client.wait(ids, timeout=60)
    finally:
        store.close()
        r.close()
    return Stopped(code, after, queued, unacked, rows)


def test_sigterm_does_not_wait_out_the_commit_retries_against_a_silent_database(
        redis_url: str, tiny_model_dir: Any, pg_url: str, proxy: tuple[TcpProxy, str],
        worker_factory: Any, tmp_path: Path) -> None:
    code, after, queued, unacked, rows = _stop_during_a_silent_database(
        "bst-term", redis_url, tiny_model_dir, pg_url, proxy, worker_factory, tmp_path)
    assert code == 0, after[-3000:]
    # the commit was not retried to the end: the shutdown did not wait it out
    assert "commit failed (attempt 3/5)" not in after, after[-3000:]
    assert queued == 4 and unacked == 0, (queued, unacked)
    assert all(row.status == STATUS_DONE and row.attempts == 1 for row in rows.values())


@pytest.mark.slow
def test_a_cold_shutdown_does_not_wait_out_the_commit_retries_either(
        redis_url: str, tiny_model_dir: Any, pg_url: str, proxy: tuple[TcpProxy, str],
        worker_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery's ``REMAP_SIGTERM=SIGQUIT`` (SIGTERM as a cold shutdown, as on platforms that
    kill soon after it) and SIGQUIT set ``should_terminate``, not ``should_stop``: the
    stop check missed them, and the shutdown waited out the commit's five attempts."""
    monkeypatch.setenv("REMAP_SIGTERM", "SIGQUIT")
    code, after, queued, unacked, rows = _stop_during_a_silent_database(
        "bst-cold", redis_url, tiny_model_dir, pg_url, proxy, worker_factory, tmp_path)
    assert "commit failed (attempt 3/5)" not in after, after[-3000:]
    assert "not retrying" in after, after[-3000:]
    assert code == 0, after[-3000:]
    assert queued == 4 and unacked == 0, (queued, unacked)
    assert all(row.status == STATUS_DONE and row.attempts == 1 for row in rows.values())
