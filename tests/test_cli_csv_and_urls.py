"""CSV as stored unless asked to be spreadsheet-safe (producer/formatting.py), and URLs
that do not parse given to the CLI: one line, exit 2, never a traceback."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from contract.results import ResultStore
from contract.settings import Settings
from producer.formatting import csv_cell, render_results, render_rows
from tests.producer_helpers import invoke, record

STORED = [record("-100123", source="@feed", text="=HYPERLINK(\"http://x\")", score=0.5),
          record("+7", source="web", text="-5 stars, never again", status="failed",
                 error="@boom")]


def _csv(text: str) -> dict[str, dict[str, str]]:
    return {r["id"]: r for r in csv.DictReader(io.StringIO(text))}


def test_csv_keeps_every_value_as_stored_by_default() -> None:
    rows = _csv(render_results(STORED, "csv", terminal=False))
    assert set(rows) == {"-100123", "+7"}
    assert rows["-100123"]["text"] == "=HYPERLINK(\"http://x\")"
    assert rows["-100123"]["source"] == "@feed" and rows["+7"]["error"] == "@boom"
    assert rows["+7"]["text"] == "-5 stars, never again"


def test_excel_safe_guards_free_text_and_ids() -> None:
    """Text, source, error and id cells that a spreadsheet would run get a leading quote
    (ids reversibly: `db delete --ids-file F --excel-safe`); numbers and the other
    columns stay as stored."""
    rows = {k.removeprefix("'"): v for k, v in
            _csv(render_results(STORED, "csv", terminal=False, excel_safe=True)).items()}
    assert {v["id"] for v in rows.values()} == {"'-100123", "'+7"}
    assert rows["-100123"]["text"] == "'=HYPERLINK(\"http://x\")"
    assert rows["-100123"]["source"] == "'@feed" and rows["-100123"]["score"] == "0.5"
    assert rows["+7"]["text"] == "'-5 stars, never again" and rows["+7"]["error"] == "'@boom"
    assert rows["+7"]["source"] == "web"
    grouped = render_rows([{"source": "-web", "count": 2, "mean_score": -0.5}],
                          ["source", "count", "mean_score"], "csv", excel_safe=True)
    assert grouped.splitlines()[1] == "'-web,2,-0.5"
    # the API's export calls csv_cell alone: it still guards (its own choice)
    assert csv_cell("-100123") == "'-100123" and csv_cell("-1", guard=False) == "-1"


def test_results_excel_safe_is_the_opt_in_guard(store: ResultStore, redis_url: str,
                                                db_url: str) -> None:
    store.upsert(STORED)
    settings = Settings(broker_url=redis_url, database_url=db_url)
    out = invoke(["results", "--format", "csv", "--excel-safe"], settings)
    assert out.exit_code == 0, out.output
    rows = _csv(out.stdout)
    assert set(rows) == {"'-100123", "'+7"}  # ids guarded too
    assert rows["'-100123"]["text"] == "'=HYPERLINK(\"http://x\")"
    assert rows["'-100123"]["source"] == "'@feed" and rows["'+7"]["error"] == "'@boom"
    grouped = invoke(["results", "--format", "csv", "--aggregate", "source", "--excel-safe"],
                     settings)
    assert {r["source"] for r in csv.DictReader(io.StringIO(grouped.stdout))
            } == {"'@feed", "web"}
    assert "--excel-safe" in invoke(["results", "--help"], settings).output


@pytest.mark.parametrize("args", [["db", "current"], ["db", "upgrade"], ["db", "settle"],
                                  ["db", "downgrade", "base"], ["db", "delete", "--id", "x"],
                                  ["results"]])
@pytest.mark.parametrize("url", ["nonsense", "postgresql://u:secret@h:notaport/db"])
def test_a_database_url_that_does_not_parse_is_one_line(redis_url: str, args: list[str],
                                                        url: str) -> None:
    """`db` commands parsed the URL (to show it) before the store checked it: an
    ArgumentError traceback, exit 1, where `results` said it in one line, exit 2."""
    out = invoke([*args, "--database-url", url], Settings(broker_url=redis_url))
    assert out.exit_code == 2, out.output
    assert "is not a database URL" in out.stderr and "Traceback" not in out.output
    assert len(out.stderr.strip().splitlines()) == 1 and "secret" not in out.output


@pytest.mark.parametrize("url", ["redis://127.0.0.1:notaport/0", "redis://127.0.0.1:99999/0"])
def test_a_broker_url_that_does_not_parse_is_one_line(sqlite_url: str, tmp_path: Path,
                                                      url: str) -> None:
    """kombu parses the URL when it first connects: a ValueError traceback, exit 1."""
    lines = tmp_path / "in.txt"
    lines.write_text("hello\n")
    settings = Settings(database_url=sqlite_url)
    for args in (["submit", "hi"], ["stream", str(lines), "--no-progress"]):
        out = invoke([*args, "--broker-url", url], settings)
        assert out.exit_code == 2, (args, out.output)
        assert "cannot be parsed" in out.stderr and "Traceback" not in out.output
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
