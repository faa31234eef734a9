"""CSV in and out as a user meets it: a spreadsheet-safe export guards every cell a
submitter controls (the task id included) and its ids still go back to
``db delete --ids-file``."""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any

import httpx

from contract.messages import id_problem
from contract.results import ResultStore
from contract.settings import Settings
from producer.formatting import FORMULA_START, csv_cell, guard_id, unguard_id
from tests.producer_helpers import invoke, record

#: Ids a submitter may choose (contract.messages.id_problem lets each through) that a
#: spreadsheet would run, or that start with the guard's own quote.
FORMULA_IDS = ["=HYPERLINK(\"http://x\",\"y\")", "+7", "-100123", "@me", "'=1+1", "'plain"]
PLAIN_IDS = ["a1", "it's"]


def test_the_formula_ids_are_ids_a_submitter_may_choose() -> None:
    for task_id in FORMULA_IDS + PLAIN_IDS:
        assert id_problem(task_id, new=True) is None, task_id


def test_guard_id_is_undone_by_unguard_id() -> None:
    """The id guard is the text guard plus one rule, so it can be undone: an id that starts
    with a quote gets one more. Every guarded id starts with a quote, never with a formula
    character; taking one quote off gives the id back, and a plain id is left alone."""
    for task_id in FORMULA_IDS + PLAIN_IDS:
        guarded = guard_id(task_id)
        assert not guarded.startswith(FORMULA_START), guarded
        assert unguard_id(guarded) == task_id
    assert guard_id("'plain") == "''plain" and guard_id("-1") == "'-1"
    assert guard_id("a1") == "a1" and unguard_id("a1") == "a1"


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _formula_cells(rows: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for row in rows for k, v in row.items() if v.startswith(FORMULA_START)]


def _stored(store: ResultStore) -> None:
    store.upsert([dataclasses.replace(record(task_id, source="@feed", text="=1+1"),
                                      meta={"k": "=cmd|' /C calc'!A0"})
                  for task_id in FORMULA_IDS + PLAIN_IDS])


def test_excel_safe_export_runs_no_cell_and_its_ids_go_back(store: ResultStore,
                                                            redis_url: str, db_url: str,
                                                            tmp_path: Path) -> None:
    """`results --format csv --excel-safe` left ids as stored: an id such as
    ``=HYPERLINK(...)`` (any submitter may choose one) ran as a formula in the spreadsheet
    the export was made for. Now no cell starts with a formula character; the id column,
    written to a file, is read back by `db delete --ids-file F --excel-safe`, which names
    exactly the exported tasks (an id that starts with a quote included)."""
    _stored(store)
    settings = Settings(broker_url=redis_url, database_url=db_url)
    out = invoke(["results", "--format", "csv", "--excel-safe", "--all"], settings)
    assert out.exit_code == 0, out.output
    rows = _rows(out.stdout)
    assert len(rows) == len(FORMULA_IDS + PLAIN_IDS)
    assert _formula_cells(rows) == []
    assert {r["id"] for r in rows} == {guard_id(i) for i in FORMULA_IDS + PLAIN_IDS}
    assert {r["meta"] for r in rows} == {'{"k": "=cmd|\' /C calc\'!A0"}'}  # a JSON object
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("".join(r["id"] + "\n" for r in rows), encoding="utf-8")
    dry = invoke(["db", "delete", "--ids-file", str(ids_file), "--excel-safe"], settings)
    assert dry.exit_code == 0, dry.output
    count = len(FORMULA_IDS + PLAIN_IDS)
    assert f"would delete {count} row(s) of {count} task(s)" in dry.stdout
    # read as plain ids, only the ids the guard left alone name their tasks
    plain = invoke(["db", "delete", "--ids-file", str(ids_file)], settings)
    assert plain.exit_code == 0, plain.output
    assert f"would delete {len(PLAIN_IDS)} row(s)" in plain.stdout
    gone = invoke(["db", "delete", "--ids-file", str(ids_file), "--excel-safe", "--yes"],
                  settings)
    assert gone.exit_code == 0 and f"deleted {count} row(s)" in gone.stdout, gone.output
    assert [i for i in FORMULA_IDS + PLAIN_IDS if store.get(i) is not None] == []


def test_csv_without_excel_safe_keeps_ids_as_stored(store: ResultStore, redis_url: str,
                                                    db_url: str) -> None:
    """The default CSV is the table as stored: ids feed `db delete --ids-file` as they are."""
    _stored(store)
    settings = Settings(broker_url=redis_url, database_url=db_url)
    out = invoke(["results", "--format", "csv", "--all"], settings)
    assert out.exit_code == 0, out.output
    assert {r["id"] for r in _rows(out.stdout)} == set(FORMULA_IDS + PLAIN_IDS)


def test_api_export_runs_no_cell(settings: Settings, store: ResultStore,
                                 api_factory: Any) -> None:
    """The API's CSV export, always spreadsheet-safe, guards the id too, as the CLI's
    ``--excel-safe`` does (one rule for both), and its ids go back through
    :func:`producer.formatting.unguard_id`."""
    _stored(store)
    with httpx.Client(base_url=api_factory(settings).url, timeout=30) as http:
        export = http.get("/v1/results", params={"format": "csv"})
        assert export.status_code == 200, export.text
        rows = _rows(export.text)
        assert _formula_cells(rows) == []
        assert sorted(unguard_id(r["id"]) for r in rows) == sorted(FORMULA_IDS + PLAIN_IDS)
        for row in rows:
            got = http.get(f"/v1/tasks/{unguard_id(row['id'])}")
            assert got.status_code == 200, got.text


def test_ids_file_excel_safe_reads_a_line_no_guard_wrote_as_it_is(
        sqlite_store: ResultStore, sqlite_url: str, redis_url: str, tmp_path: Path) -> None:
    """A line that is no guarded id is read as it is: a lone quote, a quoted plain word."""
    sqlite_store.upsert([record("'"), record("'x")])
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("'\n'x\n", encoding="utf-8")
    out = invoke(["db", "delete", "--ids-file", str(ids_file), "--excel-safe"],
                 Settings(broker_url=redis_url, database_url=sqlite_url))
    assert out.exit_code == 0, out.output
    assert "would delete 2 row(s)" in out.stdout
    assert csv_cell("'x") == "'x"  # a free-text cell is only guarded, never doubled
