"""One export reads one snapshot: rows written while it runs (a task's ``latest`` flag moving
to another model's row, a failed row replaced by its retry) neither drop nor repeat a task,
on SQLite and PostgreSQL; an export abandoned half-way gives its connection back."""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
from typing import Any

import sqlalchemy as sa

from contract.queries import Filters, iter_records
from contract.results import ResultRecord, ResultStore

T0 = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.timezone.utc)
TEXT = "a text"
SHA = hashlib.sha256(TEXT.encode()).hexdigest()


def record(task_id: str, model: str, minutes: float, status: str = "done") -> ResultRecord:
    done = status == "done"
    return ResultRecord(
        id=task_id, text_sha256=SHA, text_chars=len(TEXT), model=model, status=status,
        finished_at=T0 + dt.timedelta(minutes=minutes), text=TEXT,
        label="positive" if done else None, score=0.9 if done else None,
        error=None if done else "boom", source="s")


def _seed(store: ResultStore) -> None:
    """Latest rows, oldest first: t0 (0), t1 (1), t2 (2), t3 (3, failed; its A row at 0.5 is
    not latest), t4 (4), t5 (5)."""
    store.upsert([record("t0", "A", 0), record("t1", "A", 1), record("t2", "A", 2),
                  record("t3", "A", 0.5), record("t3", "B", 3, "failed"),
                  record("t4", "A", 4), record("t5", "A", 5)])


def _moves(store: ResultStore) -> None:
    """Writes that move the latest row of tasks already exported and not yet exported."""
    store.upsert([
        record("t0", "B", 10),  # exported: its latest row is now B's, at the end
        record("t4", "B", 11),  # not yet exported: its A row is no longer latest
        record("t3", "B", 0),  # the retry of the failed row finished "earlier" (clock behind):
        # t3's latest is its A row again, at 0.5, before the export's position
        record("t2", "C", 12, "failed"),  # not yet exported: a failed row takes the flag
    ])


def _json(rows: Any) -> list[dict[str, Any]]:
    return [r.to_json() for r in rows]


def _check_snapshot(store: ResultStore, newest_first: bool) -> None:
    _seed(store)
    at_start = _json(iter_records(store, Filters(), newest_first=newest_first))
    assert len(at_start) == 6
    export = iter_records(store, Filters(), chunk=2, newest_first=newest_first)
    first_page = [next(export), next(export)]  # the first page only; the next is not read
    _moves(store)
    got = _json(first_page) + _json(export)
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)), f"a task repeated: {ids}"
    assert sorted(ids) == [f"t{i}" for i in range(6)], f"a task dropped: {ids}"
    assert got == at_start
    # A later export sees the writes.
    after = _json(iter_records(store, Filters(), chunk=2, newest_first=newest_first))
    assert after != at_start
    assert sorted(r["id"] for r in after) == [f"t{i}" for i in range(6)]


def test_an_export_reads_one_snapshot_oldest_first(store: ResultStore) -> None:
    _check_snapshot(store, newest_first=False)


def test_an_export_reads_one_snapshot_newest_first(store: ResultStore) -> None:
    _check_snapshot(store, newest_first=True)


def test_an_abandoned_export_releases_its_connection(store: ResultStore) -> None:
    _seed(store)
    pool: Any = store.engine.pool
    closed = iter_records(store, Filters(), chunk=2)
    next(closed)
    closed.close()  # as a server does when its client disconnects
    assert pool.checkedout() == 0
    dropped = iter_records(store, Filters(), chunk=2)
    next(dropped)
    del dropped  # never closed: finalised when collected
    gc.collect()
    assert pool.checkedout() == 0
    # Nothing is left holding a snapshot or a lock: a write and a full export go through.
    store.upsert([record("t9", "A", 20)])
    assert [r.id for r in iter_records(store, Filters(), chunk=2)][-1] == "t9"
    if store.engine.dialect.name == "postgresql":
        with store.engine.connect() as conn:
            idle = conn.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND state LIKE 'idle in transaction%'")).scalar_one()
        assert idle == 0


def test_an_export_of_nothing_and_of_exact_pages(store: ResultStore) -> None:
    assert list(iter_records(store, Filters(), chunk=2)) == []
    store.upsert([record(f"t{i}", "A", i) for i in range(4)])
    assert [r.id for r in iter_records(store, Filters(), chunk=2)] == ["t0", "t1", "t2", "t3"]
    assert [r.id for r in iter_records(store, Filters(), chunk=2, newest_first=True)] == [
        "t3", "t2", "t1", "t0"]
