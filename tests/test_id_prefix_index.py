"""The id-prefix search on PostgreSQL databases whose collation is not code point order:
schema revision 0004 indexes ``id COLLATE "C"`` there, so the search reads a range of that
index instead of the whole table; elsewhere it adds nothing."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from api.dashboard import _search_query, search
from contract import migrate
from contract.constants import RESULTS_TABLE
from contract.queries import Filters
from contract.results import ResultRecord, ResultStore
from tests.conftest import PG_URL

INDEX = f"ix_{RESULTS_TABLE}_id_c"
T0 = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)


def _rec(task_id: str) -> ResultRecord:
    return ResultRecord(id=task_id, text_sha256="0" * 64, text_chars=4, model="m",
                        status="done", label="positive", score=0.9, finished_at=T0)


@pytest.fixture
def icu_url() -> Iterator[str]:
    """A fresh PostgreSQL database whose default collation is ICU's en-US (not code point
    order), as a database initialised under a language locale is."""
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"bst_icu_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            try:
                conn.execute(sa.text(
                    f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu"
                    " ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"))
            except sa.exc.DBAPIError as exc:  # before PostgreSQL 15, or no ICU built in
                pytest.skip(f"this PostgreSQL server cannot make an ICU database: {exc}")
        yield str(sa.make_url(PG_URL).set(database=name))
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def _indexes(store: ResultStore) -> set[str]:
    return store.run(lambda conn: {ix["name"] for ix in sa.inspect(conn).get_indexes(
        RESULTS_TABLE)}, "cannot read the indexes")


def _plan(store: ResultStore, prefix: str) -> str:
    """PostgreSQL's plan for the dashboard's id-prefix search, sequential scans priced out
    (the table is small; the question is whether an index in the right order exists)."""
    def explain(conn: sa.Connection) -> str:
        conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
        query = _search_query(conn, Filters(), None, prefix, 50, 1000)
        sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
        return "\n".join(conn.execute(sa.text("EXPLAIN " + sql)).scalars())

    with store.engine.begin() as conn:
        return explain(conn)


def test_an_icu_database_gets_the_index_and_the_search_reads_it(icu_url: str) -> None:
    store = ResultStore.from_url(icu_url)
    try:
        migrate.upgrade(store, "0003")
        store.upsert([_rec(i) for i in ("review-8", "review-9", "review-90", "review-:",
                                        "other")])
        assert INDEX not in _indexes(store)
        before = _plan(store, "review-9")
        assert INDEX not in before and "Seq Scan" in before  # the whole table, then a sort
        assert store.run(migrate.id_sorts_by_code_point, "collation") is False

        migrate.upgrade(store)
        assert INDEX in _indexes(store)
        after = _plan(store, "review-9")
        assert INDEX in after and "Seq Scan" not in after, after
        # Same answers, in code point order (`:` sorts after the digits there, not in ICU).
        assert [r.id for r in search(store, Filters(), task_id="review-9")] == [
            "review-9", "review-90"]
        assert [r.id for r in search(store, Filters(), task_id="review-")] == [
            "review-8", "review-9", "review-90", "review-:"]

        assert migrate.downgrade(store, "0003") == (migrate.head_revision(), "0003")
        assert INDEX not in _indexes(store)
        migrate.upgrade(store)
        migrate.upgrade(store)  # idempotent
        assert INDEX in _indexes(store)
    finally:
        store.close()


def test_code_point_databases_get_no_second_index(db_url: str) -> None:
    """SQLite and a C-collated PostgreSQL: the primary key serves the range already, and
    a second index on the ids would only cost writes."""
    store = ResultStore.from_url(db_url)
    try:
        store.create_schema()
        assert migrate.state(store).current == migrate.head_revision()
        assert INDEX not in _indexes(store)
        store.upsert([_rec("a-1"), _rec("a-2"), _rec("b-1")])
        assert [r.id for r in search(store, Filters(), task_id="a-")] == ["a-1", "a-2"]
    finally:
        store.close()
