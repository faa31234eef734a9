"""``bertstream results --format jsonl``: one JSON object per line, the fields of
``--format json``, streamed a row at a time; terminal-safe as JSON is; values as stored
(``--excel-safe`` is a CSV rule)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from contract.results import ResultStore
from producer import cli
from producer.formatting import iter_results, render_results, render_rows
from tests.producer_helpers import broker_settings, record


def test_results_jsonl_is_one_object_per_line_as_json_gives(store: ResultStore, redis_url: str,
                                                            db_url: str) -> None:
    store.upsert([record(f"j{i}", source="=feed" if i == 0 else "s",
                         text="line one\nline two \x1b[31m\x9b") for i in range(5)])
    settings = broker_settings(redis_url, db_url)
    runner = CliRunner()
    as_json = runner.invoke(cli.main, ["results", "--all", "--format", "json"], obj=settings)
    assert as_json.exit_code == 0, as_json.output
    for extra in ([], ["--excel-safe"]):
        got = runner.invoke(cli.main, ["results", "--all", "--format", "jsonl", *extra],
                            obj=settings)
        assert got.exit_code == 0, got.output
        lines = got.stdout.splitlines()
        assert len(lines) == 5 and got.stdout.endswith("\n")
        assert [json.loads(x) for x in lines] == json.loads(as_json.stdout)
        assert "\x1b" not in got.stdout and "\x9b" not in got.stdout
        assert json.loads(lines[-1])["source"] == "=feed"  # JSONL keeps values as stored
    nothing = runner.invoke(cli.main, ["results", "--format", "jsonl", "--source", "none"],
                            obj=settings)
    assert nothing.exit_code == 0 and nothing.stdout == ""


def test_jsonl_is_rendered_a_row_at_a_time() -> None:
    """A piece per row, each a whole line: memory holds one row however many are read."""
    records = [record(f"k{i}") for i in range(3)]
    pieces = list(iter_results(iter(records), "jsonl"))
    assert len(pieces) == 3 and all(p.endswith("\n") and p.count("\n") == 1 for p in pieces)
    assert "".join(pieces) == render_results(records, "jsonl") + "\n"
    assert render_rows([{"label": "a", "count": 2}], ["label", "count"], "jsonl") == (
        '{"label": "a", "count": 2}')
    assert render_results([], "jsonl") == "" and list(iter_results(iter([]), "jsonl")) == []
