"""Row times (``submitted_at``, ``started_at``, ``finished_at``) when hosts' clocks are apart.

Every host stamps them on the Redis server's clock: a producer or API host when it
publishes (the offset it keeps for deadlines, no ``TIME`` per message), a worker per
flush (the offset it compares deadlines with). So a rescore by a worker whose host is
behind becomes the task's latest row, and queue wait and latency are the time the task
took, not the distance between two hosts' clocks. The skewed host has its clock moved
(``time.time`` patched), a fault one host cannot cause for real; Redis, the database
and the worker are real.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from celery import Celery

import contract.results as results_module
import worker.flush as flush_module
from api.app import create_app
from contract.clock import OFFSET_REFRESH_S, ServerClock, server_time
from contract.constants import STATUS_DONE, STATUS_FAILED
from contract.errors import BrokerUnavailable
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from producer.client import Client
from tests.conftest import RedisServer
from tests.producer_helpers import broker_settings, lane_messages
from tests.served_app import served
from worker import tasks
from worker.flush import FlushProcessor
from worker.runner import NullRunner

#: Clock offsets of a host behind the server: two minutes, and an hour.
BEHIND = [-120.0, -3600.0]
#: Offsets of a skewed host, either way.
SKEWS = [-3600.0, -120.0, 120.0, 3600.0]
#: How far a stamped time may be from the server's clock read around it: the round trips
#: and the work of a test on one host, far below any skew.
SLACK_S = 5.0


@contextlib.contextmanager
def host_clock(monkeypatch: pytest.MonkeyPatch, skew: float) -> Iterator[None]:
    """Inside the block this process's clock is ``skew`` seconds off: ``time.time`` and
    the UTC ``now`` rows were stamped with (``datetime.now`` reads the system clock
    without ``time.time``, so each module's name for it is moved too)."""
    real = time.time

    def utcnow() -> dt.datetime:
        return dt.datetime.fromtimestamp(real() + skew, tz=dt.timezone.utc)

    with monkeypatch.context() as patch:
        patch.setattr(time, "time", lambda: real() + skew)
        for module in (results_module, flush_module):
            patch.setattr(module, "utcnow", utcnow, raising=False)
        yield


def on_server_clock(when: dt.datetime | float, before: float, after: float) -> bool:
    """True when ``when`` lies between the server's times ``before`` and ``after`` (with
    :data:`SLACK_S`)."""
    seconds = when.timestamp() if isinstance(when, dt.datetime) else when
    return before - SLACK_S <= seconds <= after + SLACK_S


def worker_processor(redis_url: str, store: ResultStore, model_name: str) -> FlushProcessor:
    """A worker's processor for ``model_name`` (the ``null`` model) on ``store``, wired as a
    worker wires it (``register_tasks`` sets its clock to the Redis server's)."""
    s = Settings(broker_url=redis_url, database_url="sqlite://", model="null",
                 model_name=model_name, queue=f"bst-rows-{uuid.uuid4().hex[:8]}")
    proc = FlushProcessor(NullRunner(), store, s, f"{model_name}@h")
    tasks.register_tasks(Celery(model_name, broker="memory://"), proc, s)
    return proc


def rows_of(store: ResultStore, task_id: str) -> dict[str, ResultRecord]:
    """Every model's row of ``task_id``, by model."""
    return {m: r for m in ("m-a", "m-b") for r in store.query(ids=[task_id], model=m, limit=None)}


# -- workers ------------------------------------------------------------------


@pytest.mark.parametrize("skew", BEHIND)
@pytest.mark.parametrize("how", ["another model", "a retry"])
def test_a_rescore_by_a_worker_host_behind_becomes_the_latest_row(
        redis_url: str, store: ResultStore, plain: redis.Redis,
        monkeypatch: pytest.MonkeyPatch, skew: float, how: str) -> None:
    """A task scored by model ``m-a`` on a host with the right clock, then rescored on a
    host behind: by model ``m-b`` (``another model``), or by ``m-b`` retrying the row it
    had stored ``failed`` after ``m-a``'s (``a retry``). The rescore is the task's latest
    row, what the default views show, and its times are the server's."""
    first = worker_processor(redis_url, store, "m-a")
    second = worker_processor(redis_url, store, "m-b")
    item = {"id": "t", "text": "the hotel was lovely", "submitted_at": server_time(plain)}
    first.process([("m1", [[item]])])
    if how == "a retry":
        second.dead_letter([("m2", [[item]])], "the worker died", attempt=5)
        assert rows_of(store, "t")["m-b"].status == STATUS_FAILED
        assert [r.model for r in store.query(ids=["t"], limit=None)] == ["m-b"]
    before = server_time(plain)
    with host_clock(monkeypatch, skew):
        second.process([("m3", [[item]])])
    after = server_time(plain)
    rows = rows_of(store, "t")
    assert rows["m-b"].status == STATUS_DONE
    shown = store.query(ids=["t"], limit=None)
    assert [r.model for r in shown] == ["m-b"], "the rescore is not the task's latest row"
    assert store.get_many(["t"])["t"].model == "m-b"
    assert on_server_clock(rows["m-b"].finished_at, before, after), (
        f"finished_at is {rows['m-b'].finished_at.timestamp() - after:+.1f} s off the "
        f"server's clock")
    assert rows["m-b"].started_at is not None
    assert on_server_clock(rows["m-b"].started_at, before, after)
    assert rows["m-b"].started_at <= rows["m-b"].finished_at


@pytest.mark.parametrize("skew", SKEWS)
def test_a_skewed_worker_measures_queue_wait_and_latency_on_the_server_clock(
        redis_url: str, sqlite_store: ResultStore, plain: redis.Redis,
        monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    """A task submitted ten seconds ago (by the server's clock), run by a worker host off
    by ``skew``: the flush's start (queue wait, a metric) and commit (end to end) and the
    row's latency are ten seconds and a little, not ten seconds plus the skew."""
    proc = worker_processor(redis_url, sqlite_store, "m-a")
    submitted = server_time(plain) - 10.0
    with host_clock(monkeypatch, skew):
        stats = proc.process([("m1", [[{"id": "t", "text": "fine", "submitted_at": submitted}]])])
    after = server_time(plain)
    assert 10.0 <= stats.began - submitted <= after - submitted + SLACK_S, (
        f"queue wait measured as {stats.began - submitted:+.1f} s")
    [(status, _, sent, committed)] = stats.rows
    assert status == STATUS_DONE and sent == submitted
    assert 10.0 <= committed - submitted <= after - submitted + SLACK_S
    row = sqlite_store.get_many(["t"])["t"]
    assert row.latency_s is not None
    assert 10.0 <= row.latency_s <= after - submitted + SLACK_S, f"latency {row.latency_s:+.1f} s"


@pytest.mark.parametrize("skew", BEHIND)
def test_rows_stored_without_the_model_are_on_the_server_clock(
        redis_url: str, sqlite_store: ResultStore, plain: redis.Redis,
        monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    """A dead-lettered message's rows and a refused message's row, by a worker host behind."""
    proc = worker_processor(redis_url, sqlite_store, "m-a")
    before = server_time(plain)
    with host_clock(monkeypatch, skew):
        dead = proc.dead_letter([("m1", [[{"id": "dead", "text": "x", "submitted_at": before}]])],
                                "delivered too often", attempt=5)
        refused = proc.refuse("m2", "not a task", "no task request")
    after = server_time(plain)
    rows = {r.id: r for r in sqlite_store.query(limit=None)}
    assert set(rows) == {"dead", "malformed-m2-0"}
    for row in rows.values():
        assert on_server_clock(row.finished_at, before, after), (row.id, row.finished_at)
    for stats in (dead, refused):
        assert on_server_clock(stats.began, before, after)


@pytest.mark.parametrize("skew", BEHIND)
def test_a_wire_item_without_submitted_at_is_stamped_on_the_server_clock(
        redis_url: str, sqlite_store: ResultStore, plain: redis.Redis,
        monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    """A producer of its own that sends no ``submitted_at``: the worker host behind stamps
    it with the server's time, and a ``ttl_s`` sent on the wire (counted from it) is not
    past on arrival."""
    proc = worker_processor(redis_url, sqlite_store, "m-a")
    before = server_time(plain)
    with host_clock(monkeypatch, skew):
        proc.process([("m1", [[{"id": "plain", "text": "no time"},
                               {"id": "ttl", "text": "no time, a ttl", "ttl_s": 60}]])])
    after = server_time(plain)
    rows = {r.id: r for r in sqlite_store.query(limit=None)}
    assert {i: r.status for i, r in rows.items()} == {"plain": STATUS_DONE, "ttl": STATUS_DONE}, (
        {i: r.error for i, r in rows.items()})
    for row in rows.values():
        assert row.submitted_at is not None and on_server_clock(row.submitted_at, before, after)


def test_a_worker_with_redis_gone_keeps_its_durations(
        redis_server: RedisServer, sqlite_store: ResultStore) -> None:
    """A worker whose Redis cannot be read stores its rows on its own clock (with a
    warning), not without them; ``started_at`` is never after ``finished_at``."""
    proc = worker_processor(redis_server.url, sqlite_store, "m-a")
    redis_server.stop()
    proc.process([("m1", [[{"id": "t", "text": "fine", "submitted_at": time.time()}]])])
    row = sqlite_store.get_many(["t"])["t"]
    assert row.status == STATUS_DONE
    assert row.started_at is not None and row.started_at <= row.finished_at
    assert abs(row.finished_at.timestamp() - time.time()) < SLACK_S


# -- producers ----------------------------------------------------------------


def queued_items(settings: Settings) -> list[dict[str, Any]]:
    """Every item waiting on both lanes of ``settings``' queue."""
    return [it for lane in ("interactive", "bulk")
            for m in lane_messages(settings.broker_url, f"{settings.queue}.{lane}")
            for it in m["items"]]


@pytest.mark.parametrize("skew", SKEWS)
def test_a_skewed_producer_stamps_submitted_at_on_the_server_clock(
        redis_url: str, sqlite_url: str, plain: redis.Redis, monkeypatch: pytest.MonkeyPatch,
        skew: float) -> None:
    """``submit`` and ``submit_many`` on a host whose clock is off, with and without a ttl:
    ``submitted_at`` is the server's time, and a deadline stays ``submitted_at`` + ttl."""
    s = broker_settings(redis_url, sqlite_url)
    with Client(s) as client:
        before = server_time(plain)
        with host_clock(monkeypatch, skew):
            client.submit("one")
            client.submit_many(["two", "three"])
            client.submit("four", ttl_s=60)
            client.submit_many(["five"], ttl_s=60)
        after = server_time(plain)
    items = queued_items(s)
    assert len(items) == 5
    for item in items:
        assert on_server_clock(item["submitted_at"], before, after), (
            f"submitted_at is {item['submitted_at'] - before:+.1f} s off the server's clock")
        if "expires_at" in item:
            assert item["expires_at"] - item["submitted_at"] == pytest.approx(60.0, abs=1e-3)


def time_calls(client: redis.Redis) -> int:
    """``TIME`` commands the server has run (its own count: the test's server only)."""
    return int(client.info("commandstats").get("cmdstat_time", {}).get("calls", 0))


def test_stamping_costs_one_time_per_refresh_not_per_message(
        redis_server: RedisServer, sqlite_url: str) -> None:
    """Publishes with and without deadlines read the server's clock once per refresh of
    the offset (never once per message); ``memory://`` reads none."""
    s = broker_settings(redis_server.url, sqlite_url)
    plain = redis.Redis.from_url(redis_server.url)
    try:
        before = time_calls(plain)
        start = time.monotonic()
        with Client(s) as client:
            for i in range(20):
                client.submit(f"text {i}")
                client.submit(f"timed {i}", ttl_s=60)
            client.submit_many([f"bulk {i}" for i in range(50)], chunk_size=5, ttl_s=60)
        refreshes = 1 + int((time.monotonic() - start) / OFFSET_REFRESH_S)
        assert 1 <= time_calls(plain) - before <= refreshes
    finally:
        plain.close()


def test_a_publish_with_redis_gone_fails_as_before(
        redis_server: RedisServer, sqlite_url: str) -> None:
    """The server's clock cannot be read: the publish meets the outage as any publish
    (:class:`BrokerUnavailable`), not an error of the clock's."""
    s = broker_settings(redis_server.url, sqlite_url, publish_retries=1,
                        publish_retry_max_s=0.1, redis_connect_timeout_s=1)
    redis_server.stop()
    with Client(s) as client:
        with pytest.raises(BrokerUnavailable):
            client.submit("x")


@pytest.mark.parametrize("skew", [-120.0, 120.0])
def test_a_skewed_api_host_stamps_submitted_at_on_the_server_clock(
        redis_url: str, sqlite_url: str, plain: redis.Redis, monkeypatch: pytest.MonkeyPatch,
        skew: float) -> None:
    """The API publishes through the client: a coalesced single submit and a bulk one from
    a host two minutes off carry the server's time."""
    s = broker_settings(redis_url, sqlite_url)
    with served(create_app(s)) as url, httpx.Client(base_url=url, timeout=10) as http:
        before = server_time(plain)
        with host_clock(monkeypatch, skew):
            single = http.post("/v1/tasks", json={"text": "one", "id": "s"})
            bulk = http.post("/v1/tasks", json={"items": [{"text": "two", "id": "b"}]})
        after = server_time(plain)
    assert single.status_code == bulk.status_code == 202, (single.text, bulk.text)
    items = queued_items(s)
    assert {it["id"] for it in items} == {"s", "b"}
    for item in items:
        assert on_server_clock(item["submitted_at"], before, after), (
            item["id"], item["submitted_at"] - before)


def test_a_skewed_producer_and_a_real_worker_store_a_true_latency(
        settings: Settings, worker_factory: Any, plain: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer host an hour behind, a worker (another process) on the right clock: the
    row's ``latency`` is the seconds the task took, not the hour between the hosts."""
    s = settings.replace(model="null")
    worker_factory(s)
    with Client(s) as client:
        before = server_time(plain)
        with host_clock(monkeypatch, -3600.0):
            task_id = client.submit("the room was dirty")
        row = client.wait([task_id], timeout=60)[task_id]
        after = server_time(plain)
    assert row.status == STATUS_DONE
    assert row.submitted_at is not None and on_server_clock(row.submitted_at, before, after)
    assert row.latency_s is not None and 0.0 <= row.latency_s <= after - before + SLACK_S


# -- the clock ----------------------------------------------------------------


def test_threads_reading_one_clock_read_the_server_once(redis_url: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads of one client publishing at once: one reads the server's clock, the others
    wait for its offset instead of stamping this host's clock (an hour off)."""
    server = redis.Redis.from_url(redis_url)
    reads: list[float] = []

    def read() -> float:
        reads.append(time.monotonic())
        time.sleep(0.2)  # the round trip of a distant server
        return server_time(server)

    clock = ServerClock(read=read, refresh_s=3600.0)
    start = threading.Barrier(8)
    got: list[float] = []

    def stamp() -> None:
        start.wait()
        got.append(clock.now())

    try:
        with host_clock(monkeypatch, -3600.0):
            threads = [threading.Thread(target=stamp) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        now = server_time(server)
    finally:
        server.close()
    assert len(reads) == 1
    assert len(got) == 8 and all(abs(now - g) < SLACK_S for g in got), [now - g for g in got]


def test_a_reader_that_fails_leaves_the_local_clock_and_notes_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """A reader raising :class:`BrokerUnavailable` (a client's, Redis gone): the local clock,
    one INFO note (whatever uses Redis next reports the outage itself: a CLI printed the
    same cause twice, once with the wrong hint), and the next try waits for the next
    refresh."""
    calls = []

    def read() -> float:
        calls.append(1)
        raise BrokerUnavailable("Redis is gone")

    clock = ServerClock(read=read, refresh_s=3600.0)
    before = time.time()
    with caplog.at_level("INFO", logger="contract.clock"):
        assert before <= clock.now() <= clock.now() <= time.time()
    assert len(calls) == 1
    assert [r.levelname for r in caplog.records
            if "cannot read the Redis server's clock" in r.getMessage()] == ["INFO"]


def test_a_server_that_refuses_time_is_warned_of(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """Redis answering but refusing ``TIME`` (an ACL user without it) lasts until someone
    fixes it: a warning, and the local clock meanwhile."""
    admin = redis.Redis.from_url(redis_server.url)
    admin.acl_setuser("clockless", enabled=True, nopass=True,
                      commands=["+@all", "-time"], keys=["*"], channels=["*"])
    user = redis.Redis(host="127.0.0.1", port=redis_server.port, username="clockless")
    try:
        clock = ServerClock(read=lambda: server_time(user), refresh_s=3600.0)
        before = time.time()
        with caplog.at_level("INFO", logger="contract.clock"):
            assert before <= clock.now() <= time.time()
    finally:
        user.close()
        admin.close()
    got = [(r.levelname, r.getMessage()) for r in caplog.records
           if "cannot read the Redis server's clock" in r.getMessage()]
    assert len(got) == 1 and got[0][0] == "WARNING" and "'time' command" in got[0][1], got


def test_a_host_clock_step_reads_the_server_again(redis_url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """This host's clock set an hour back between two reads (an NTP step): the offset is
    read again at once, not after the refresh interval, so no time is an hour off."""
    client = redis.Redis.from_url(redis_url)
    try:
        clock = ServerClock(client, refresh_s=3600.0)
        clock.now()
        with host_clock(monkeypatch, -3600.0):
            stamped = clock.now()
        assert abs(stamped - server_time(client)) < SLACK_S
    finally:
        client.close()
