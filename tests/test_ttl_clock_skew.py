"""Task deadlines (``ttl_s``) when the producer's and the worker's hosts' clocks are apart.

A deadline from a ttl is stamped on the Redis server's clock when its message is
published, and the worker compares it with the server's clock: a producer or a worker
host off by two minutes neither expires a task with a one-minute ttl on arrival nor
runs it late. The skewed host has its clock moved (``time.time`` patched), a fault one
host cannot cause for real; Redis, the database and the worker are real.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.clock import ServerClock, server_time
from contract.constants import STATUS_DONE, STATUS_EXPIRED
from contract.errors import BrokerUnavailable
from contract.results import ResultStore
from contract.settings import Settings
from producer.client import Client
from tests.conftest import RedisServer
from tests.producer_helpers import broker_settings, invoke, lane_messages

#: Clock offsets of the skewed host: two minutes behind and ahead, and an hour.
SKEWS = [-3600.0, -120.0, 120.0, 3600.0]
#: The ttl of the tasks: shorter than every skew.
TTL_S = 60.0
#: How far a stamped deadline may be from the server's clock plus the ttl: the
#: round trips of a test on one host, far below any skew.
SLACK_S = 5.0


@contextlib.contextmanager
def host_clock(monkeypatch: pytest.MonkeyPatch, skew: float) -> Iterator[None]:
    """Inside the block this process's clock is ``skew`` seconds off."""
    real = time.time
    with monkeypatch.context() as patch:
        patch.setattr(time, "time", lambda: real() + skew)
        yield


@pytest.mark.parametrize("skew", SKEWS)
def test_a_skewed_producer_stamps_ttl_deadlines_on_the_server_clock(
        redis_url: str, sqlite_url: str, plain: redis.Redis, monkeypatch: pytest.MonkeyPatch,
        skew: float) -> None:
    """``submit`` and ``submit_many`` on a host whose clock is off send ``expires_at`` =
    the server's clock + ttl, whichever lane."""
    s = broker_settings(redis_url, sqlite_url)
    with Client(s) as client:
        before = server_time(plain)
        with host_clock(monkeypatch, skew):
            client.submit("one", ttl_s=TTL_S)
            client.submit_many(["two", "three"], ttl_s=TTL_S)
        after = server_time(plain)
    items = (lane_messages(redis_url, f"{s.queue}.interactive")[0]["items"]
             + lane_messages(redis_url, f"{s.queue}.bulk")[0]["items"])
    assert len(items) == 3
    for item in items:
        assert before + TTL_S - SLACK_S <= item["expires_at"] <= after + TTL_S + SLACK_S, (
            f"expires_at is {item['expires_at'] - before - TTL_S:+.1f} s off the server's "
            f"clock + ttl")


@pytest.mark.parametrize("skew", [-120.0, 120.0])
def test_the_cli_stamps_ttl_deadlines_on_the_server_clock(
        redis_url: str, sqlite_url: str, plain: redis.Redis, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    """``submit --ttl`` and ``stream --ttl`` on a host whose clock is off."""
    s = broker_settings(redis_url, sqlite_url)
    src = tmp_path / "in.txt"
    src.write_text("two\nthree\n", encoding="utf-8")
    before = server_time(plain)
    with host_clock(monkeypatch, skew):
        for args in (["submit", "--ttl", "60", "one"],
                     ["stream", str(src), "--ttl", "60", "--no-progress"]):
            result = invoke(args, s)
            assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    after = server_time(plain)
    items = [it for lane in ("interactive", "bulk")
             for m in lane_messages(redis_url, f"{s.queue}.{lane}") for it in m["items"]]
    assert len(items) == 3
    for item in items:
        assert before + TTL_S - SLACK_S <= item["expires_at"] <= after + TTL_S + SLACK_S


def test_ttl_publishes_ride_out_a_redis_restart(redis_server: RedisServer, sqlite_url: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis stops while a producer two minutes ahead submits with a ttl: the server's
    clock cannot be read, the publish retries as without a ttl, and every chunk is sent
    with its deadline on the server's clock (the offset read before the stop)."""
    s = Settings(broker_url=redis_server.url, database_url=sqlite_url, queue="bst-ttl-restart",
                 publish_retries=20, publish_retry_max_s=0.5, bulk_chunk_size=10)
    plain = redis.Redis.from_url(redis_server.url)
    try:
        with Client(s) as client, host_clock(monkeypatch, 120.0):
            before = server_time(plain)
            first = client.submit_many([f"before {i}" for i in range(20)], ttl_s=TTL_S).ids
            redis_server.stop()
            restart = threading.Timer(1.0, redis_server.start)
            restart.start()
            try:
                second = client.submit_many([f"after {i}" for i in range(20)],
                                            ttl_s=TTL_S).ids
            finally:
                restart.join()
            after = server_time(plain)
    finally:
        plain.close()
    items = [it for m in lane_messages(redis_server.url, "bst-ttl-restart.bulk")
             for it in m["items"]]
    assert sorted(it["id"] for it in items) == sorted(first + second)
    for item in items:
        assert before + TTL_S - SLACK_S <= item["expires_at"] <= after + TTL_S + SLACK_S


def test_a_ttl_submit_with_redis_gone_fails_as_any_submit(
        redis_server: RedisServer, sqlite_url: str) -> None:
    s = Settings(broker_url=redis_server.url, database_url=sqlite_url, queue="bst-ttl-gone",
                 publish_retries=1, publish_retry_max_s=0.1, redis_connect_timeout_s=1)
    redis_server.stop()
    with Client(s) as client:
        with pytest.raises(BrokerUnavailable):
            client.submit("x", ttl_s=TTL_S)
        with pytest.raises(BrokerUnavailable):
            client.submit("x")


@pytest.mark.parametrize("skew", [-120.0, 120.0])
def test_a_worker_runs_the_tasks_of_a_skewed_producer(
        settings: Settings, worker_factory: Any, monkeypatch: pytest.MonkeyPatch,
        skew: float) -> None:
    """A producer host two minutes off submits with a one-minute ttl to a real worker
    (another process, on the host's right clock): every task is run, none expired."""
    s = settings.replace(model="null")
    worker_factory(s)
    with Client(s) as client:
        with host_clock(monkeypatch, skew):
            one = client.submit("the hotel was lovely", ttl_s=TTL_S)
            many = client.submit_many(["the room was dirty", "fine"], ttl_s=TTL_S).ids
        got = client.wait([one, *many], timeout=60)
    assert {i: r.status for i, r in got.items()} == {i: STATUS_DONE for i in [one, *many]}, (
        {i: r.error for i, r in got.items()})


@pytest.fixture
def in_process_task(redis_url: str, store: ResultStore) -> Iterator[Any]:
    """The analysis task in process (no model) on the test Redis and ``store``, built
    as a worker builds it (``register_tasks``)."""
    from celery import Celery

    from worker import tasks
    from worker.flush import FlushProcessor
    from worker.runner import NullRunner

    s = Settings(broker_url=redis_url, database_url="sqlite://", model="null",
                 queue=f"bst-ttl-{uuid.uuid4().hex[:8]}")
    proc = FlushProcessor(NullRunner(), store, s, "t@h")
    yield tasks.register_tasks(Celery("t", broker="memory://"), proc, s)


@pytest.mark.parametrize("skew", SKEWS)
def test_a_skewed_worker_compares_deadlines_with_the_server_clock(
        in_process_task: Any, store: ResultStore, plain: redis.Redis,
        monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    """A worker host off by ``skew`` runs a task whose deadline (on the server's clock) is
    a minute away and expires one whose deadline passed half a minute ago."""
    now = server_time(plain)
    items = [{"id": "fresh", "text": "still wanted", "submitted_at": now,
              "expires_at": now + TTL_S},
             {"id": "stale", "text": "too late", "submitted_at": now - TTL_S,
              "expires_at": now - TTL_S / 2}]
    with host_clock(monkeypatch, skew):
        stats = in_process_task.processor.process([("m1", [items])])
    got = {r.id: r for r in store.query(limit=None)}
    assert {i: r.status for i, r in got.items()} == {"fresh": STATUS_DONE,
                                                    "stale": STATUS_EXPIRED}
    assert stats.expired == 1
    late = float((got["stale"].error or "").split()[1])
    assert TTL_S / 2 - SLACK_S <= late <= TTL_S / 2 + SLACK_S, got["stale"].error


class CountingRedis(redis.Redis):
    """A real Redis client that counts its ``TIME`` commands."""

    times = 0

    def time(self) -> Any:
        self.times += 1
        return super().time()


def test_the_server_clock_costs_one_time_per_refresh(redis_url: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads of a :class:`ServerClock` within its refresh interval reuse the offset (no
    round trip per flush); a host off by an hour reads the server's time all the same."""
    client = CountingRedis.from_url(redis_url)
    try:
        clock = ServerClock(client, refresh_s=3600.0)
        with host_clock(monkeypatch, 3600.0):
            reads = [clock.now() for _ in range(100)]
        assert client.times == 1
        assert abs(reads[-1] - server_time(client)) < SLACK_S
    finally:
        client.close()


def test_a_server_clock_without_redis_reads_the_local_clock() -> None:
    """``memory://`` (no Redis client): one process, one clock."""
    before = time.time()
    assert before <= ServerClock(None).now() <= time.time()


@pytest.mark.parametrize("skew", [-120.0, 120.0])
def test_a_producer_clock_step_between_publishes_keeps_deadlines_on_the_server_clock(
        redis_url: str, sqlite_url: str, plain: redis.Redis, monkeypatch: pytest.MonkeyPatch,
        skew: float) -> None:
    """Deadlines are stamped with the offset the client refreshes every few seconds, not a
    ``TIME`` per message: this host's clock stepping by two minutes between two publishes
    (an NTP step) reads the offset again at once, so the second deadline is not two
    minutes off."""
    s = broker_settings(redis_url, sqlite_url)
    with Client(s) as client:
        before = server_time(plain)
        client.submit("before the step", ttl_s=TTL_S)
        with host_clock(monkeypatch, skew):
            client.submit("after the step", ttl_s=TTL_S)
        after = server_time(plain)
    items = lane_messages(redis_url, f"{s.queue}.interactive")
    assert len(items) == 2
    for message in items:
        [item] = message["items"]
        assert before + TTL_S - SLACK_S <= item["expires_at"] <= after + TTL_S + SLACK_S, (
            f"expires_at is {item['expires_at'] - before - TTL_S:+.1f} s off the server's "
            f"clock + ttl")
