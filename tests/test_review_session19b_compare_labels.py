"""`compare` on a custom model whose label names hold a double quote or a backslash (any
name config.json's id2label gives is stored): SQLite's JSON path cannot quote them, so B's
probability of A's label read as missing there, an `unmatched` text and a full move,
while PostgreSQL read it. Both backends must give the same comparison."""

from __future__ import annotations

import datetime as dt

import pytest

from contract.queries import Filters, compare
from contract.results import ResultRecord, ResultStore

NOW = dt.datetime(2026, 12, 6, tzinfo=dt.timezone.utc)


def _row(task_id: str, model: str, scores: dict[str, float]) -> ResultRecord:
    label = max(scores, key=scores.__getitem__)
    return ResultRecord(id=task_id, text_sha256="0" * 64, text_chars=6, model=model,
                        status="done", finished_at=NOW, text=f"text {task_id}", label=label,
                        score=scores[label], scores=scores, source="s", lang="en")


@pytest.mark.parametrize("name", ['say "yes"', "back\\slash", "a.b", "it's", "$[0]"])
def test_label_names_any_character_are_matched(store: ResultStore, name: str) -> None:
    store.upsert([_row("x1", "ma", {name: 0.9, "other": 0.1}),
                  _row("x1", "mb", {name: 0.3, "other": 0.7})])
    got = compare(store, "ma", "mb", Filters())
    assert (got.texts, got.agree, got.unmatched) == (1, 0, 0)
    assert got.mean_change == pytest.approx(0.3 - 0.9)
    assert got.largest[0]["change"] == pytest.approx(0.3 - 0.9)
