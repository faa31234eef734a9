"""Deleting stored results (``ResultStore.delete``, ``bertstream db delete``) and repairing the
latest flags after hand edits (``settle_all``, ``bertstream db settle``), on SQLite and
PostgreSQL: the rows asked for go with their windows, nothing else does, and every task
left shows its newest remaining row."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.constants import RESULTS_TABLE, WINDOWS_TABLE
from contract.errors import InvalidInput
from contract.results import DeleteCount, ResultStore, WindowRecord
from contract.settings import Settings
from tests.conftest import REDIS_URL
from tests.test_latest_flag import assert_views_agree, flags, record, writes
from worker.process import settings_env

ROOT = Path(__file__).resolve().parents[1]


def window(task_id: str, model: str, n: int) -> WindowRecord:
    return WindowRecord(task_id, model, n, n * 10, n * 10 + 10, 5, "positive", 0.9,
                        {"positive": 0.9, "negative": 0.1})


def window_keys(store: ResultStore) -> set[tuple[str, str, int]]:
    with store.engine.connect() as conn:
        return {(r.id, r.model, r.window) for r in conn.execute(
            sa.text(f'SELECT id, model, "window" FROM {WINDOWS_TABLE}'))}


def test_deleting_a_task_removes_every_models_rows_and_their_windows(store: ResultStore) -> None:
    store.upsert([record("t", "m1", 1), record("t", "m2", 2), record("u", "m1", 1)],
                 windows={("t", "m1"): [window("t", "m1", 0), window("t", "m1", 1)],
                          ("u", "m1"): [window("u", "m1", 0)]})
    assert store.delete(ids=["t"], dry_run=True) == DeleteCount(rows=2, tasks=1)
    assert store.get("t") is not None  # a dry run deletes nothing
    assert store.delete(ids=["t"]) == DeleteCount(rows=2, tasks=1)
    assert store.get("t") is None and store.get("t", model="m1") is None
    assert window_keys(store) == {("u", "m1", 0)}
    assert store.get("u") is not None
    assert store.delete(ids=["t"]) == DeleteCount(0, 0)


def test_deleting_the_newest_row_shows_the_next_one(store: ResultStore) -> None:
    """A re-score that went wrong: its model's rows go, each task shows its earlier result."""
    store.upsert([record("a", "v1", 1), record("b", "v1", 1), record("c", "v2", 0)])
    store.upsert([record("a", "v2", 5), record("b", "v2", 5)])
    assert {r.id: r.model for r in store.query()} == {"a": "v2", "b": "v2", "c": "v2"}
    assert store.delete(model="v2", since=record("a", "v2", 5).finished_at) == DeleteCount(2, 2)
    assert {r.id: r.model for r in store.query()} == {"a": "v1", "b": "v1", "c": "v2"}
    assert_views_agree(store)


def test_a_retention_delete_goes_in_batches_and_keeps_the_rest(store: ResultStore) -> None:
    store.upsert([record(f"old{i:04d}", "m", 0) for i in range(1203)]
                 + [record(f"new{i}", "m", 60) for i in range(7)])
    batches: list[int] = []

    @sa.event.listens_for(store.engine, "commit")
    def count(conn: Any) -> None:
        batches.append(1)

    cut = record("x", "m", 30).finished_at
    assert store.delete(until=cut, dry_run=True) == DeleteCount(1203, 1203)
    assert store.delete(until=cut, batch=500) == DeleteCount(1203, 1203)
    assert len(batches) >= 3  # 500 + 500 + 203 tasks, each batch its own transaction
    assert sorted(r.id for r in store.query(limit=None)) == [f"new{i}" for i in range(7)]


def test_every_filter_narrows_and_none_is_refused(store: ResultStore) -> None:
    store.upsert([record("a", "m", 1), record("b", "m", 1, "failed"), record("c", "n", 2)])
    with pytest.raises(InvalidInput, match="at least one filter"):
        store.delete()
    assert store.delete(status="failed", dry_run=True) == DeleteCount(1, 1)
    assert store.delete(source="other") == DeleteCount(0, 0)
    assert store.delete(label="positive", model="n") == DeleteCount(1, 1)
    # ids no row can have (NUL, too long) match nothing; they never widen the delete
    assert store.delete(ids=["\x00", "x" * 10_000]) == DeleteCount(0, 0)
    assert store.delete(ids=[]) == DeleteCount(0, 0)
    assert sorted(r.id for r in store.query(limit=None)) == ["a", "b"]


deletes = st.one_of(
    st.tuples(st.just("ids"), st.lists(st.sampled_from("abc"), min_size=1, max_size=2)),
    st.tuples(st.just("model"), st.sampled_from(["m1", "m2", "m3"])),
    st.tuples(st.just("until"), st.integers(min_value=0, max_value=5)),
)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.one_of(st.lists(writes, min_size=1, max_size=3), deletes),
                      min_size=1, max_size=8))
def test_the_flag_follows_the_rule_after_every_write_and_delete(module_store: ResultStore,
                                                                steps: list[Any]) -> None:
    with module_store.engine.begin() as conn:
        conn.execute(sa.text(f"DELETE FROM {RESULTS_TABLE}"))
    for step in steps:
        if isinstance(step, list):
            module_store.upsert([record(*w) for w in step])
            continue
        kind, value = step
        before = set(flags(module_store))
        if kind == "ids":
            gone = module_store.delete(ids=value, batch=2)
            assert not any(key[0] in value for key in flags(module_store))
        elif kind == "model":
            gone = module_store.delete(model=value, batch=2)
            assert not any(key[1] == value for key in flags(module_store))
        else:
            gone = module_store.delete(until=record("x", "m", value).finished_at, batch=2)
        assert gone.rows == len(before) - len(flags(module_store))
        assert_views_agree(module_store)


def test_settle_all_repairs_hand_edits(store: ResultStore) -> None:
    store.upsert([record(f"t{i}", "m1", 1) for i in range(5)] + [record("t0", "m2", 3),
                                                                  record("t3", "m2", 3)])
    with store.engine.begin() as conn:  # by hand: the newest rows of t0 and t3 deleted,
        conn.execute(sa.text(f"DELETE FROM {RESULTS_TABLE} WHERE model = 'm2'"))
        conn.execute(sa.text(f"UPDATE {RESULTS_TABLE} SET latest = :f WHERE id = 't4'"),
                     {"f": False})  # and a flag cleared
    assert sorted(r.id for r in store.query()) == ["t1", "t2"]  # t0, t3, t4 hidden
    assert store.settle_all(batch=2) == 3  # three pages of tasks, the last one short
    assert_views_agree(store)
    assert sorted(r.id for r in store.query()) == [f"t{i}" for i in range(5)]
    assert store.settle_all() == 0


def bertstream(url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", *args],
                          env=settings_env(Settings(database_url=url, broker_url=REDIS_URL)),
                          capture_output=True,
                          text=True, timeout=120, cwd=ROOT, input=stdin)


def test_db_delete_counts_first_and_deletes_with_yes(db_url: str) -> None:
    store = ResultStore.from_url(db_url)
    store.create_schema()
    now = dt.datetime.now(dt.timezone.utc)
    old = [record(f"o{i}", "m", 0) for i in range(3)]  # 2026-12-03 12:00 and later
    for r in old:
        r.finished_at = now - dt.timedelta(days=40)
    store.upsert(old + [record("keep", "m", 0), record("gdpr-1", "m", 0), record("gdpr-2", "m", 0)])
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {RESULTS_TABLE} SET finished_at = :at WHERE id NOT LIKE 'o%'"),
                     {"at": now - dt.timedelta(days=1)})
    out = bertstream(db_url, "db", "delete", "--older-than", "30d")
    assert out.returncode == 0, out.stderr
    assert "would delete 3 row(s) of 3 task(s)" in out.stdout and "--yes" in out.stdout
    assert store.count() == 6
    out = bertstream(db_url, "db", "delete", "--older-than", "30d", "--yes")
    assert "deleted 3 row(s) of 3 task(s)" in out.stdout, out.stderr
    out = bertstream(db_url, "db", "delete", "--ids-file", "-", "--yes", stdin="gdpr-1\n\ngdpr-2\n")
    assert "deleted 2 row(s) of 2 task(s)" in out.stdout, out.stderr
    assert [r.id for r in store.query()] == ["keep"]
    refused = bertstream(db_url, "db", "delete", "--yes")
    assert refused.returncode == 2 and "at least one filter" in refused.stderr
    refused = bertstream(db_url, "db", "delete", "--older-than", "soon")
    assert refused.returncode == 2 and "90d" in refused.stderr
    refused = bertstream(db_url, "db", "delete", "--older-than", "1d", "--until", "2026-01-01")
    assert refused.returncode == 2 and "not both" in refused.stderr
    assert store.count() == 1
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {RESULTS_TABLE} SET latest = :f"), {"f": False})
    out = bertstream(db_url, "db", "settle")
    assert "1 latest flag(s) were wrong" in out.stdout, out.stderr
    assert "every latest flag was right" in bertstream(db_url, "db", "settle").stdout
    store.close()


def test_an_ids_file_from_a_windows_editor_deletes_every_id(sqlite_url: str,
                                                            tmp_path: Path) -> None:
    """An erasure list saved with a byte-order mark and CRLF ends deletes its first id too;
    one in UTF-16 (PowerShell's default) is refused in one line, with nothing deleted."""
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    store.upsert([record("gdpr-1", "m", 0), record("gdpr-2", "m", 0), record("keep", "m", 0)])
    listed = tmp_path / "ids.txt"
    listed.write_bytes("\ufeffgdpr-1\r\ngdpr-2\r\n".encode())
    utf16 = tmp_path / "ids16.txt"
    utf16.write_bytes("keep\r\n".encode("utf-16"))
    refused = bertstream(sqlite_url, "db", "delete", "--ids-file", str(utf16), "--yes")
    assert refused.returncode == 2 and "not UTF-8" in refused.stderr
    assert "Traceback" not in refused.stderr and store.count() == 3
    out = bertstream(sqlite_url, "db", "delete", "--ids-file", str(listed), "--yes")
    assert "deleted 2 row(s) of 2 task(s)" in out.stdout, out.stderr
    assert [r.id for r in store.query()] == ["keep"]
    store.close()


def test_deletes_beside_concurrent_writes_leave_the_rule(db_url: str) -> None:
    """Two writers and a deleter on the same few tasks at once, each with its own store
    (connections): when they stop, every flag follows the rule and the views agree."""
    import random
    import threading

    stores = [ResultStore.from_url(db_url) for _ in range(3)]
    stores[0].create_schema()
    stop = threading.Event()
    failures: list[BaseException] = []

    def writer(store: ResultStore, seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                store.upsert([record(rng.choice("abcd"), rng.choice(["m1", "m2", "m3"]),
                                     rng.randrange(6)) for _ in range(3)])
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    def deleter(store: ResultStore) -> None:
        rng = random.Random(99)
        try:
            while not stop.is_set():
                if rng.random() < 0.5:
                    store.delete(model=rng.choice(["m1", "m2", "m3"]), batch=2)
                else:
                    store.delete(ids=[rng.choice("abcd")])
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(stores[0], 1)),
               threading.Thread(target=writer, args=(stores[1], 2)),
               threading.Thread(target=deleter, args=(stores[2],))]
    for t in threads:
        t.start()
    stop.wait(4)
    stop.set()
    for t in threads:
        t.join(30)
    assert not failures, failures
    assert_views_agree(stores[0])
    for store in stores:
        store.close()


def test_delete_and_settle_refuse_an_outdated_schema_and_touch_nothing(
        store: ResultStore, db_url: str) -> None:
    """On a schema behind the code, `db delete --yes` deleted the rows (PostgreSQL), then
    failed on the missing latest column and exited 3 as if the database were down; now
    delete and settle say which command to run (exit 2) before touching anything."""
    from contract import migrate

    store.upsert([record("t1", "m1", 0), record("t2", "m1", 1)])
    migrate.downgrade(store, "0002")
    for args in (("db", "delete", "--id", "t2", "--yes"), ("db", "settle")):
        out = bertstream(db_url, *args)
        assert out.returncode == 2, out.stderr
        assert "run `bertstream db upgrade`" in out.stderr, out.stderr
    with store.engine.connect() as conn:
        assert sorted(conn.execute(sa.text(f"SELECT id FROM {RESULTS_TABLE}")).scalars()) \
            == ["t1", "t2"]
    migrate.upgrade(store)


@pytest.mark.parametrize("age", ["1000000d", "99999999999d", "999999999999h"])
def test_an_age_past_what_a_date_can_hold_is_a_usage_error(tmp_path: Path, age: str) -> None:
    """Also past what a timedelta can hold (an OverflowError traceback, exit 1, it was)."""
    out = bertstream(f"sqlite:///{tmp_path / 'r.db'}", "db", "delete", "--older-than", age)
    assert out.returncode == 2 and f"Error: Invalid value for '--older-than': '{age}' is " \
        "over 100 years" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
