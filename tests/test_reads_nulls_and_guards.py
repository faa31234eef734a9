"""Read-side rules that must be one rule wherever they apply: ``ResultStore.aggregate``
(``results --aggregate``) lists a NULL group after the groups of as many rows, on SQLite
and PostgreSQL alike, as ``stats`` and ``top_stats`` do; and ``results --excel-safe``
guards the columns the API's CSV export guards (``label`` included), with one list."""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any

import httpx
from click.testing import CliRunner

import api.app
import producer.formatting
from contract.results import ResultStore
from contract.settings import Settings
from producer.cli import main
from tests.producer_helpers import record

#: Sources NULL x2, a x2, b, c and labels with a NULL among them (failed rows).
SOURCES = [None, None, "a", "a", "b", "c"]


def test_aggregate_lists_a_null_group_after_the_others_of_its_count(store: ResultStore) -> None:
    """SQLite sorted the NULL group of a tie first, PostgreSQL in its hash order: the two
    listed `results --aggregate` differently. Now: most rows first, a tie in value order,
    no value (NULL) last."""
    store.upsert([record(f"t{i}", source=s) for i, s in enumerate(SOURCES)])
    store.upsert([record("f1", status="failed", error="boom", source="b"),
                  record("f2", status="failed", error="boom", source="c"),
                  record("n1", label="negative", source="b"),
                  record("n2", label="negative", source="c")])
    assert [(g["source"], g["count"]) for g in store.aggregate(by="source")] == [
        ("b", 3), ("c", 3), ("a", 2), (None, 2)]
    assert [(g["label"], g["count"]) for g in store.aggregate(by="label")] == [
        ("positive", 6), ("negative", 2), (None, 2)]
    assert [g["lang"] for g in store.aggregate(by="lang")] == [None]


def _invoke(args: list[str], settings: Settings) -> str:
    out = CliRunner().invoke(main, args, obj=settings)
    assert out.exit_code == 0, out.output
    return out.stdout


def test_excel_safe_guards_the_columns_the_api_export_guards(settings: Settings,
                                                             store: ResultStore,
                                                             api_factory: Any) -> None:
    """A model whose labels are "+1"/"-1" (or any label a spreadsheet would run): the API
    export guarded the label cell, `--excel-safe` left it as a formula. Both now write the
    same cells for the same rows, and take the guarded columns from one place."""
    rows = [dataclasses.replace(record("r1", text="=1+1", source="@feed"), label="-1"),
            dataclasses.replace(record("r2", text="fine", source="web"), label="+1"),
            record("-r3", status="failed", error="@boom")]
    store.upsert(rows)
    cli_rows = list(csv.DictReader(io.StringIO(_invoke(
        ["results", "--format", "csv", "--excel-safe", "--all"], settings))))
    assert {r["id"]: r["label"] for r in cli_rows} == {"r1": "'-1", "r2": "'+1", "'-r3": ""}
    grouped = _invoke(["results", "--aggregate", "label", "--format", "csv", "--excel-safe"],
                      settings)
    assert {r["label"] for r in csv.DictReader(io.StringIO(grouped))} == {"'-1", "'+1", ""}
    with httpx.Client(base_url=api_factory(settings).url, timeout=30) as http:
        export = http.get("/v1/results", params={"format": "csv"})
    assert export.status_code == 200, export.text
    api_rows = list(csv.DictReader(io.StringIO(export.text)))
    key = sorted  # the same rows, cell for cell (the order of rows of one instant aside)
    assert key(tuple(r.items()) for r in cli_rows) == key(tuple(r.items()) for r in api_rows)
    assert not hasattr(api.app, "CSV_GUARDED")  # no second list to drift apart
    assert producer.formatting.GUARDED_COLUMNS == frozenset({"text", "source", "error",
                                                             "label"})
