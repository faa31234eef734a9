"""``/v1/live`` served by an API host whose clock is off the Redis server's.

Row times are stamped on the Redis server's clock, so the windows the dashboard counts
them in ("finished in the last minute", the per-minute trend of the last half hour) end
at the server's now, not the API host's: a host ten minutes behind would count eleven
minutes of rows as the last minute, one ten minutes ahead none. A worker's heartbeat
``started_at``, listed next to the answer's ``now``, is on the same clock, so their
difference is the worker's uptime. The skewed host has its clock moved (``time.time`` and
each module's UTC ``now`` patched), a fault one host cannot cause for real; Redis, the
database, the served app and the heartbeat are real.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

import api.dashboard as dashboard_module
import contract.queries as queries_module
import contract.results as results_module
from api.app import create_app
from contract.clock import server_time
from contract.liveness import family_workers
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from tests.conftest import RedisServer
from tests.producer_helpers import broker_settings
from tests.served_app import served
from worker.heartbeat import Heartbeat

#: Offsets of the API host's clock: ten minutes either way.
SKEWS = [-600.0, 600.0]
#: How far a time may be from the server's clock read around it: the round trips and the
#: work of a test on one host, far below any skew.
SLACK_S = 5.0
#: Rows by how long before the server's now they finished: in the last minute, in the
#: half hour's trend only, and older than the trend.
AGES = {"now": 5.0, "5min": 300.0, "25min": 1500.0, "35min": 2100.0}


@contextlib.contextmanager
def host_clock(monkeypatch: pytest.MonkeyPatch, skew: float) -> Iterator[None]:
    """Inside the block this process's clock is ``skew`` seconds off: ``time.time`` and
    the UTC ``now`` of the modules that read it (``datetime.now`` reads the system clock
    without ``time.time``)."""
    real = time.time

    def utcnow() -> dt.datetime:
        return dt.datetime.fromtimestamp(real() + skew, tz=dt.timezone.utc)

    with monkeypatch.context() as patch:
        patch.setattr(time, "time", lambda: real() + skew)
        for module in (results_module, queries_module, dashboard_module):
            patch.setattr(module, "utcnow", utcnow, raising=False)
        yield


def at(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)


def row(task_id: str, finished: float) -> ResultRecord:
    return ResultRecord(id=task_id, text_sha256="a" * 64, text_chars=4, model="m",
                        status="done", label="positive", score=0.75, source="web",
                        text="fine", scores={"positive": 0.75}, finished_at=at(finished))


@pytest.mark.parametrize("skew", SKEWS)
def test_live_counts_the_last_minute_and_trend_on_the_server_clock(
        settings: Settings, store: ResultStore, plain: redis.Redis,
        monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    """Rows finished 5 s, 5 min, 25 min and 35 min ago by the server's clock; an API host
    ten minutes off: ``finished`` is the one row of the last minute, ``per_minute`` the
    three of the last half hour in their minutes, and ``now`` the server's."""
    server_now = server_time(plain)
    store.upsert([row(name, server_now - age) for name, age in AGES.items()])
    with served(create_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as http:
        before = server_time(plain)
        with host_clock(monkeypatch, skew):
            answer = http.get("/v1/live", params={"window": 60})
        after = server_time(plain)
    assert answer.status_code == 200, answer.text
    live = answer.json()
    assert live["finished"] == 1, live["finished"]
    assert live["per_s"] == pytest.approx(1 / 60)
    buckets = {dt.datetime.fromisoformat(p["bucket"].replace("Z", "+00:00")): p["count"]
               for p in live["per_minute"]}
    wanted: dict[dt.datetime, int] = {}
    for name in ("now", "5min", "25min"):
        minute = at(server_now - AGES[name]).replace(second=0, microsecond=0)
        wanted[minute] = wanted.get(minute, 0) + 1
    assert buckets == wanted
    now = dt.datetime.fromisoformat(live["now"]).timestamp()
    assert before - SLACK_S <= now <= after + SLACK_S, (
        f"now is {now - before:+.1f} s off the server's clock")


def test_a_heartbeat_from_a_host_behind_starts_on_the_server_clock(
        redis_url: str, sqlite_url: str, plain: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker host an hour behind starts its heartbeat: ``/v1/live`` lists its
    ``started_at`` on the server's clock, so ``now`` less it is the seconds it has run,
    not an hour more."""
    s = broker_settings(redis_url, sqlite_url)
    before = server_time(plain)
    with host_clock(monkeypatch, -3600.0):
        beat = Heartbeat(s, "celery@behind", {"model": "m"}).start()
        try:
            deadline = time.monotonic() + 10
            while not family_workers(plain, s.queue):
                assert time.monotonic() < deadline, "the heartbeat was not announced"
                time.sleep(0.05)  # the heartbeat's first beat, from its own thread
        except BaseException:
            beat.stop()
            raise
    try:
        with served(create_app(s)) as url, httpx.Client(base_url=url, timeout=10) as http:
            live = http.get("/v1/live").json()
        after = server_time(plain)
    finally:
        beat.stop()
    [worker] = live["workers"]
    started = worker["started_at"]
    assert before - SLACK_S <= started <= after + SLACK_S, (
        f"started_at is {started - before:+.1f} s off the server's clock")
    uptime = dt.datetime.fromisoformat(live["now"]).timestamp() - started
    assert -SLACK_S <= uptime <= after - before + SLACK_S, f"uptime {uptime:+.1f} s"


@pytest.mark.parametrize("fault", ["gone", "refuses the credentials"])
def test_live_without_the_server_clock_keeps_this_host_clock(
        redis_server: RedisServer, sqlite_url: str, fault: str) -> None:
    """Redis gone, or refusing the broker URL's credentials: ``/v1/live`` still answers,
    its windows on this host's clock, with ``redis`` saying why (as before the server's
    clock was read), not an error of the clock's."""
    s = broker_settings(redis_server.url, sqlite_url, redis_connect_timeout_s=1)
    store = ResultStore.from_url(sqlite_url)
    try:
        store.create_schema()
        store.upsert([row("recent", time.time() - 5.0), row("old", time.time() - 600.0)])
    finally:
        store.close()
    with served(create_app(s)) as url, httpx.Client(base_url=url, timeout=30) as http:
        if fault == "gone":
            redis_server.stop()
        else:
            admin = redis.Redis.from_url(redis_server.url)
            try:
                admin.config_set("requirepass", "another-one")
                admin.client_kill_filter(_type="normal", skipme=True)
            finally:
                admin.close()
        answer = http.get("/v1/live", params={"window": 60})
    assert answer.status_code == 200, answer.text
    live = answer.json()
    word = "unreachable:" if fault == "gone" else "misconfigured:"
    assert live["redis"].startswith(word) and live["workers"] is None, live
    assert live["finished"] == 1
    assert abs(dt.datetime.fromisoformat(live["now"]).timestamp() - time.time()) < SLACK_S
