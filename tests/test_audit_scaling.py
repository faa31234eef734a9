"""``bertstream_worker_up`` must say whether the worker consumes, as the README promises.

Found by an operator's audit of the README: its Monitoring table said
``bertstream_worker_up`` is "1 while the worker consumes", but the worker set it to
1 once, when its metrics server started (worker/metrics.py: WorkerMetrics.serve), before
it had reached Redis, and never set it back: a worker still waiting for Redis at start,
or one that lost Redis and was reconnecting, reported 1 while it took nothing off the
queue, so an alert on ``bertstream_worker_up == 0`` never fired.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from contract.settings import Settings
from worker.process import free_port

pytestmark = pytest.mark.slow


def _worker_up(text: str) -> float | None:
    """The value of ``bertstream_worker_up`` in a scrape, None when absent."""
    for line in text.splitlines():
        if line.startswith("bertstream_worker_up "):
            return float(line.split()[1])
    return None


def _scrape_when_served(worker: Any, timeout: float = 60.0) -> str:
    """The worker's first successful scrape (its endpoint comes up once the model loads)."""
    deadline = time.monotonic() + timeout
    while True:
        assert worker.proc.poll() is None, worker.log()
        try:
            return str(worker.metrics_text(timeout=2))
        except OSError:
            assert time.monotonic() < deadline, worker.log()
            time.sleep(0.2)


def test_worker_up_is_not_1_while_a_starting_worker_waits_for_redis(
        sqlite_url: str, tmp_path: Path, worker_factory: Any) -> None:
    """Redis not reachable at start: the worker retries for its start wait and consumes
    nothing, yet its endpoint is up; worker_up must not read 1 then."""
    settings = Settings(broker_url=f"redis://127.0.0.1:{free_port()}/13",  # nothing listens
                        database_url=sqlite_url, model="null", cache_dir=str(tmp_path),
                        queue=f"bst-test-{uuid.uuid4().hex[:8]}", metrics_port=free_port(),
                        broker_start_wait_s=60)
    worker = worker_factory(settings, ready=False)
    _scrape_when_served(worker)
    deadline = time.monotonic() + 30
    while "cannot reach Redis" not in worker.log():
        assert time.monotonic() < deadline, worker.log()
        time.sleep(0.2)
    text = str(worker.metrics_text())
    assert _worker_up(text) == 0, (
        "bertstream_worker_up does not read 0 while the worker has not reached Redis:\n"
        + worker.log()[-1500:])


def test_worker_up_drops_while_a_worker_has_lost_redis(
        redis_server: Any, sqlite_url: str, tmp_path: Path, worker_factory: Any) -> None:
    """A consuming worker whose Redis goes away reconnects for as long as it takes; while
    it does it consumes nothing, so worker_up must not read 1."""
    settings = Settings(broker_url=redis_server.url, database_url=sqlite_url, model="null",
                        queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path),
                        metrics_port=free_port(), max_wait_ms=20)
    worker = worker_factory(settings)
    assert _worker_up(str(worker.metrics_text())) == 1
    offset = worker.log_size()
    redis_server.stop()
    deadline = time.monotonic() + 40
    while "Cannot connect to" not in worker.log_since(offset):
        assert time.monotonic() < deadline, worker.log()
        time.sleep(0.2)
    text = str(worker.metrics_text())
    assert _worker_up(text) == 0, (
        "bertstream_worker_up does not read 0 while the worker cannot reach Redis:\n"
        + worker.log()[-1500:])
    # Redis back: the worker reconnects and consumes again, and says so.
    redis_server.start()
    deadline = time.monotonic() + 60
    while _worker_up(str(worker.metrics_text())) != 1:
        assert time.monotonic() < deadline, (
            "bertstream_worker_up stays 0 after Redis came back:\n" + worker.log()[-1500:])
        time.sleep(0.2)
