"""``ResultStore.upsert`` says which records it wrote: the refused ones are the list it
gives (as before), the written ones its ``written``. A record a ``done`` row kept out,
or a copy of its key the batch dropped, is not written; the metrics count on this."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from contract.results import ResultRecord, ResultStore, results
from tests.test_results_store import record


def failed(task_id: str) -> ResultRecord:
    return record(task_id, status="failed", label=None, score=None, scores=None, error="boom")


@pytest.mark.parametrize("path", ["bulk", "plain", "row-by-row"])
def test_upsert_gives_the_records_it_wrote(store: ResultStore, path: str) -> None:
    """New rows and a failed row replaced are written; a done row keeps its record out;
    of two copies in one batch only the kept one is written; a refused one is not.
    ``plain``: the write through Connection.execute (no fast executemany); ``row-by-row``:
    an SQLite without RETURNING (older than 3.35) is told row by row."""
    if path == "plain":
        store._bulk = None  # force Connection.execute
    store.engine.dialect.insert_executemany_returning = path != "row-by-row"
    first = store.upsert([record("done-before"), failed("failed-before")])
    assert first == [] and [r.id for r in first.written] == ["done-before", "failed-before"]
    new, again, retry = record("new"), record("done-before", label="negative"), record(
        "failed-before")
    dup_failed, dup_done = failed("dup"), record("dup")
    bad = record("bad", status="no-such-status")
    got = store.upsert([new, again, retry, dup_failed, dup_done, bad])
    assert [r.record for r in got] == [bad]
    assert {r.id: r for r in got.written} == {"new": new, "failed-before": retry,
                                              "dup": dup_done}
    assert all(any(w is r for r in (new, retry, dup_done)) for w in got.written)
    kept = store.get("done-before")
    assert kept is not None and kept.label == "positive" and kept.attempts == 1
    assert store.upsert([record("done-before")]).written == []


def test_a_done_row_committed_while_the_upsert_waits_keeps_its_record_out(
        store: ResultStore) -> None:
    """Another writer holds an uncommitted done row of the same id: the upsert waits for
    it, then keeps it (its own record is not written) and writes the rest."""
    other = sa.create_engine(store.engine.url)
    done = record("raced", worker="other@h")
    mine, rest = failed("raced"), record("rest")
    box: dict[str, object] = {}
    try:
        with other.begin() as conn:
            conn.execute(sa.insert(results), [dict(vars(done), latest=True)])
            writer = threading.Thread(target=lambda: box.update(got=store.upsert([mine, rest])))
            writer.start()
            time.sleep(0.3)  # the upsert is now waiting on the other writer's lock
        writer.join(timeout=30)
    finally:
        other.dispose()
    got = box["got"]
    assert got == [] and [r.id for r in got.written] == ["rest"]  # type: ignore[attr-defined]
    row = store.get("raced")
    assert row is not None and row.status == "done" and row.worker == "other@h"
