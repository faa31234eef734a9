"""A full Redis (``maxmemory`` reached, ``noeviction``): it refuses every write, and then has
room again.

A worker holding messages keeps running: its acks, requeues, delivery counts, visibility
sweeps and heartbeats are refused and logged, never out of its event loop (a refused
requeue there ended the worker). Once Redis has room, every task ends with one row and
the same worker serves new ones. A producer gets one line that says Redis is full, and
nothing of its refused submit stays behind, so the same id goes through later.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from contract.broker import lane_queue
from contract.constants import RESULTS_TABLE, STATUS_DONE
from contract.errors import BrokerUnavailable
from contract.settings import Settings
from producer.client import Client
from tests.conftest import RedisServer
from tests.test_kombu_receive import memory_full
from tests.test_pipeline import wait_rows
from tests.test_poison_worker import wait_broker_idle
from worker.process import settings_env


def _full_settings(redis_server: RedisServer, tmp_path: Path, **kw: Any) -> Settings:
    return Settings(broker_url=redis_server.url, database_url=f"sqlite:///{tmp_path}/r.db",
                    queue="bst-full", cache_dir=str(tmp_path / "cache"), **kw)


def _queued(r: redis.Redis, settings: Settings) -> int:
    return sum(int(r.llen(lane_queue(settings, bulk))) for bulk in (True, False))


def _cpu_s(pid: int) -> float:
    """CPU seconds (user and system) the process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rows_per_id(settings: Settings) -> dict[str, int]:
    engine = sa.create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            return {str(i): int(n) for i, n in conn.execute(
                sa.text(f"SELECT id, count(*) FROM {RESULTS_TABLE} GROUP BY id"))}
    finally:
        engine.dispose()


def _full_error(exc: BaseException) -> None:
    text = str(exc)
    assert "\n" not in text, text
    assert "full" in text and "maxmemory" in text, text
    assert "cannot reach" not in text and "start it" not in text, text


def test_producer_refused_by_a_full_redis_says_so_and_leaves_nothing_behind(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """``submit``, ``submit_many`` and ``bertstream submit``: one line naming a full Redis
    and maxmemory (it said "cannot reach Redis ... start it with `redis-server`" of a
    server that runs), nothing queued; once Redis has room the same ids go through."""
    settings = _full_settings(redis_server, tmp_path)
    admin = redis.Redis.from_url(redis_server.url)
    cli = [sys.executable, "-c", "from producer.cli import main; main()", "submit"]
    try:
        with Client(settings) as client:
            with memory_full(admin):
                with pytest.raises(BrokerUnavailable) as one:
                    client.submit("hello", id="full-1")
                _full_error(one.value)
                with pytest.raises(BrokerUnavailable) as many:
                    client.submit_many(["a", {"text": "b", "id": "full-2"}], chunk_size=1)
                _full_error(many.value)
                assert many.value.sent == 0
                run = subprocess.run([*cli, "hello", "--id", "full-3"],
                                     env=settings_env(settings), capture_output=True,
                                     text=True, timeout=60)
                assert run.returncode == 3, run.stderr
                lines = run.stderr.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
                _full_error(Exception(lines[0]))
                assert _queued(admin, settings) == 0
            assert client.submit("hello", id="full-1") == "full-1"
            assert client.submit_many([{"text": "b", "id": "full-2"}]).ids == ["full-2"]
        run = subprocess.run([*cli, "hello", "--id", "full-3"], env=settings_env(settings),
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert _queued(admin, settings) == 3
    finally:
        admin.close()


@pytest.mark.slow
def test_a_worker_outlives_a_full_redis_and_serves_again_once_it_has_room(
        redis_server: RedisServer, tmp_path: Path, tiny_model_dir: Path,
        worker_factory: Any) -> None:
    """The worker's buffered messages are flushed while Redis is full: their delivery
    counts are refused (the flush fails) and so is their requeue, which Celery ran on the
    event loop, where the OOM reply ended the worker ("Unrecoverable error"); kombu's
    visibility sweep logged a traceback each round. Now: the same process, quiet and
    idle while full; once Redis has room the sweep restores what it held, and every
    task, refused ones resubmitted included, has exactly one row."""
    # A flush long after the first message (celery-batches' timer starts with it): the
    # messages wait in the buffer while Redis fills up. A short visibility timeout: the
    # sweep restores them soon after Redis has room.
    settings = _full_settings(redis_server, tmp_path, model=str(tiny_model_dir),
                              max_wait_ms=3000, visibility_timeout_s=4)
    worker = worker_factory(settings)
    admin = redis.Redis.from_url(redis_server.url)
    try:
        with Client(settings) as client:
            held = [client.submit(f"held text {i}") for i in range(5)]
            deadline = time.monotonic() + 10
            while admin.hlen("unacked") < len(held):  # received, waiting for the flush
                assert time.monotonic() < deadline, "the worker did not receive the tasks"
                time.sleep(0.01)
            offset, cpu0, t0 = worker.log_size(), _cpu_s(worker.pid), time.monotonic()
            with memory_full(admin):
                with pytest.raises(BrokerUnavailable) as refused:
                    client.submit("refused text", id="refused-1")
                _full_error(refused.value)
                deadline = time.monotonic() + 20
                while "reject of" not in worker.log_since(offset):
                    worker.check_alive()
                    assert time.monotonic() < deadline, worker.log_since(offset)
                    time.sleep(0.1)
                time.sleep(6)  # sweeps, heartbeats and receive retries while full
                worker.check_alive()
                cpu = _cpu_s(worker.pid) - cpu0
                full_s = time.monotonic() - t0
                assert cpu < full_s / 2, f"{cpu:.1f} s CPU in {full_s:.1f} s full"
                assert admin.hlen("unacked") == len(held)  # nothing lost
                assert _queued(admin, settings) == 0
            full_log = worker.log_since(offset)
            assert len(full_log) < 15_000, full_log[-3000:]
            again = client.submit("refused text", id="refused-1")
            after = [client.submit(f"after text {i}") for i in range(5)]
            done = wait_rows(client.store, [*held, again, *after], timeout=30)
        wait_broker_idle(settings, timeout=30)
        worker.check_alive()  # the same process, never restarted
    finally:
        admin.close()
    assert all(r.status == STATUS_DONE for r in done.values())
    per_id = _rows_per_id(settings)
    assert set(per_id) == {*held, "refused-1", *after}
    assert set(per_id.values()) == {1}
    log = worker.log_since(offset)
    assert "Unrecoverable error" not in log and "Error in timer" not in log, log[-3000:]


@pytest.mark.slow
def test_a_worker_started_on_a_full_redis_waits_for_room_then_exits_3_in_one_line(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """Celery's start failed on the refused writes (its queue declaration) with a
    traceback, exit 1. Now the start wait covers it: one line per try naming a full
    Redis, then exit 3 with one line."""
    settings = _full_settings(redis_server, tmp_path, model="null", broker_start_wait_s=2)
    admin = redis.Redis.from_url(redis_server.url)
    try:
        with memory_full(admin):
            out = subprocess.run([sys.executable, "-m", "worker", "--device", "cpu"],
                                 env=settings_env(settings), capture_output=True, text=True,
                                 timeout=45)
    finally:
        admin.close()
    assert out.returncode == 3, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    _full_error(Exception(errors[0]))
    assert out.stderr.rstrip().splitlines()[-1] == errors[0]  # the last word, no traceback
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "is full (maxmemory)" in out.stderr and "try 1 failed" in out.stderr


@pytest.mark.slow
def test_a_worker_started_on_a_full_redis_comes_up_once_it_has_room(
        redis_server: RedisServer, tmp_path: Path, worker_factory: Any) -> None:
    settings = _full_settings(redis_server, tmp_path, model="null", max_wait_ms=20,
                              broker_start_wait_s=60)
    admin = redis.Redis.from_url(redis_server.url)
    try:
        with memory_full(admin):
            worker = worker_factory(settings, ready=False)
            deadline = time.monotonic() + 30
            while "is full (maxmemory)" not in worker.log():
                worker.check_alive()
                assert time.monotonic() < deadline, worker.log()
                time.sleep(0.2)
        worker.wait_ready(timeout=60)
        with Client(settings) as client:
            task_id = client.submit("hello after the full start")
            assert client.wait([task_id], timeout=30)[task_id].status == STATUS_DONE
    finally:
        admin.close()
    assert "Traceback" not in worker.log()


@pytest.mark.slow
def test_a_worker_reconnecting_to_a_full_redis_keeps_running(
        redis_server: RedisServer, tmp_path: Path, worker_factory: Any) -> None:
    """Its connections drop while Redis is full (a restart of a proxy, a client kill):
    Celery declares the queues again, in commands a full Redis refuses (a MULTI of
    LLENs, SADDs of the bindings), and the worker ended ("Unrecoverable error"). Now it
    reconnects, waits, and serves once Redis has room."""
    settings = _full_settings(redis_server, tmp_path, model="null", max_wait_ms=20)
    worker = worker_factory(settings)
    admin = redis.Redis.from_url(redis_server.url)
    try:
        offset = worker.log_size()
        with memory_full(admin):
            assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
            deadline = time.monotonic() + 20
            while "Connected to" not in worker.log_since(offset):
                worker.check_alive()
                assert time.monotonic() < deadline, worker.log_since(offset)
                time.sleep(0.1)
            time.sleep(2)
            worker.check_alive()
        with Client(settings) as client:
            task_id = client.submit("hello after the reconnect")
            assert client.wait([task_id], timeout=30)[task_id].status == STATUS_DONE
        worker.check_alive()
    finally:
        admin.close()
    assert "Unrecoverable error" not in worker.log_since(offset)
