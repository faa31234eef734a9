"""A schema migration killed part-way (SIGKILL: the OOM killer, `docker kill`, a host
crash) leaves the database at its old revision, rows intact, and running the same
command again finishes it; databases left half-migrated by older bertstreams (which
committed SQLite's DDL at once) are finished too."""

from __future__ import annotations

import datetime as dt
import hashlib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from contract import migrate
from contract.constants import MIGRATIONS_TABLE, RESULTS_TABLE, WINDOWS_TABLE
from contract.results import ResultStore, metadata
from contract.settings import Settings
from worker.process import settings_env

ROOT = Path(__file__).resolve().parent.parent
ROWS = 20_000
LANG_INDEX = f"ix_{RESULTS_TABLE}_lang"
TEMP_TABLE = "_bertstream_results_new"
T0 = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.timezone.utc)

#: `bertstream ARGS` that stops for good (until killed) right after running a statement that
#: starts with NEEDLE, once it has touched MARKER: the kill lands inside that migration.
_PAUSING_CLI = """
import sys, time
import sqlalchemy as sa

@sa.event.listens_for(sa.engine.Engine, "after_cursor_execute")
def _pause(conn, cursor, statement, parameters, context, executemany):
    if statement.lstrip().startswith({needle!r}):
        open({marker!r}, "w").close()
        time.sleep(600)

from producer.cli import main
main()
"""


def bertstream(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", *args],
                          env=settings_env(Settings(database_url=url)), capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def killed_during(url: str, needle: str, tmp_path: Path, *args: str) -> None:
    """Run `bertstream ARGS` and SIGKILL it once it has run a statement starting with
    ``needle`` (the statement's effects not committed yet)."""
    marker = tmp_path / "paused"
    marker.unlink(missing_ok=True)
    code = _PAUSING_CLI.format(needle=needle, marker=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", code, *args],
                            env=settings_env(Settings(database_url=url)), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"it ended before {needle!r}: {proc.communicate()[0]}"
            assert time.monotonic() < deadline, f"no {needle!r} within 120 s"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -9


@pytest.fixture
def big_sqlite(tmp_path: Path) -> Iterator[tuple[str, ResultStore]]:
    """A SQLite file at revision 0001 with :data:`ROWS` rows."""
    path = tmp_path / "big.db"
    url = f"sqlite:///{path}"
    store = ResultStore.from_url(url)
    migrate.upgrade(store, "0001")
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            f"INSERT INTO {RESULTS_TABLE} (id, model, source, text, text_sha256, text_chars, "
            "status, label, score, attempts, truncated, finished_at) "
            "VALUES (?, 'm1', 's', ?, ?, 40, 'done', 'positive', 0.9, 1, 0, ?)",
            ((str(i), f"text {i} " + "x" * 32, hashlib.sha256(str(i).encode()).hexdigest(),
              f"2026-12-01 10:{i // 60 % 60:02d}:{i % 60:02d}.000000") for i in range(ROWS)))
    conn.close()
    yield url, store
    store.close()


def schema(store: ResultStore) -> dict[str, object]:
    """What a half-done migration would change: revision, tables, columns, indexes, rows."""
    with store.engine.connect() as conn:
        inspector = sa.inspect(conn)
        tables = sorted(t for t in inspector.get_table_names() if t != MIGRATIONS_TABLE)
        return {
            "revision": migrate._current(conn),
            "tables": tables,
            "columns": sorted(c["name"] for c in inspector.get_columns(RESULTS_TABLE)),
            "indexes": sorted(str(ix["name"]) for ix in inspector.get_indexes(RESULTS_TABLE)),
            "rows": conn.execute(sa.text(f"SELECT count(*), count(DISTINCT id), "
                                         f"sum(length(text)) FROM {RESULTS_TABLE}")).one()[:],
            "integrity": conn.execute(sa.text("PRAGMA integrity_check")).scalar(),
        }


def matches_the_code(store: ResultStore) -> None:
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": MIGRATIONS_TABLE})
        assert compare_metadata(context, metadata) == []


@pytest.mark.parametrize("start, needle", [
    ("0001", f"INSERT INTO {TEMP_TABLE}"),  # 0002's copy of the table
    ("0002", f"ALTER TABLE {RESULTS_TABLE} ADD COLUMN latest"),  # 0003's first step
    ("0002", f"UPDATE {RESULTS_TABLE} SET latest"),  # 0003's second step
])
def test_an_upgrade_killed_mid_revision_leaves_the_old_revision_and_runs_again(
        big_sqlite: tuple[str, ResultStore], tmp_path: Path, start: str, needle: str) -> None:
    url, store = big_sqlite
    migrate.upgrade(store, start)
    before = schema(store)
    assert before["revision"] == start and before["rows"][:2] == (ROWS, ROWS)  # type: ignore[index]
    killed_during(url, needle, tmp_path, "db", "upgrade")
    assert schema(store) == before  # no temporary table, no new column, every row
    again = bertstream(url, "db", "upgrade")
    assert again.returncode == 0, again.stderr
    assert migrate.check(store).up_to_date
    assert schema(store)["rows"] == before["rows"]
    matches_the_code(store)


def test_a_downgrade_killed_mid_revision_leaves_the_old_revision_and_runs_again(
        big_sqlite: tuple[str, ResultStore], tmp_path: Path) -> None:
    """Killed in 0002's rollback, after 0003's: the database is still at 0003 as a whole
    (the windows table, the lang index, the latest flags), and both directions work."""
    url, store = big_sqlite
    migrate.upgrade(store)
    before = schema(store)
    assert WINDOWS_TABLE in before["tables"] and "latest" in before["columns"]  # type: ignore[operator]
    killed_during(url, f"INSERT INTO {TEMP_TABLE}", tmp_path, "db", "downgrade", "0001", "--yes")
    assert schema(store) == before
    again = bertstream(url, "db", "downgrade", "0001", "--yes")
    assert again.returncode == 0, again.stderr
    after = schema(store)
    assert after["revision"] == "0001" and after["tables"] == [RESULTS_TABLE]
    assert after["rows"] == before["rows"]
    up = bertstream(url, "db", "upgrade")
    assert up.returncode == 0, up.stderr
    assert schema(store) == before
    matches_the_code(store)


# -- databases an older bertstream left half-migrated ------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> Iterator[ResultStore]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    s = ResultStore.from_url(url)
    yield s
    s.close()


def _rows(store: ResultStore) -> list[tuple[object, ...]]:
    """(id, model, latest flag or None where the column is not there) of every row."""
    with store.engine.connect() as conn:
        flag = ("latest" if "latest" in {c["name"] for c in sa.inspect(conn).get_columns(
            RESULTS_TABLE)} else "NULL")
        return [tuple(r) for r in conn.execute(sa.text(
            f"SELECT id, model, {flag} FROM {RESULTS_TABLE} ORDER BY id, model"))]


def _insert(store: ResultStore, *rows: tuple[str, str, int]) -> None:
    with store.engine.begin() as conn:
        for task_id, model, minute in rows:
            conn.execute(sa.text(
                f"INSERT INTO {RESULTS_TABLE} (id, model, text_sha256, text_chars, status, "
                "attempts, truncated, finished_at) VALUES (:id, :m, :sha, 4, 'done', 1, :f, :at)"),
                {"id": task_id, "m": model, "sha": "0" * 64, "f": False,
                 "at": T0 + dt.timedelta(minutes=minute)})


def test_a_copy_left_behind_by_a_killed_0002_upgrade_is_dropped(sqlite_url: str) -> None:
    store = ResultStore.from_url(sqlite_url)
    migrate.upgrade(store, "0001")
    _insert(store, ("t1", "m", 1))
    with store.engine.begin() as conn:  # what CREATE TABLE committed before the kill
        conn.execute(sa.text(f"CREATE TABLE {TEMP_TABLE} (id VARCHAR(128) NOT NULL, "
                             "model VARCHAR(256) NOT NULL, PRIMARY KEY (id, model))"))
    assert migrate.upgrade(store) == ("0001", migrate.head_revision())
    assert TEMP_TABLE not in sa.inspect(store.engine).get_table_names()
    assert _rows(store) == [("t1", "m", True)]
    matches_the_code(store)
    store.close()


def test_a_latest_column_left_by_a_killed_0003_upgrade_is_kept_and_set(
        store: ResultStore) -> None:
    migrate.upgrade(store, "0002")
    _insert(store, ("t1", "old", 1), ("t1", "new", 2), ("t2", "old", 1))
    with store.engine.begin() as conn:  # what ADD COLUMN committed before the kill
        conn.execute(sa.text(f"ALTER TABLE {RESULTS_TABLE} ADD COLUMN latest BOOLEAN "
                             "DEFAULT true NOT NULL"))
    assert migrate.upgrade(store) == ("0002", migrate.head_revision())
    assert _rows(store) == [("t1", "new", True), ("t1", "old", False), ("t2", "old", True)]
    matches_the_code(store)


def test_a_rollback_killed_in_0002_by_an_older_bertstream_runs_again(
        store: ResultStore) -> None:
    """Killed after dropping the windows table and the lang index, stamped 0002: the
    rollback runs again to 0001, and an upgrade builds the whole schema."""
    migrate.upgrade(store, "0002")
    _insert(store, ("t1", "old", 1), ("t1", "new", 2), ("t2", "old", 1))
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {WINDOWS_TABLE}"))
        conn.execute(sa.text(f"DROP INDEX {LANG_INDEX}"))
    assert migrate.downgrade(store, "0001") == ("0002", "0001")
    assert _rows(store) == [("t1", "new", None), ("t2", "old", None)]
    migrate.upgrade(store)
    assert _rows(store) == [("t1", "new", True), ("t2", "old", True)]
    matches_the_code(store)


def test_a_latest_column_already_dropped_by_a_killed_0003_rollback(store: ResultStore) -> None:
    migrate.upgrade(store, "0003")
    _insert(store, ("t1", "m", 1))
    with store.engine.begin() as conn:  # what DROP COLUMN committed before the kill
        conn.execute(sa.text(f"ALTER TABLE {RESULTS_TABLE} DROP COLUMN latest"))
    assert migrate.downgrade(store, "0002") == ("0003", "0002")
    migrate.upgrade(store)
    assert _rows(store) == [("t1", "m", True)]
    matches_the_code(store)
