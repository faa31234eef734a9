"""Pages filtered by status or source read their rows from an index in page order.

Every page of ``results``, ``/v1/results`` and their exports is a keyset read in
``(finished_at, id)`` order. Without an index leading with the filter and then that
order, a filter matching few rows (the failed ones, a small source) took the filter's
own index and sorted every matching row at each page: an export read all its rows
once per page. Schema revision 0005 adds ``(source, finished_at, id)`` and
``(status, finished_at, id)``; the plan of a later page must then start from the
cursor on such an index, with no sort.
"""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from contract import migrate
from contract.constants import RESULTS_TABLE
from contract.queries import Filters, _select, iter_records
from contract.results import ResultRecord, ResultStore

T0 = dt.datetime(2026, 9, 1, tzinfo=dt.timezone.utc)
ROWS = 4000
INDEXES = {f"ix_{RESULTS_TABLE}_source_finished", f"ix_{RESULTS_TABLE}_status_finished"}


def _rec(n: int) -> ResultRecord:
    """Row ``n``: one in 50 failed, one in 40 from a small source; four rows share each
    second (a worker's batch), so the page order needs the id as well."""
    failed = n % 50 == 0
    return ResultRecord(id=f"t{n:06d}", text_sha256="0" * 64, text_chars=4, model="m",
                        source="rare" if n % 40 == 1 else "big",
                        status="failed" if failed else "done",
                        label=None if failed else "positive", score=None if failed else 0.9,
                        error="boom" if failed else None,
                        finished_at=T0 + dt.timedelta(seconds=n // 4))


def _plan(store: ResultStore, filters: Filters, position: tuple[dt.datetime, str]) -> str:
    """PostgreSQL's plan for the page after ``position``, newest first. Sequential scans,
    bitmap scans and sorts are priced out: the table is small, where sorting the few
    matching rows is cheap; the question is whether an index serves the page in its
    order from the cursor on."""
    def explain(conn: sa.Connection) -> str:
        conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
        conn.execute(sa.text("SET LOCAL enable_bitmapscan = off"))
        conn.execute(sa.text("SET LOCAL enable_sort = off"))
        query = _select(filters, position, True, 1000)
        sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
        return "\n".join(conn.execute(sa.text("EXPLAIN " + sql)).scalars())

    with store.engine.begin() as conn:
        return explain(conn)


def _indexes(store: ResultStore) -> set[str]:
    return store.run(lambda conn: {ix["name"] for ix in sa.inspect(conn).get_indexes(
        RESULTS_TABLE)}, "cannot read the indexes")


@pytest.mark.parametrize(("column", "value"), [("status", "failed"), ("source", "rare")])
def test_a_filtered_page_reads_an_index_in_page_order(pg_url: str, column: str,
                                                      value: str) -> None:
    store = ResultStore.from_url(pg_url)
    try:
        store.create_schema()
        store.upsert([_rec(n) for n in range(ROWS)])
        with store.engine.begin() as conn:
            conn.execute(sa.text(f"ANALYZE {RESULTS_TABLE}"))
        filters = Filters(**{column: value})
        wanted = sorted((r for r in map(_rec, range(ROWS)) if getattr(r, column) == value),
                        key=lambda r: (r.finished_at, r.id), reverse=True)
        middle = wanted[len(wanted) // 2]
        plan = _plan(store, filters, (middle.finished_at, middle.id))
        assert "Sort" not in plan, plan  # no sort of every matching row at each page
        assert f"Index Cond: ((({column})::text = '{value}'::text) AND (finished_at <=" in plan, plan
        # the same rows, in page order, across pages of a few rows sharing instants
        got = list(iter_records(store, filters, chunk=7, newest_first=True))
        assert [r.id for r in got] == [r.id for r in wanted]

        assert migrate.downgrade(store, "0004")[1] == "0004"
        assert not INDEXES & _indexes(store)
        migrate.upgrade(store)
        migrate.upgrade(store)  # idempotent
        assert INDEXES <= _indexes(store)
    finally:
        store.close()


def test_sqlite_gets_the_indexes_too(sqlite_url: str) -> None:
    store = ResultStore.from_url(sqlite_url)
    try:
        store.create_schema()
        assert INDEXES <= _indexes(store)
    finally:
        store.close()
