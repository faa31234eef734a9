"""`compare` reads its totals, flips and largest changes from one join of the two models'
rows (they were three joins, each as slow as the whole table). Pins its whole answer on
a small hand-made table on SQLite and PostgreSQL alike: agreement, flips (ties in order
of labels), mean change, unmatched labels, the largest changes (ties by id) and their
texts, under each filter. Scores are multiples of 1/8 so every sum is exact.

Rows of models run with the neutral band (``BERTSTREAM_NEUTRAL_BELOW``) are labelled
``neutral`` with no ``neutral`` in their scores: ``neutral`` agrees and flips as any
label, and such a text is compared on its top label, never counted unmatched."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa

from contract.queries import Filters, compare
from contract.results import ResultRecord, ResultStore
from tests.test_id_prefix_index import icu_url  # noqa: F401 - a fixture

DAY1 = dt.datetime(2026, 12, 1, 12, tzinfo=dt.timezone.utc)
DAY2 = DAY1 + dt.timedelta(days=1)


def _row(task_id: str, model: str, label: str | None, scores: dict[str, float] | None, *,
         status: str = "done", when: dt.datetime = DAY1, source: str = "s1",
         text: str | None = "keep") -> ResultRecord:
    return ResultRecord(
        id=task_id, model=model, status=status, finished_at=when, source=source, lang="en",
        text_sha256=task_id.ljust(64, "0"), text_chars=6,
        text=None if text is None else f"text {task_id}", label=label,
        score=None if scores is None or label is None else scores[label], scores=scores,
        error="boom" if status == "failed" else None)


def _pn(positive: float, negative: float) -> dict[str, float]:
    return {"positive": positive, "negative": negative}


def _rows() -> list[ResultRecord]:
    return [
        # Agree, B less sure: change -0.25.
        _row("t1", "ma", "positive", _pn(0.75, 0.25)),
        _row("t1", "mb", "positive", _pn(0.5, 0.5)),
        # positive -> negative: change 0.25 - 0.75. A kept no text: B's row gives it.
        _row("t2", "ma", "positive", _pn(0.75, 0.25), source="s2", text=None),
        _row("t2", "mb", "negative", _pn(0.25, 0.75)),
        # negative -> positive from a tie of A's scores: change 0.25 - 0.5 (|change| ties t1).
        _row("t3", "ma", "negative", _pn(0.5, 0.5)),
        _row("t3", "mb", "positive", _pn(0.75, 0.25)),
        # negative -> positive: change 0.375 - 0.875 (ties t2). No row kept its text.
        _row("t4", "ma", "negative", _pn(0.125, 0.875), source="s2", text=None),
        _row("t4", "mb", "positive", _pn(0.625, 0.375), text=None),
        # A's neutral, B without it (a neutral-free pair): unmatched, change 0 - 0.5.
        _row("t5", "ma", "neutral", {"positive": 0.25, "negative": 0.25, "neutral": 0.5}),
        _row("t5", "mb", "positive", _pn(0.75, 0.25)),
        # Failed on one side or the other, B never ran, A's NaN score: all left out.
        _row("t6", "ma", "positive", _pn(0.5, 0.5), when=DAY2),
        _row("t6", "mb", None, None, status="failed", when=DAY2),
        _row("t7", "ma", None, None, status="failed", when=DAY2),
        _row("t7", "mb", "positive", _pn(0.5, 0.5), when=DAY2),
        _row("t8", "ma", "positive", _pn(0.5, 0.5), when=DAY2),
        _row("t9", "ma", "positive", None, when=DAY2),
        _row("t9", "mb", "positive", _pn(0.5, 0.5), when=DAY2),
        # Agree, no change; agree, B surer: change +0.25.
        _row("t10", "ma", "positive", _pn(1.0, 0.0), when=DAY2, source="s2"),
        _row("t10", "mb", "positive", _pn(1.0, 0.0), when=DAY2),
        _row("t11", "ma", "negative", _pn(0.375, 0.625), when=DAY2),
        _row("t11", "mb", "negative", _pn(0.125, 0.875), when=DAY2),
        # A third model on t1 only: not in an ma/mb comparison.
        _row("t1", "mc", "negative", _pn(0.25, 0.75)),
    ]


def _top(task_id: str, text: str | None, label_a: str, score_a: float, label_b: str,
         score_b: float, change: float) -> dict[str, Any]:
    return {"id": task_id, "text": text, "label_a": label_a, "score_a": score_a,
            "label_b": label_b, "score_b": score_b, "change": change}


T1 = _top("t1", "text t1", "positive", 0.75, "positive", 0.5, -0.25)
T2 = _top("t2", "text t2", "positive", 0.75, "negative", 0.75, -0.5)
T3 = _top("t3", "text t3", "negative", 0.5, "positive", 0.75, -0.25)
T4 = _top("t4", None, "negative", 0.875, "positive", 0.625, -0.5)
T5 = _top("t5", "text t5", "neutral", 0.5, "positive", 0.75, -0.5)
T10 = _top("t10", "text t10", "positive", 1.0, "positive", 1.0, 0.0)
T11 = _top("t11", "text t11", "negative", 0.625, "negative", 0.875, 0.25)


def _answer(texts: int, agree: int, flips: list[tuple[str, str, int]], mean: float | None,
            unmatched: int, largest: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model_a": "ma", "model_b": "mb", "texts": texts, "agree": agree,
            "agreement": agree / texts if texts else None,
            "flips": [{"from": a, "to": b, "count": n} for a, b, n in flips],
            "mean_change": mean, "unmatched": unmatched, "largest": largest}


CASES = [
    pytest.param(Filters(), 10, _answer(
        7, 3, [("negative", "positive", 2), ("neutral", "positive", 1),
               ("positive", "negative", 1)], -1.75 / 7, 1, [T2, T4, T5, T1, T11, T3, T10]),
        id="all"),
    pytest.param(Filters(), 2, _answer(
        7, 3, [("negative", "positive", 2), ("neutral", "positive", 1),
               ("positive", "negative", 1)], -1.75 / 7, 1, [T2, T4]), id="top-2"),
    pytest.param(Filters(source="s2"), 10, _answer(
        3, 1, [("negative", "positive", 1), ("positive", "negative", 1)], -1.0 / 3, 0,
        [T2, T4, T10]), id="source"),
    pytest.param(Filters(since=DAY2 - dt.timedelta(hours=1)), 10, _answer(
        2, 2, [], 0.125, 0, [T11, T10]), id="since"),
    pytest.param(Filters(until=DAY2), 10, _answer(
        5, 1, [("negative", "positive", 2), ("neutral", "positive", 1),
               ("positive", "negative", 1)], -2.0 / 5, 1, [T2, T4, T5, T1, T3]), id="until"),
    pytest.param(Filters(label="negative", lang="en"), 10, _answer(
        3, 1, [("negative", "positive", 2)], -0.5 / 3, 0, [T4, T11, T3]), id="label"),
    pytest.param(Filters(source="nowhere"), 10, _answer(0, 0, [], None, 0, []), id="none"),
]


@pytest.mark.parametrize(("filters", "top", "expected"), CASES)
def test_compare_answers_every_field(store: ResultStore, filters: Filters, top: int,
                                     expected: dict[str, Any]) -> None:
    store.upsert(_rows())
    assert compare(store, "ma", "mb", filters, top=top).as_dict() == expected


def test_models_the_other_way_round(store: ResultStore) -> None:
    store.upsert(_rows())
    got = compare(store, "mb", "ma", Filters(source="s1", until=DAY2)).as_dict()
    assert got == {
        "model_a": "mb", "model_b": "ma", "texts": 5, "agree": 1, "agreement": 0.2,
        "flips": [{"from": "positive", "to": "negative", "count": 2},
                  {"from": "negative", "to": "positive", "count": 1},
                  {"from": "positive", "to": "neutral", "count": 1}],
        # B (ma) has every label of A (mb): t5's positive is in ma's scores.
        "mean_change": (0.25 - 0.5 - 0.25 - 0.5 - 0.5) / 5, "unmatched": 0,
        "largest": [
            _top("t2", "text t2", "negative", 0.75, "positive", 0.75, -0.5),
            _top("t4", None, "positive", 0.625, "negative", 0.875, -0.5),
            _top("t5", "text t5", "positive", 0.75, "neutral", 0.5, -0.5),
            _top("t1", "text t1", "positive", 0.5, "positive", 0.75, 0.25),
            _top("t3", "text t3", "positive", 0.75, "negative", 0.5, -0.25)]}


def _banded(task_id: str, model: str, positive: float, *, neutral: bool = False) -> ResultRecord:
    """A row of a two-label model run with the neutral band: ``neutral`` below it, the score
    still the top probability and the scores the model's two (a tie's top is ``negative``,
    the first by name)."""
    top = "positive" if positive > 0.5 else "negative"
    row = _row(task_id, model, top, _pn(positive, 1 - positive))
    return dataclasses.replace(row, label="neutral") if neutral else row


def _banded_rows() -> list[ResultRecord]:
    return [
        # Both neutral: they agree; B a little less sure of A's top label: -0.0625.
        _banded("n1", "na", 0.625, neutral=True), _banded("n1", "nb", 0.5625, neutral=True),
        # neutral -> positive: B's positive 0.875 against A's top (positive) 0.625.
        _banded("n2", "na", 0.625, neutral=True), _banded("n2", "nb", 0.875),
        # positive -> neutral: B's positive 0.625 against 0.875.
        _banded("n3", "na", 0.875), _banded("n3", "nb", 0.625, neutral=True),
        # A's tie is neutral, its top label negative by name: 0.75 - 0.5.
        _banded("n4", "na", 0.5, neutral=True), _banded("n4", "nb", 0.25),
        # Agree on negative: 0.75 - 0.875.
        _banded("n5", "na", 0.125), _banded("n5", "nb", 0.25),
    ]


def _banded_top(task_id: str, label_a: str, score_a: float, label_b: str, score_b: float,
                change: float) -> dict[str, Any]:
    return _top(task_id, f"text {task_id}", label_a, score_a, label_b, score_b, change)


N1 = _banded_top("n1", "neutral", 0.625, "neutral", 0.5625, -0.0625)
N2 = _banded_top("n2", "neutral", 0.625, "positive", 0.875, 0.25)
N3 = _banded_top("n3", "positive", 0.875, "neutral", 0.625, -0.25)
N4 = _banded_top("n4", "neutral", 0.5, "negative", 0.75, 0.25)
N5 = _banded_top("n5", "negative", 0.875, "negative", 0.75, -0.125)


@pytest.mark.parametrize(("filters", "expected"), [
    pytest.param(Filters(), {
        "texts": 5, "agree": 2, "agreement": 0.4,
        "flips": [{"from": "neutral", "to": "negative", "count": 1},
                  {"from": "neutral", "to": "positive", "count": 1},
                  {"from": "positive", "to": "neutral", "count": 1}],
        "mean_change": 0.0625 / 5, "unmatched": 0, "largest": [N2, N3, N4, N5, N1]}, id="all"),
    pytest.param(Filters(label="neutral"), {
        "texts": 3, "agree": 1, "agreement": 1 / 3,
        "flips": [{"from": "neutral", "to": "negative", "count": 1},
                  {"from": "neutral", "to": "positive", "count": 1}],
        "mean_change": 0.4375 / 3, "unmatched": 0, "largest": [N2, N4, N1]}, id="label"),
])
def test_neutral_band_rows_agree_and_flip(store: ResultStore, filters: Filters,
                                         expected: dict[str, Any]) -> None:
    store.upsert(_banded_rows())
    assert compare(store, "na", "nb", filters).as_dict() == {
        "model_a": "na", "model_b": "nb", **expected}


def test_neutral_band_rows_the_other_way_round(store: ResultStore) -> None:
    store.upsert(_banded_rows())
    got = compare(store, "nb", "na", Filters()).as_dict()
    assert got == {
        "model_a": "nb", "model_b": "na", "texts": 5, "agree": 2, "agreement": 0.4,
        "flips": [{"from": "negative", "to": "neutral", "count": 1},
                  {"from": "neutral", "to": "positive", "count": 1},
                  {"from": "positive", "to": "neutral", "count": 1}],
        "mean_change": -0.0625 / 5, "unmatched": 0,
        "largest": [
            _banded_top("n2", "positive", 0.875, "neutral", 0.625, -0.25),
            _banded_top("n3", "neutral", 0.625, "positive", 0.875, 0.25),
            _banded_top("n4", "negative", 0.75, "neutral", 0.5, -0.25),
            _banded_top("n5", "negative", 0.75, "negative", 0.875, 0.125),
            _banded_top("n1", "neutral", 0.5625, "neutral", 0.625, 0.0625)]}


def _three_way(task_id: str, model: str, label: str, scores: dict[str, float | None] | None,
               score: float) -> ResultRecord:
    """A row as stored: the neutral band labels ``neutral`` with the top probability as its
    score, whether or not the model has a ``neutral`` label of its own."""
    return dataclasses.replace(_row(task_id, model, "positive", _pn(0.5, 0.5)), label=label,
                               score=score, scores=scores)  # type: ignore[arg-type]


def _pnn(positive: float, neutral: float, negative: float) -> dict[str, float | None]:
    return {"positive": positive, "neutral": neutral, "negative": negative}


def test_a_neutral_text_is_read_on_its_top_label_whatever_its_scores(
        store: ResultStore) -> None:
    """A three-way model (negative, neutral, positive) run with the neutral band labels a
    text ``neutral`` below it even when ``positive`` is its top label: the change is B's
    probability of ``positive`` minus A's, not B's ``neutral`` minus A's ``positive``. A
    JSON null among A's scores (an earlier version's NaN) is no top label on either
    backend; a neutral row without scores is read by its label, not counted unmatched."""
    store.upsert([
        # The band's neutral, positive top: 0.75 - 0.5 (by name it read 0.125 - 0.5).
        _three_way("k1", "ta", "neutral", _pnn(0.5, 0.25, 0.25), 0.5),
        _three_way("k1", "tb", "positive", _pnn(0.75, 0.125, 0.125), 0.75),
        # The model's own neutral, its top: 0.5 - 0.625.
        _three_way("k2", "ta", "neutral", _pnn(0.25, 0.625, 0.125), 0.625),
        _three_way("k2", "tb", "neutral", _pnn(0.25, 0.5, 0.25), 0.5),
        # neutral tied with positive at the top: neutral, 0.25 - 0.375.
        _three_way("k3", "ta", "neutral", _pnn(0.375, 0.375, 0.25), 0.375),
        _three_way("k3", "tb", "positive", _pnn(0.625, 0.25, 0.125), 0.625),
        # A null member is passed over: negative, 0.125 - 0.375 (PostgreSQL read positive).
        _three_way("k4", "ta", "neutral", {"positive": None, "negative": 0.375}, 0.375),
        _three_way("k4", "tb", "positive", _pn(0.875, 0.125), 0.875),
        # No scores: read by its label, 0.875 - 0.5 (it counted unmatched, -0.5).
        _three_way("k5", "ta", "neutral", None, 0.5),
        _three_way("k5", "tb", "neutral", _pnn(0.0625, 0.875, 0.0625), 0.875),
    ])
    assert compare(store, "ta", "tb", Filters()).as_dict() == {
        "model_a": "ta", "model_b": "tb", "texts": 5, "agree": 2, "agreement": 0.4,
        "flips": [{"from": "neutral", "to": "positive", "count": 3}],
        "mean_change": 0.125 / 5, "unmatched": 0,
        "largest": [_top("k5", "text k5", "neutral", 0.5, "neutral", 0.875, 0.375),
                    _top("k1", "text k1", "neutral", 0.5, "positive", 0.75, 0.25),
                    _top("k4", "text k4", "neutral", 0.375, "positive", 0.875, -0.25),
                    _top("k2", "text k2", "neutral", 0.625, "neutral", 0.5, -0.125),
                    _top("k3", "text k3", "neutral", 0.375, "positive", 0.625, -0.125)]}


def test_a_tie_reads_the_same_label_under_any_collation(store: ResultStore,
                                                        icu_url: str) -> None:  # noqa: F811
    """Of two top labels tied, the first by code point on SQLite and on PostgreSQL whatever
    the database's collation (ICU's en-US puts ``a`` before ``B``): the same rows gave
    another change on a database initialised under a language locale."""
    rows = [_three_way("z1", "ta", "neutral", {"a": 0.5, "B": 0.5}, 0.5),
            _three_way("z1", "tb", "a", {"a": 0.75, "B": 0.25}, 0.75)]
    icu = ResultStore.from_url(icu_url)
    try:
        for each in (store, icu):
            each.create_schema()
            each.upsert(rows)
            assert compare(each, "ta", "tb", Filters()).largest[0]["change"] == -0.25  # B
    finally:
        icu.close()


def test_a_neutral_row_whose_scores_are_not_json_is_read_by_its_label(
        sqlite_store: ResultStore) -> None:
    """An earlier version stored on SQLite a multi-label head's NaN beside a finite top
    score (NaN, not JSON): the neutral row is read by its label, not the whole comparison
    refused as the database being unavailable."""
    sqlite_store.upsert([
        _three_way("q1", "ta", "neutral", {"x": 0.25, "y": 0.125}, 0.25),
        _three_way("q1", "tb", "x", {"x": 0.75, "y": 0.125}, 0.75),
        _three_way("q2", "ta", "neutral", {"x": 0.5, "neutral": 0.25}, 0.5),
        _three_way("q2", "tb", "neutral", {"x": 0.25, "neutral": 0.625}, 0.625)])
    with sqlite_store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE bertstream_results SET scores = :nan WHERE id = 'q2' "
                             "AND model = 'ta'"), {"nan": '{"x": NaN, "neutral": 0.25}'})
    got = compare(sqlite_store, "ta", "tb", Filters())
    assert (got.texts, got.unmatched, got.mean_change) == (2, 0, (0.5 + 0.125) / 2)
