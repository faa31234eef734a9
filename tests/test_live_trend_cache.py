"""``/v1/live``'s per-minute trend kept per process (:class:`api.dashboard.TrendCache`):
the same answer as a whole read of the half hour while rows keep arriving, at the cost
of its last minutes; on SQLite and PostgreSQL. Time moves by the ``now`` given, never by
sleeping."""

from __future__ import annotations

import datetime as dt
import threading
from itertools import count
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

import api.dashboard as dashboard
from api.app import create_app
from api.dashboard import TREND_FULL_S, TREND_SETTLE_S, TrendCache, trend
from contract.queries import Filters
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings

T0 = dt.datetime(2026, 12, 6, 10, 0, 7, 250_000, tzinfo=dt.timezone.utc)
_ids = count()


def rows(*finished: dt.datetime, model: str = "m") -> list[ResultRecord]:
    return [ResultRecord(id=f"t{next(_ids):06d}", text_sha256="a" * 64, text_chars=4,
                         model=model, status="done", label="positive", score=0.75,
                         finished_at=when) for when in finished]


def ago(now: dt.datetime, seconds: float) -> dt.datetime:
    return now - dt.timedelta(seconds=seconds)


def check(cache: TrendCache, store: ResultStore, now: dt.datetime) -> list[dict[str, Any]]:
    """The cache's answer at ``now``, asserted equal to a whole read."""
    got = cache.trend(store, now)
    assert got == trend(store, now), now
    return got


def total(answer: list[dict[str, Any]]) -> int:
    return sum(p["count"] for p in answer)


def test_the_answer_stays_a_whole_reads_while_rows_arrive(store: ResultStore) -> None:
    """Ten minutes of 5-second polls, rows arriving between them (some stamped up to 100 s
    before their commit, another model's re-score among them), and rows just outside
    the window: every answer is a whole read's; one whole read per ``full_s``."""
    store.upsert(rows(*(ago(T0, s) for s in range(0, 40 * 60, 37))))
    cache = TrendCache()
    now = T0
    for step in range(120):
        now = T0 + dt.timedelta(seconds=5 * step)
        store.upsert(rows(ago(now, 1), ago(now, 30 + step % 70)))
        if step % 7 == 0:
            store.upsert(rows(ago(now, 2), model="m2"))
        check(cache, store, now)
    assert cache.full_refreshes == 2  # at T0 and T0 + full_s


def test_a_late_row_within_the_margin_shows_at_once(store: ResultStore) -> None:
    """A row committed ``settle_s`` - 10 s after the time it was stamped with: its minute
    was not kept, so the next poll counts it."""
    cache = TrendCache()
    store.upsert(rows(*(ago(T0, s) for s in range(0, 1800, 20))))
    before = check(cache, store, T0)
    now = T0 + dt.timedelta(seconds=5)
    store.upsert(rows(ago(now, TREND_SETTLE_S - 10)))
    assert total(check(cache, store, now)) == total(before) + 1
    assert cache.full_refreshes == 1


def test_a_row_later_than_the_margin_shows_at_the_full_refresh(store: ResultStore) -> None:
    """A row committed ten minutes after its time lands in a kept minute: the polls until
    the next whole read miss it (the stated lag), that read counts it."""
    cache = TrendCache()
    store.upsert(rows(*(ago(T0, s) for s in range(0, 1800, 20))))
    before = check(cache, store, T0)
    late = ago(T0, 600)
    store.upsert(rows(late))
    now = T0
    while (now - T0).total_seconds() + 5 < TREND_FULL_S:
        now += dt.timedelta(seconds=5)
        got = cache.trend(store, now)
        assert got != trend(store, now)
        assert {p["bucket"]: p["count"] for p in got}[late.strftime("%Y-%m-%dT%H:%M:00Z")] \
            == {p["bucket"]: p["count"] for p in before}[late.strftime("%Y-%m-%dT%H:%M:00Z")]
    now += dt.timedelta(seconds=5)
    check(cache, store, now)
    assert cache.full_refreshes == 2


@pytest.mark.parametrize("jump_s", [-600, -(TREND_SETTLE_S + 1), TREND_SETTLE_S + 60])
def test_a_clock_jump_drops_the_kept_minutes(store: ResultStore, jump_s: float) -> None:
    """``now`` moving back (a Redis clock step, a failover to a Redis behind) puts new rows
    in minutes kept as ended, and forward past the margin: either way the kept minutes go
    and the answer is a whole read's."""
    cache = TrendCache()
    store.upsert(rows(*(ago(T0, s) for s in range(0, 1800, 20))))
    check(cache, store, T0)
    check(cache, store, T0 + dt.timedelta(seconds=5))
    store.upsert(rows(ago(T0, 600)))  # a kept minute's row, late: only a whole read sees it
    now = T0 + dt.timedelta(seconds=5 + jump_s)
    store.upsert(rows(ago(now, 1), ago(now, 20)))  # stamped on the clock after the jump
    check(cache, store, now)
    assert cache.full_refreshes == 2
    check(cache, store, now + dt.timedelta(seconds=5))
    assert cache.full_refreshes == 2


def test_a_small_step_back_reads_its_minutes_again(store: ResultStore) -> None:
    """``now`` a few seconds behind the last call's (two threads' reads of the clock in the
    other order) keeps the cache and still answers as a whole read."""
    cache = TrendCache()
    now = T0.replace(second=1)  # a step back across the start of a minute
    store.upsert(rows(*(ago(now, s) for s in range(0, 1800, 20))))
    check(cache, store, now)
    back = ago(now, 3)
    store.upsert(rows(ago(back, TREND_SETTLE_S - 1)))
    check(cache, store, back)
    assert cache.full_refreshes == 1


def test_minutes_that_leave_the_window_are_dropped(store: ResultStore) -> None:
    """Forty-two minutes of polls 30 s apart: the answer follows a whole read's as minutes leave
    the window, and at most the window's minutes are ever kept."""
    cache = TrendCache()
    store.upsert(rows(*(ago(T0, s) for s in range(0, 1800, 15))))
    for step in range(85):
        now = T0 + dt.timedelta(seconds=30 * step)
        if step < 20:
            store.upsert(rows(ago(now, 2)))
        got = check(cache, store, now)
        since = (now - dt.timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:00Z")
        assert len(cache._kept) <= 31 and all(b >= since for b in cache._kept)
        assert all(p["bucket"] >= since for p in got)
    assert got == []
    assert cache._kept == {}


def _spy_on_reads(monkeypatch: pytest.MonkeyPatch) -> list[dt.datetime]:
    """The ``since`` of each read of the database the trend makes, as it makes them."""
    starts: list[dt.datetime] = []
    real = dashboard.stats

    def spy(store: ResultStore, filters: Filters, **kw: Any) -> Any:
        assert filters.since is not None
        starts.append(filters.since)
        return real(store, filters, **kw)

    monkeypatch.setattr(dashboard, "stats", spy)
    return starts


def test_concurrent_polls_read_the_half_hour_once(store: ResultStore,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight polls at once on an empty cache: one whole read, the others read after it only
    the minutes it did not keep; every answer is the whole read's."""
    store.upsert(rows(*(ago(T0, s) for s in range(0, 1800, 10))))
    expected = trend(store, T0)
    starts = _spy_on_reads(monkeypatch)
    cache = TrendCache()
    answers: list[Any] = []
    gate = threading.Barrier(8)

    def poll() -> None:
        gate.wait()
        answers.append(cache.trend(store, T0))

    threads = [threading.Thread(target=poll) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers == [expected] * 8
    since = (T0 - dt.timedelta(minutes=30)).replace(second=0, microsecond=0)
    assert sorted(starts).count(since) == 1 and cache.full_refreshes == 1
    assert all(s >= ago(T0, TREND_SETTLE_S + 60) for s in starts if s != since)


def test_a_poll_of_the_live_route_reads_its_last_minutes_only(
        settings: Settings, store: ResultStore, plain: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the app: the first ``/v1/live`` reads the half hour, the next ones only the
    minutes from ``settle_s`` before now on, and answer as the first did."""
    app = create_app(settings)
    starts = _spy_on_reads(monkeypatch)
    secs, micros = plain.time()
    now = dt.datetime.fromtimestamp(secs + micros / 1e6, dt.timezone.utc)
    store.upsert(rows(*(ago(now, s) for s in range(200, 1700, 30))))
    with TestClient(app) as http:
        answers = [http.get("/v1/live").json() for _ in range(4)]
    assert total(answers[0]["per_minute"]) == 50
    assert [a["per_minute"] for a in answers] == [answers[0]["per_minute"]] * 4
    assert len(starts) == 4
    first = dt.datetime.fromisoformat(answers[0]["now"])
    assert starts[0] == (first - dt.timedelta(minutes=30)).replace(second=0, microsecond=0)
    assert all(s >= ago(first, TREND_SETTLE_S + 60) for s in starts[1:]), starts
