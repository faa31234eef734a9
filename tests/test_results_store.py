"""The results table: idempotent upserts and queries, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest

from contract.errors import InvalidInput
from contract.results import ResultRecord, ResultStore, utcnow


def record(task_id: str, **kw: object) -> ResultRecord:
    base: dict[str, object] = dict(
        id=task_id, text_sha256="0" * 64, text_chars=4, model="m", status="done",
        finished_at=utcnow(), label="positive", score=0.9,
        scores={"negative": 0.1, "positive": 0.9}, source="s1",
        submitted_at=utcnow() - dt.timedelta(seconds=1),
    )
    base.update(kw)
    return ResultRecord(**base)  # type: ignore[arg-type]


def test_done_row_is_final(store: ResultStore) -> None:
    store.upsert([record("a")])
    store.upsert([record("a", label="negative", score=0.2)])
    got = store.get("a")
    assert got is not None and got.label == "positive" and got.attempts == 1
    assert store.count() == 1


def test_failed_row_is_replaced_by_a_later_success(store: ResultStore) -> None:
    store.upsert([record("b", status="failed", label=None, score=None, scores=None, error="boom")])
    store.upsert([record("b")])
    got = store.get("b")
    assert got is not None and got.status == "done" and got.error is None and got.attempts == 2


def test_duplicates_within_one_flush_make_one_row(store: ResultStore) -> None:
    store.upsert([record("c"), record("c", label="negative")])
    assert store.count() == 1


def test_queries_and_aggregates(store: ResultStore) -> None:
    t0 = utcnow()
    store.upsert([record(f"p{i}", finished_at=t0 + dt.timedelta(seconds=i)) for i in range(5)]
                 + [record(f"n{i}", label="negative", source="s2", score=0.7) for i in range(3)])
    assert len(store.query(label="positive", limit=None)) == 5
    assert len(store.query(source="s2", limit=None)) == 3
    assert [r.id for r in store.query(since=t0 + dt.timedelta(seconds=3), label="positive")] == ["p4", "p3"]
    assert len(store.query(limit=2)) == 2
    agg = {g["label"]: g for g in store.aggregate(by="label")}
    assert agg["positive"]["count"] == 5 and agg["negative"]["mean_score"] == pytest.approx(0.7)
    assert store.get("p0") is not None and store.get("p0").finished_at.tzinfo is not None  # type: ignore[union-attr]
    with pytest.raises(InvalidInput):
        store.aggregate(by="text")


def test_bulk_writer_stores_exactly_what_sqlalchemy_stores(store: ResultStore) -> None:
    """The fast executemany path and Connection.execute leave byte-identical rows."""
    import sqlalchemy as sa

    from contract.results import results

    assert store._writer() is not None, "the fast path must be in use on this database"
    variants: list[dict[str, object]] = [
        {}, {"meta": {"k": [1, "x"], "u": "世界"}}, {"status": "failed", "label": None,
         "score": None, "scores": None, "error": "bad input"},
        {"started_at": None, "submitted_at": None, "truncated": True, "text": "héllo"},
    ]
    store.upsert([record(f"fast-{i}", **v) for i, v in enumerate(variants)])
    store._bulk = None  # type: ignore[assignment]  # force Connection.execute
    store.upsert([record(f"plain-{i}", **v) for i, v in enumerate(variants)])
    # compare what the database holds, JSON as stored text, bypassing result processing
    cols = [sa.cast(c, sa.Text).label(c.name) if isinstance(c.type, sa.JSON) else c
            for c in results.columns if c.name not in ("id", "finished_at", "submitted_at")]
    with store.engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(results.c.id, *cols))}
    for i in range(len(variants)):
        fast, plain = rows[f"fast-{i}"]._mapping, rows[f"plain-{i}"]._mapping
        assert {k: v for k, v in fast.items() if k != "id"} == \
               {k: v for k, v in plain.items() if k != "id"}, i


def test_missing_meta_and_scores_are_sql_null(store: ResultStore) -> None:
    import sqlalchemy as sa

    from contract.results import results

    store.upsert([record("n1", meta=None), record("n2", meta={"k": 1}),
                  record("n3", status="failed", label=None, score=None, scores=None, error="x")])
    c = results.c
    with store.engine.connect() as conn:
        null_meta = conn.execute(sa.select(c.id).where(c.meta.is_(None)).order_by(c.id)).scalars()
        assert list(null_meta) == ["n1", "n3"]
        null_scores = conn.execute(sa.select(c.id).where(c.scores.is_(None))).scalars()
        assert list(null_scores) == ["n3"]
    n1 = store.get("n1")
    assert n1 is not None and n1.meta is None


def test_count_takes_the_query_filters(store: ResultStore) -> None:
    store.upsert([record(f"k{i}", source="a" if i % 2 else "b") for i in range(7)]
                 + [record("kf", status="failed", label=None, error="x")])
    assert store.count() == 8
    assert store.count(source="a") == 3
    assert store.count(status="done", source="b") == 4
    assert store.count(ids=["k1", "k2", "nope"]) == 2
    assert store.count(label="positive", status="failed") == 0


def test_done_ids_finds_done_rows_only(store: ResultStore) -> None:
    ids = [f"t{i}" for i in range(1_200)]  # over one 500-id chunk
    store.upsert([record(i, status="done" if n % 3 else "failed") for n, i in enumerate(ids)])
    store.upsert([record("other-model", model="m2")])
    done = store.done_ids(ids + ["other-model", "absent"], model="m")
    assert done == {i for n, i in enumerate(ids) if n % 3}
    assert store.done_ids(["other-model", "t1", "t0"]) == {"other-model", "t1"}
    assert store.done_ids(["other-model"], model="m") == set()


def test_the_flush_lookups_search_the_key_not_the_status_index(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SQLite's planner, given ``status = 'done'`` beside a long IN list, walked the status
    index (every done row) instead of the primary key: each flush's lookup grew with the
    table. The plan of every SELECT the done-ids lookup and the windows' write send."""
    import sqlalchemy as sa

    from contract.results import WindowRecord

    store = ResultStore.from_url(f"sqlite:///{tmp_path}/plan.db")
    store.create_schema()
    store.upsert([record(f"r{i}") for i in range(600)])
    selects: list[tuple[str, object]] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT") and "bertstream_results" in statement:
            selects.append((statement, parameters))

    store.done_ids([f"r{i}" for i in range(600)], model="m")
    store.done_ids([f"r{i}" for i in range(600)])
    win = WindowRecord(id="w", model="m", window=0, start_char=0, end_char=4, tokens=3,
                       label="positive", score=0.9, scores={"positive": 0.9, "negative": 0.1})
    store.upsert([record("w", windows=1)], windows={("w", "m"): [win]})
    assert len(selects) >= 5
    with store.engine.connect() as conn:
        for statement, params in selects:
            plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + statement, params))
            assert "sqlite_autoindex_bertstream_results_1" in plan, (statement[:120], plan)
    store.close()


def test_reads_by_ids_search_the_key_whatever_else_filters(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SQLite: given ids, a read that also filters by status, label, source, lang or time
    searched that column's index (every row with the status, say) instead of the ids'
    keys. The plan of each such query and count, and their answers."""
    import sqlalchemy as sa

    store = ResultStore.from_url(f"sqlite:///{tmp_path}/plan.db")
    store.create_schema()
    t0 = utcnow()
    store.upsert([record(f"r{i}", status="done" if i % 4 else "failed", lang="en",
                         label="positive" if i % 3 else "negative",
                         finished_at=t0 - dt.timedelta(seconds=i)) for i in range(800)])
    ids = [f"r{i}" for i in range(0, 800, 8)] + ["absent"]
    sent: list[tuple[str, object]] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append((statement, parameters))

    since = t0 - dt.timedelta(seconds=400)

    def matches(i: int, kw: dict[str, object]) -> bool:
        row = {"status": "done" if i % 4 else "failed", "label": "positive" if i % 3 else "negative",
               "source": "s1", "lang": "en"}
        return (all(row[k] == v for k, v in kw.items() if k != "since")
                and ("since" not in kw or i <= 400))

    for kw in ({"status": "failed"}, {"label": "negative"}, {"source": "s1"}, {"lang": "en"},
               {"since": since}, {"status": "done", "label": "positive", "since": since}):
        want = {f"r{i}" for i in range(0, 800, 8) if matches(i, kw)}
        assert {r.id for r in store.query(ids=ids, limit=None, **kw)} == want, kw  # type: ignore[arg-type]
        assert store.count(ids=ids, **kw) == len(want), kw  # type: ignore[arg-type]
    sa.event.remove(store.engine, "before_cursor_execute", capture)
    assert len(sent) == 12
    with store.engine.connect() as conn:
        for statement, params in sent:
            plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + statement, params))
            assert "sqlite_autoindex_bertstream_results_1 (id=?)" in plan, (statement[-160:], plan)
    store.close()


def test_id_lookups_send_one_array_and_search_the_key_on_postgresql(pg_url: str) -> None:
    """PostgreSQL: reads by ids (get_many, id_states, done_ids, the flag settling) send
    ``id = ANY(array)``, one parameter whatever the count, not an IN list of placeholders,
    and the primary key can serve it (a cast on the column would rule the index out; the
    table is small, so the test turns sequential scans off to ask whether the key applies)."""
    import sqlalchemy as sa

    store = ResultStore.from_url(pg_url)
    store.create_schema()
    store.upsert([record(f"k{i}") for i in range(10_000)])
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE bertstream_results")
    seen: list[tuple[str, object]] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT") and "bertstream_results" in statement:
            seen.append((statement, parameters))

    ids = [f"k{i}" for i in range(0, 10_000, 53)] + ["absent"]
    assert len(store.get_many(ids)) == len(ids) - 1
    assert len(store.id_states(ids)) == len(ids) - 1
    assert len(store.done_ids(ids)) == len(ids) - 1
    store.settle_latest(ids)
    sa.event.remove(store.engine, "before_cursor_execute", capture)
    assert len(seen) >= 4
    with store.engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")
        for statement, params in seen:
            assert "ANY (" in statement and " IN (" not in statement, statement
            plan = " ".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + statement, params))
            assert "bertstream_results_pkey" in plan, (statement, plan)
    store.close()


@pytest.mark.parametrize("task_id", ["a\u0000b", "x" * 300, "", 7])
def test_a_cursor_naming_an_id_no_row_can_have_is_malformed(task_id: object) -> None:
    """A crafted cursor is a 422 ``malformed cursor``, never an id with a NUL that the
    database refuses mid-query (a 500)."""
    import base64
    import json

    from contract.errors import InvalidInput
    from contract.queries import decode_cursor

    raw = json.dumps(["2026-01-01T00:00:00", task_id, "d"]).encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    with pytest.raises(InvalidInput, match="malformed cursor"):
        decode_cursor(cursor, newest_first=True)
    good = base64.urlsafe_b64encode(json.dumps(["2026-01-01T00:00:00", "t-1", "d"]).encode())
    assert decode_cursor(good.decode().rstrip("="), newest_first=True)[1] == "t-1"


def test_one_task_twice_in_a_batch_follows_the_rule_between_batches(store: ResultStore) -> None:
    """An expired copy and its resubmission can meet in one flush: the done record is kept
    whichever comes first, as a later batch would have replaced the expired row; two done
    records keep the first, as a done row is never overwritten."""
    expired = record("k", status="expired", label=None, score=None, scores=None,
                     error="its deadline passed")
    store.upsert([expired, record("k", label="negative", score=0.8,
                                  scores={"negative": 0.8, "positive": 0.2})])
    row = store.get("k")
    assert row is not None and row.status == "done" and row.label == "negative"
    store.upsert([record("j", status="failed", label=None, score=None, scores=None,
                         error="first"),
                  record("j", status="failed", label=None, score=None, scores=None,
                         error="second")])
    assert (store.get("j") or record("x")).error == "second"
    store.upsert([record("d", label="positive"), record("d", label="negative")])
    assert (store.get("d") or record("x")).label == "positive"
