"""Without the Redis server's clock (the one row times are stamped on: see
``test_delete_redis_clock``), `db delete --older-than` takes its cut-off from the
database's clock, not the CLI host's.

Rows' ``finished_at`` come from the workers' writes; a retention cron on a host whose
clock runs ahead deleted rows younger than the age it was given. The skewed host is
this process with ``producer.db_cli``'s clock moved, a fault one host cannot cause for
real; PostgreSQL and its ``now()`` are real. SQLite is a local file: the local clock is
its clock, and stays the cut-off's source there.
"""

from __future__ import annotations

import datetime as dt
import types
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from contract.constants import RESULTS_TABLE
from contract.results import ResultStore
from contract.settings import Settings
from producer import db_cli
from tests.producer_helpers import invoke
from tests.test_latest_flag import record

#: How far the CLI host's clock is off: an hour ahead, two hours behind (past the rows' ages
#: either way, so its cut-off falls on the wrong side of one of them).
SKEWS = [dt.timedelta(hours=1), dt.timedelta(hours=-2)]
#: The broker of these commands: not Redis, so the cut falls back to the database's clock.
NO_REDIS = "memory://"


def skew_clock(monkeypatch: pytest.MonkeyPatch, skew: dt.timedelta) -> None:
    """Move ``producer.db_cli``'s clock by ``skew``; every other module keeps the real one."""

    class Skewed(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> Skewed:
            real = dt.datetime.now(tz) + skew
            return cls.fromtimestamp(real.timestamp(), real.tzinfo)

    monkeypatch.setattr(db_cli, "dt", types.SimpleNamespace(
        datetime=Skewed, timedelta=dt.timedelta, timezone=dt.timezone))


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[ResultStore]:
    """A PostgreSQL store holding a row 10 minutes old and one 2 hours old by its clock."""
    store = ResultStore.from_url(pg_url)
    store.create_schema()
    store.upsert([record("recent", "m", 0), record("old", "m", 1)])
    with store.engine.begin() as conn:
        for task, age in (("recent", "10 minutes"), ("old", "2 hours")):
            conn.execute(sa.text(f"UPDATE {RESULTS_TABLE} SET finished_at = now() - "
                                 "CAST(:age AS interval) WHERE id = :id"),
                         {"age": age, "id": task})
    yield store
    store.close()


def ids(store: ResultStore) -> list[str]:
    with store.engine.connect() as conn:
        return sorted(conn.execute(sa.text(f"SELECT id FROM {RESULTS_TABLE}")).scalars())


def db_now(store: ResultStore) -> dt.datetime:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.current_timestamp())).scalar_one()


@pytest.mark.parametrize("skew", SKEWS, ids=["ahead", "behind"])
def test_a_skewed_cli_clock_deletes_by_the_databases_clock(
        pg_store: ResultStore, pg_url: str, monkeypatch: pytest.MonkeyPatch,
        skew: dt.timedelta) -> None:
    """An hour ahead, `--older-than 1h` deleted the 10-minute-old row too; two hours
    behind, it kept the 2-hour-old one. The dry run counts what --yes deletes."""
    skew_clock(monkeypatch, skew)
    settings = Settings(database_url=pg_url, broker_url=NO_REDIS)
    dry = invoke(["db", "delete", "--older-than", "1h"], settings)
    assert dry.exit_code == 0, dry.output
    assert "would delete 1 row(s) of 1 task(s)" in dry.output
    out = invoke(["db", "delete", "--older-than", "1h", "--yes"], settings)
    assert out.exit_code == 0, out.output
    assert "deleted 1 row(s) of 1 task(s)" in out.output
    assert ids(pg_store) == ["recent"]


def test_the_dry_run_prints_the_databases_cut_off(
        pg_store: ResultStore, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cut-off printed is the database's now() less the age, whatever this host's
    clock says: the time to pass as --until to delete exactly what was counted."""
    skew_clock(monkeypatch, dt.timedelta(hours=1))
    before = db_now(pg_store)
    dry = invoke(["db", "delete", "--older-than", "1h"],
                 Settings(database_url=pg_url, broker_url=NO_REDIS))
    after = db_now(pg_store)
    assert dry.exit_code == 0, dry.output
    text = dry.output.split("finished before ", 1)[1].split(" ", 1)[0]
    cut = dt.datetime.fromisoformat(text)
    hour = dt.timedelta(hours=1)
    assert before - hour - dt.timedelta(seconds=1) <= cut <= after - hour
    assert ids(pg_store) == ["old", "recent"]


def test_sqlite_cuts_by_the_local_clock(sqlite_url: str) -> None:
    """SQLite's file is on this host: its clock is the database's."""
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    now = dt.datetime.now(dt.timezone.utc)
    rows = [record("recent", "m", 0), record("old", "m", 1)]
    rows[0].finished_at = now - dt.timedelta(minutes=10)
    rows[1].finished_at = now - dt.timedelta(hours=2)
    store.upsert(rows)
    out = invoke(["db", "delete", "--older-than", "1h", "--yes"],
                 Settings(database_url=sqlite_url, broker_url=NO_REDIS))
    assert out.exit_code == 0, out.output
    assert "deleted 1 row(s) of 1 task(s) finished before " in out.output
    assert [r.id for r in store.query()] == ["recent"]
    store.close()
