"""A worker that cannot reach Redis at start tries for a bounded time, then exits 3.

It used to retry "Cannot connect to redis://..." for ever (Celery's connection retry at
start), while ``worker --help`` promises exit 3 for Redis unreachable and an
unreachable database exits 3 at once. Now it tries for ``BERTSTREAM_BROKER_START_WAIT_S``
(a line per try), so a Redis started a little later is still waited for, and then
exits 3 with one line naming the URL, its password masked.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from contract.constants import STATUS_DONE
from contract.settings import Settings
from producer.client import Client
from worker.process import free_port, settings_env

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_a_worker_that_cannot_reach_redis_exits_3_after_its_start_wait(
        sqlite_url: str, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"redis://:secretpw@127.0.0.1:{port}/16"
    settings = Settings(broker_url=url, database_url=sqlite_url, model="null",
                        cache_dir=str(tmp_path), broker_start_wait_s=2)
    started = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-m", "worker", "--device", "cpu"],
                             env=settings_env(settings), capture_output=True, text=True,
                             timeout=45, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the worker still retried after 45 s: {str(exc.stderr)[-1500:]}")
    took = time.monotonic() - started
    assert out.returncode == 3, out.stderr[-3000:]
    assert "secretpw" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    masked = f"redis://:***@127.0.0.1:{port}/16"
    assert len(errors) == 1 and errors[0].startswith(
        f"error: cannot reach Redis at {masked} (tried "), out.stderr[-3000:]
    assert "in 2 s, BERTSTREAM_BROKER_START_WAIT_S)" in errors[0]
    assert out.stderr.rstrip().splitlines()[-1] == errors[0]  # the last word, no traceback
    tries = [line for line in out.stderr.splitlines()
             if f"cannot reach Redis at {masked}" in line and "failed, next in" in line]
    assert len(tries) >= 2, out.stderr[-3000:]
    assert took < 30


def test_a_worker_waits_for_a_redis_that_starts_a_little_later(
        redis_server: Any, sqlite_url: str, tmp_path: Path, worker_factory: Any) -> None:
    """As in a stack brought up again: the worker comes up once Redis does, and serves."""
    settings = Settings(broker_url=redis_server.url, database_url=sqlite_url, model="null",
                        queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path),
                        max_wait_ms=20, broker_start_wait_s=60)
    redis_server.stop()
    worker = worker_factory(settings, ready=False)
    deadline = time.monotonic() + 30
    while "cannot reach Redis" not in worker.log():
        assert time.monotonic() < deadline, worker.log()
        time.sleep(0.2)
    redis_server.start()
    worker.wait_ready(60)
    with Client(settings) as client:
        task_id = client.submit("Redis came up after the worker")
        assert client.wait([task_id], timeout=30)[task_id].status == STATUS_DONE
    assert "MAX_WAIT_MS" not in worker.log()  # 20 ms against 300 s: nothing to warn of


def test_a_max_wait_past_the_visibility_timeout_is_warned_of_at_start(
        redis_url: str, sqlite_url: str, tmp_path: Path, worker_factory: Any) -> None:
    """Allowed (buffered messages are renewed), but then only the renewals keep a buffered
    message from redelivery: the worker says so once, naming both values."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url, model="null",
                        queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path),
                        max_wait_ms=3_000, visibility_timeout_s=3)
    worker = worker_factory(settings)
    [line] = [line for line in worker.log().splitlines() if "MAX_WAIT_MS" in line]
    assert "WARNING" in line
    assert ("BERTSTREAM_MAX_WAIT_MS=3000 is not below BERTSTREAM_VISIBILITY_TIMEOUT_S=3 "
            "(3000 ms)") in line


def test_a_worker_that_loses_redis_later_reconnects_past_its_start_wait(
        redis_server: Any, sqlite_url: str, tmp_path: Path, worker_factory: Any) -> None:
    """The bound is for the start only: Redis away four times longer than it, after the
    worker consumed, and the worker reconnects and serves as before (Celery's retry)."""
    settings = Settings(broker_url=redis_server.url, database_url=sqlite_url, model="null",
                        queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path),
                        max_wait_ms=20, broker_start_wait_s=1)
    worker = worker_factory(settings)
    redis_server.stop()
    time.sleep(4)
    assert worker.proc.poll() is None, worker.log()
    redis_server.start()
    with Client(settings) as client:
        task_id = client.submit("Redis came back")
        assert client.wait([task_id], timeout=60)[task_id].status == STATUS_DONE
    assert worker.proc.poll() is None
