"""`db delete --older-than` cuts on the Redis server's clock, the one row times are stamped on.

Producers, the API and the workers stamp ``submitted_at`` and ``finished_at`` with the
Redis server's ``TIME`` (``contract.clock``), not with the database's clock. When the two
servers' clocks are apart, a cut taken on PostgreSQL's ``CURRENT_TIMESTAMP`` deleted
younger or older rows than asked, by their distance. Two servers on one host share its
clock, so the Redis server's is moved here (its ``TIME`` answer, as the client reads it),
a fault one host cannot cause for real; Redis, PostgreSQL and the command are real. The
fallback when Redis cannot be read is the database's clock, and the command says so.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from contract.clock import ServerClock
from contract.constants import RESULTS_TABLE
from contract.results import ResultStore, utc_from_timestamp
from contract.settings import Settings
from producer import db_cli
from tests.producer_helpers import invoke
from tests.test_latest_flag import record
from worker.process import free_port

#: How far the Redis server's clock is from PostgreSQL's: three hours ahead, two behind
#: (past the rows' ages either way, so a cut on the database's clock falls on the wrong
#: side of one of them).
SKEWS = [dt.timedelta(hours=3), dt.timedelta(hours=-2)]


@pytest.fixture
def redis_clock_off(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Set the Redis server's clock ``skew`` off (every client in this process reads its
    ``TIME`` moved by it)."""
    real = redis.Redis.time

    def moved_by(skew: dt.timedelta) -> None:
        def time(self: redis.Redis) -> tuple[int, int]:
            seconds, micros = real(self)
            moved = seconds * 1_000_000 + micros + int(skew.total_seconds() * 1_000_000)
            return moved // 1_000_000, moved % 1_000_000

        monkeypatch.setattr(redis.Redis, "time", time)

    yield moved_by


def stamp_rows(pg_url: str, redis_url: str) -> ResultStore:
    """A PostgreSQL store holding a row that finished 10 minutes ago and one 2 hours ago, on
    the Redis server's clock (as a worker stamps them: :class:`ServerClock`)."""
    store = ResultStore.from_url(pg_url)
    store.create_schema()
    client = redis.Redis.from_url(redis_url)
    try:
        now = ServerClock(client).now()
    finally:
        client.close()
    rows = [record("recent", "m", 0), record("old", "m", 1)]
    rows[0].finished_at = utc_from_timestamp(now - 600)
    rows[1].finished_at = utc_from_timestamp(now - 7200)
    store.upsert(rows)
    return store


def ids(store: ResultStore) -> list[str]:
    with store.engine.connect() as conn:
        return sorted(conn.execute(sa.text(f"SELECT id FROM {RESULTS_TABLE}")).scalars())


@pytest.mark.parametrize("skew", SKEWS, ids=["redis-ahead", "redis-behind"])
def test_older_than_cuts_on_the_redis_servers_clock(
        pg_url: str, redis_url: str, redis_clock_off: Any, skew: dt.timedelta) -> None:
    """Redis three hours ahead of PostgreSQL, `--older-than 1h` on the database's clock
    deleted nothing; two hours behind, it deleted the 10-minute-old row too. On Redis's
    clock the dry run counts, and --yes deletes, the 2-hour-old row alone."""
    redis_clock_off(skew)
    store = stamp_rows(pg_url, redis_url)
    try:
        settings = Settings(database_url=pg_url, broker_url=redis_url)
        dry = invoke(["db", "delete", "--older-than", "1h"], settings)
        assert dry.exit_code == 0, dry.output
        assert "would delete 1 row(s) of 1 task(s)" in dry.output, dry.output
        assert f"({db_cli.REDIS_CLOCK})" in dry.output
        assert "warning" not in dry.output
        out = invoke(["db", "delete", "--older-than", "1h", "--yes"], settings)
        assert out.exit_code == 0, out.output
        assert "deleted 1 row(s) of 1 task(s)" in out.output, out.output
        assert ids(store) == ["recent"]
    finally:
        store.close()


def test_the_printed_cut_off_is_on_the_redis_servers_clock(
        pg_url: str, redis_url: str, redis_clock_off: Any) -> None:
    """The cut-off printed is Redis's now less the age (to pass as --until to delete
    exactly what was counted), not the database's."""
    redis_clock_off(dt.timedelta(hours=3))
    store = stamp_rows(pg_url, redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        before = ServerClock(client).now()
        dry = invoke(["db", "delete", "--older-than", "1h"],
                     Settings(database_url=pg_url, broker_url=redis_url))
        after = ServerClock(client).now()
    finally:
        client.close()
        store.close()
    assert dry.exit_code == 0, dry.output
    cut = dt.datetime.fromisoformat(dry.output.split("finished before ", 1)[1].split(" ", 1)[0])
    assert before - 3600 - 1 <= cut.timestamp() <= after - 3600


@pytest.mark.parametrize("broker", ["memory://", "unreachable"])
def test_without_redis_the_cut_is_the_databases_and_says_so(
        pg_url: str, redis_url: str, broker: str) -> None:
    """No Redis to read (a broker other than Redis, or one that does not answer): the
    database's clock, named with the reason in the line and in a warning on stderr; the
    command still deletes (a retention job goes on while Redis is down)."""
    store = stamp_rows(pg_url, redis_url)
    url = f"redis://127.0.0.1:{free_port()}/0" if broker == "unreachable" else broker
    try:
        out = invoke(["db", "delete", "--older-than", "1h", "--yes"],
                     Settings(database_url=pg_url, broker_url=url))
        assert out.exit_code == 0, out.output
        assert "deleted 1 row(s) of 1 task(s)" in out.output, out.output
        assert "(the database's clock: " in out.stdout, out.stdout
        assert "warning: --older-than cut by the database's clock: " in out.stderr, out.stderr
        why = "is not Redis" if broker == "memory://" else "cannot be read"
        assert why in out.stderr, out.stderr
        assert ids(store) == ["recent"]
    finally:
        store.close()
