"""Read-side answers that must not depend on the backend or on which worker kept a text:
``stats`` and ``top_stats`` put a NULL value last on SQLite and PostgreSQL alike, and
``compare`` shows a text that any row of its task kept."""

from __future__ import annotations

import datetime as dt
import hashlib

from contract.queries import Filters, compare, stats, top_stats
from contract.results import ResultRecord, ResultStore

T0 = dt.datetime(2026, 1, 1, 10, tzinfo=dt.timezone.utc)


def _rec(task_id: str, *, model: str = "m", source: str | None = "s", label: str = "positive",
         p_pos: float = 0.9, minutes: float = 0, text: str | None = "text") -> ResultRecord:
    scores = {"positive": p_pos, "negative": round(1 - p_pos, 6)}
    return ResultRecord(id=task_id, text_sha256=hashlib.sha256(f"text {task_id}".encode())
                        .hexdigest(), text_chars=4, model=model, status="done",
                        finished_at=T0 + dt.timedelta(minutes=minutes), label=label,
                        score=scores[label], scores=scores, source=source, text=text)


def test_no_source_is_last_in_stats_and_loses_a_tie_in_top_stats(store: ResultStore) -> None:
    """Sources NULL x2, a x2, b, c (both hours): PostgreSQL sorted NULL last and SQLite
    first, so the two listed the groups differently and kept a different group of a tie."""
    sources = [None, None, "a", "a", "b", "c"]
    store.upsert([_rec(f"t{i}", source=s, minutes=61 * (i % 2)) for i, s in enumerate(sources)])
    assert [(g["source"], g["count"]) for g in stats(store, Filters(), by="source")] == [
        ("a", 2), ("b", 1), ("c", 1), (None, 2)]
    per_hour = [(g["bucket"], g["source"]) for g in stats(store, Filters(), by="source",
                                                          bucket="1h")]
    assert per_hour == [("2026-01-01T10:00:00Z", "a"), ("2026-01-01T10:00:00Z", "b"),
                        ("2026-01-01T10:00:00Z", None), ("2026-01-01T11:00:00Z", "a"),
                        ("2026-01-01T11:00:00Z", "c"), ("2026-01-01T11:00:00Z", None)]
    one = top_stats(store, Filters(), by="source", limit=1)  # a and NULL tie at 2 rows
    assert [(g["source"], g["count"]) for g in one.groups] == [("a", 2)]
    assert [(o["values"], o["count"]) for o in one.other] == [(3, 4)]
    two = top_stats(store, Filters(), by="source", limit=2)
    assert [(g["source"], g["count"]) for g in two.groups] == [("a", 2), (None, 2)]
    hourly = top_stats(store, Filters(), by="source", bucket="1h", limit=2)
    assert [(g["bucket"], g["source"]) for g in hourly.groups] == [
        ("2026-01-01T10:00:00Z", "a"), ("2026-01-01T10:00:00Z", None),
        ("2026-01-01T11:00:00Z", "a"), ("2026-01-01T11:00:00Z", None)]
    every = top_stats(store, Filters(), by="source", limit=10)
    assert [g["source"] for g in every.groups] == ["a", "b", "c", None] and every.other == []


def test_compare_shows_the_text_another_model_kept(store: ResultStore) -> None:
    """A's worker ran with BERTSTREAM_STORE_TEXT=false, B's kept the texts: the largest
    changes show B's copy; a task no row of which kept its text shows none."""
    store.upsert([
        _rec("x1", model="A", text=None), _rec("x1", model="B", p_pos=0.2, minutes=1,
                                                 text="kept by B"),
        _rec("x2", model="A", text="kept by A"), _rec("x2", model="B", p_pos=0.5, minutes=1),
        _rec("x3", model="A", text=None), _rec("x3", model="B", p_pos=0.8, minutes=1,
                                                 text=None),
    ])
    result = compare(store, "A", "B", Filters())
    assert [(r["id"], r["text"]) for r in result.largest] == [
        ("x1", "kept by B"), ("x2", "kept by A"), ("x3", None)]
