"""The ``latest`` flag: each task's newest row (of any model) carries it, whatever the order,
timing and outcome of the writes, on SQLite and PostgreSQL; the default views read it, so
their cost follows the rows asked for, not the table."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import contract.results as results_module
from contract import migrate
from contract.constants import RESULTS_TABLE
from contract.queries import Filters, stats
from contract.results import ResultRecord, ResultStore

T0 = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.timezone.utc)


def record(task_id: str, model: str, minute: int, status: str = "done") -> ResultRecord:
    done = status == "done"
    return ResultRecord(
        id=task_id, text_sha256="0" * 64, text_chars=4, model=model, status=status,
        finished_at=T0 + dt.timedelta(minutes=minute), label="positive" if done else None,
        score=0.9 if done else None, error=None if done else "boom", source="s")


def flags(store: ResultStore) -> dict[tuple[str, str], bool]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT id, model, latest FROM {RESULTS_TABLE}")).all()
    return {(r.id, r.model): bool(r.latest) for r in rows}


def expected(store: ResultStore) -> dict[tuple[str, str], bool]:
    """The rule itself, over every stored row: the last finished, then the greater model."""
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT id, model, finished_at FROM {RESULTS_TABLE}")).all()
    newest: dict[str, tuple[Any, str]] = {}
    for r in rows:
        newest[r.id] = max(newest.get(r.id, (r.finished_at, r.model)), (r.finished_at, r.model))
    return {(r.id, r.model): newest[r.id] == (r.finished_at, r.model) for r in rows}


def assert_views_agree(store: ResultStore) -> None:
    want = expected(store)
    assert flags(store) == want
    shown = {(r.id, r.model) for r in store.query(limit=None)}
    assert shown == {key for key, latest in want.items() if latest}
    by_model = {g["model"]: g["count"] for g in store.aggregate(by="model")}
    assert sum(by_model.values()) == len(want)  # grouped by model: every model's rows


writes = st.tuples(st.sampled_from("abc"), st.sampled_from(["m1", "m2", "m3"]),
                   st.integers(min_value=0, max_value=4), st.sampled_from(["done", "failed"]))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flushes=st.lists(st.lists(writes, min_size=1, max_size=4), min_size=1, max_size=6))
def test_the_flag_follows_the_rule_after_every_write(module_store: ResultStore,
                                                     flushes: list[list[Any]]) -> None:
    """Writes in any order, with ties, retries of failed rows and clocks that go back (a
    newer write that finished "earlier"): after each, exactly the rule's rows are flagged."""
    with module_store.engine.begin() as conn:
        conn.execute(sa.text(f"DELETE FROM {RESULTS_TABLE}"))
    for flush in flushes:
        module_store.upsert([record(*w) for w in flush])
        assert_views_agree(module_store)


def test_a_retry_that_finished_earlier_hands_the_flag_back(store: ResultStore) -> None:
    store.upsert([record("t", "m1", 1)])
    store.upsert([record("t", "m2", 3, "failed")])
    assert flags(store) == {("t", "m1"): False, ("t", "m2"): True}
    store.upsert([record("t", "m2", 0)])  # the retry's host clock is behind
    assert flags(store) == {("t", "m1"): True, ("t", "m2"): False}
    assert [(r.model, r.latest) for r in store.query()] == [("m1", True)]
    assert store.get("t", model="m2").latest is False  # type: ignore[union-attr]


@pytest.mark.parametrize("paused_is_newer", [False, True])
@pytest.mark.parametrize("pause", ["before its commit", "while it settles", "no settling (control)"])
def test_two_models_writing_one_task_at_once_leave_one_latest_row(
        pg_url: str, paused_is_newer: bool, pause: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: one write of task t (model m1) is held at a point of its upsert while a
    write of t under m2 commits and settles, then goes on. Neither transaction sees the
    other's uncommitted row; settling after the commit leaves one flagged row. The control
    holds the write before its commit and skips its settling: both rows stay flagged."""
    paused, other = ResultStore.from_url(pg_url), ResultStore.from_url(pg_url)
    paused.create_schema()
    held, go = threading.Event(), threading.Event()
    writer: dict[str, Any] = {"thread": None}

    def hold() -> None:
        if threading.current_thread() is writer["thread"] and not held.is_set():
            held.set()
            assert go.wait(30)

    if pause == "while it settles":
        real_settle = results_module._settle_latest

        def settle_then_hold(conn: Any, ids: Any) -> None:
            real_settle(conn, ids)  # it has seen only its own row
            hold()

        monkeypatch.setattr(results_module, "_settle_latest", settle_then_hold)
    else:
        real_execute = ResultStore._execute

        def execute_then_hold(self: ResultStore, conn: Any, rows: Any, *args: Any) -> Any:
            wrote = real_execute(self, conn, rows, *args)  # inserted, not committed
            hold()
            return wrote

        monkeypatch.setattr(ResultStore, "_execute", execute_then_hold)
    if pause == "no settling (control)":
        monkeypatch.setattr(paused, "_settle_committed", lambda *a: None)
    failures: list[BaseException] = []

    def write_paused() -> None:
        try:
            paused.upsert([record("t", "m1", 5 if paused_is_newer else 1)])
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    thread = threading.Thread(target=write_paused)
    writer["thread"] = thread
    thread.start()
    try:
        assert held.wait(30)
        other.upsert([record("t", "m2", 3)])  # commits and settles while the first is held
    finally:
        go.set()  # never leave the paused transaction open for the next test's reset
        thread.join(30)
    assert not failures
    got = flags(other)
    if pause == "no settling (control)":
        assert got == {("t", "m1"): True, ("t", "m2"): True}  # the race is real
    else:
        assert got == expected(other) and sum(got.values()) == 1
    paused.close()
    other.close()


def test_upgrade_flags_the_rows_already_stored(db_url: str) -> None:
    store = ResultStore.from_url(db_url)
    migrate.upgrade(store, "0002")
    with store.engine.begin() as conn:
        for task_id, model, minute in (("t1", "old", 0), ("t1", "new", 5), ("t2", "b", 2),
                                       ("t2", "a", 2), ("t3", "only", 1)):
            conn.execute(sa.text(
                f"INSERT INTO {RESULTS_TABLE} (id, model, text_sha256, text_chars, status, "
                "attempts, truncated, finished_at) VALUES (:id, :m, :sha, 4, 'done', 1, :f, :at)"),
                {"id": task_id, "m": model, "sha": "0" * 64, "f": False,
                 "at": T0 + dt.timedelta(minutes=minute)})
    migrate.upgrade(store)
    assert flags(store) == {("t1", "old"): False, ("t1", "new"): True, ("t2", "b"): True,
                            ("t2", "a"): False, ("t3", "only"): True}
    migrate.downgrade(store, "0002")
    with store.engine.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns(RESULTS_TABLE)}
    assert "latest" not in columns and "lang" in columns
    store.close()


def test_settling_searches_the_key(tmp_path: Any) -> None:
    """SQLite: settling reads the tasks' rows, and writes a wrong flag after probing the
    row's newer rows, by the primary key, never a scan."""
    store = ResultStore.from_url(f"sqlite:///{tmp_path}/plan.db")
    store.create_schema()
    store.upsert([record(f"r{i}", "m", 0) for i in range(600)])
    sent: list[tuple[str, Any]] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        head = statement.lstrip().upper()
        if head.startswith("UPDATE") or (head.startswith("SELECT") and "LATEST" in head):
            sent.append((statement, parameters[0] if executemany else parameters))

    store.upsert([record(f"r{i}", "m2", 1) for i in range(600)])
    sa.event.remove(store.engine, "before_cursor_execute", capture)
    assert [s.split()[0] for s, _ in sent] == ["SELECT", "SELECT", "UPDATE"]  # 2 chunks, 1 write
    with store.engine.connect() as conn:
        for statement, params in sent:
            plan = [str(row[-1]) for row in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + statement, params)]
            assert plan and all("SCAN" not in step for step in plan), plan
            assert any("sqlite_autoindex_bertstream_results_1" in step for step in plan), plan
    assert flags(store) == {**{(f"r{i}", "m"): False for i in range(600)},
                            **{(f"r{i}", "m2"): True for i in range(600)}}
    store.close()


def test_the_label_mix_reads_the_range_not_the_table(pg_url: str) -> None:
    """PostgreSQL, 50,000 rows over 50 days: one hour's label mix reads that hour along the
    ``finished_at`` index, with no anti-join against the table (at 1,000,000 rows PostgreSQL
    ran that one over a scan of the whole table whatever the range)."""
    store = ResultStore.from_url(pg_url)
    store.create_schema()
    with store.engine.begin() as conn:
        conn.execute(sa.text(
            f"INSERT INTO {RESULTS_TABLE} (id, model, text_sha256, text_chars, status, label, "
            "attempts, truncated, finished_at) SELECT 'r' || g, 'm', 'x', 4, 'done', "
            "'positive', 1, false, now() - make_interval(secs => g * 86.4::float8) "
            "FROM generate_series(1, 50000) AS g"))
        conn.execute(sa.text(f"ANALYZE {RESULTS_TABLE}"))
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    captured: list[tuple[str, Any]] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT"):
            captured.append((statement, parameters))

    groups = stats(store, Filters(since=since), by="label", bucket="1m")
    assert sum(g["count"] for g in groups) in range(40, 43)
    (statement, params), = captured
    with store.engine.connect() as conn:
        plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + statement, params))
    assert "Anti Join" not in plan and "Seq Scan" not in plan, plan
    assert "ix_bertstream_results_finished_at" in plan, plan
    store.close()


def test_a_redelivery_settles_what_a_crash_after_the_commit_left(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed between its commit and settling (PostgreSQL) leaves two flagged rows;
    the redelivered message finds its rows done and settles them before it is acked."""
    from contract.settings import Settings
    from worker.flush import FlushProcessor
    from worker.runner import NullRunner

    store = ResultStore.from_url(pg_url)
    store.create_schema()
    store.upsert([record("t", "older-model", 0)])
    proc = FlushProcessor(NullRunner(), store, Settings(database_url=pg_url), worker_name="w@h")
    message = ("msg-1", [[{"id": "t", "text": "fine service"}]])
    with monkeypatch.context() as crash:
        crash.setattr(ResultStore, "_settle_committed", lambda *a: None)
        proc.process([message])
    assert flags(store) == {("t", "older-model"): True, ("t", proc.model_key): True}
    stats = proc.process([message], attempt=2)  # the redelivery
    assert stats.items == 1
    assert flags(store) == {("t", "older-model"): False, ("t", proc.model_key): True}
    assert [r.model for r in store.query()] == [proc.model_key]
    store.close()
