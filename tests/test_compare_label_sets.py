"""Comparing two models whose label sets differ (a user's LABEL_0/LABEL_1 model against
the bundled positive/negative one): agreement and the change compare label names, so
`compare` and `/v1/compare` say on how many texts B has no label named as A's, instead
of a bare 0 % agreement that reads as total disagreement. A label name may hold any
character config.json's id2label gives (a double quote, a backslash): SQLite's JSON path
could not quote them, so such a label read as missing there while PostgreSQL read it;
both backends must give the same comparison."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from contract.queries import Filters, compare
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from tests.producer_helpers import invoke

NOW = dt.datetime(2026, 12, 6, tzinfo=dt.timezone.utc)


def _row(task_id: str, model: str, scores: dict[str, float]) -> ResultRecord:
    label = max(scores, key=scores.__getitem__)
    return ResultRecord(id=task_id, text_sha256="0" * 64, text_chars=6, model=model,
                        status="done", finished_at=NOW, text=f"text {task_id}", label=label,
                        score=scores[label], scores=scores, source="s", lang="en")


def test_texts_whose_label_b_lacks_are_counted_and_said(store: ResultStore, redis_url: str,
                                                        db_url: str) -> None:
    store.upsert([
        _row("x1", "sent", {"positive": 0.9, "negative": 0.1}),
        _row("x1", "mine", {"LABEL_1": 0.8, "LABEL_0": 0.2}),
        _row("x2", "sent", {"positive": 0.3, "negative": 0.7}),
        _row("x2", "mine", {"LABEL_1": 0.4, "LABEL_0": 0.6}),
        _row("x3", "sent", {"positive": 0.6, "negative": 0.4}),
        _row("x3", "other", {"positive": 0.2, "negative": 0.8}),
    ])
    apart = compare(store, "sent", "mine", Filters())
    assert (apart.texts, apart.agree, apart.unmatched) == (2, 0, 2)
    assert apart.as_dict()["unmatched"] == 2
    # Same label names, all flipped: no note (the labels do match by name).
    same = compare(store, "sent", "other", Filters())
    assert (same.texts, same.agree, same.unmatched) == (1, 0, 0)

    settings = Settings(broker_url=redis_url, database_url=db_url)
    out = invoke(["compare", "--model", "sent", "--model", "mine"], settings)
    assert out.exit_code == 0, out.output
    assert ("note: on 2 of these texts mine has no label named as sent's (another label "
            "set): agreement and the change compare label names, and a label missing counts "
            "as probability 0") in out.stdout
    flipped = invoke(["compare", "--model", "sent", "--model", "other"], settings)
    assert flipped.exit_code == 0 and "note:" not in flipped.stdout, flipped.output
    as_json = invoke(["compare", "--model", "sent", "--model", "mine", "--format", "json"],
                     settings)
    assert json.loads(as_json.stdout)["unmatched"] == 2


@pytest.mark.parametrize("name", ['say "yes"', "back\\slash", "a.b", "it's", "$[0]"])
def test_label_names_any_character_are_matched(store: ResultStore, name: str) -> None:
    store.upsert([_row("x1", "ma", {name: 0.9, "other": 0.1}),
                  _row("x1", "mb", {name: 0.3, "other": 0.7})])
    got = compare(store, "ma", "mb", Filters())
    assert (got.texts, got.agree, got.unmatched) == (1, 0, 0)
    assert got.mean_change == pytest.approx(0.3 - 0.9)
    assert got.largest[0]["change"] == pytest.approx(0.3 - 0.9)
