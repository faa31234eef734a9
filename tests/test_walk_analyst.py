"""``bertstream results`` exports walked as an analyst would: every row, as stored, fast."""

from __future__ import annotations

import copy
import csv
import datetime as dt
import io
import json
from typing import Any

import pytest

from contract.results import ResultRecord
from producer.formatting import RECORD_FIELDS, _json, csv_cells, iter_results

UTC = dt.timezone.utc


def _rows(n: int) -> list[ResultRecord]:
    when = dt.datetime(2026, 11, 28, 6, 0, tzinfo=UTC)
    out = []
    for i in range(n):
        done = i % 3 != 0
        out.append(ResultRecord(
            id=f"task-{i}", text_sha256="ab" * 32, text_chars=9, model="tiny", status=(
                "done" if done else "failed"),
            finished_at=when + dt.timedelta(microseconds=i), source="web" if i % 2 else None,
            meta={"user": i, "tags": ["a", {"b": [1, 2]}]} if i % 4 else None,
            text=f"=text\x1b[31m {i}", label="positive" if done else None,
            score=0.75 if done else None,
            scores={"positive": 0.75, "negative": 0.25} if done else None,
            error=None if done else "boom", submitted_at=when, lang="en"))
    return out


def _as_before(records: list[ResultRecord], fmt: str, **kw: Any) -> str:
    """What an export wrote when every row went through ``ResultRecord.to_json``."""
    if fmt == "json":
        return _json([r.to_json() for r in records]) + "\n"
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RECORD_FIELDS)
    for r in records:
        writer.writerow(csv_cells(r.to_json(), RECORD_FIELDS, guard=kw.get("excel_safe", False)))
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_an_export_writes_each_row_without_deep_copying_it(
        fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An export turned each row into a dict with ``dataclasses.asdict``, which deep-copies
    every field (datetimes, meta, scores) only to print them: most of the time of a large
    ``results --all --format csv`` went there. The output is the same."""
    records = _rows(40)
    expected = _as_before(records, fmt)

    def refuse(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a row was deep-copied to be written")

    monkeypatch.setattr(copy, "deepcopy", refuse)
    got = "".join(iter_results(iter(records), fmt, terminal=False))
    assert got == expected
    if fmt == "json":
        assert [r["id"] for r in json.loads(got)] == [r.id for r in records]
