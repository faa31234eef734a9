"""``stream --ids-out``: a refused line names the id it gave (a duplicate id, an empty text
with an id), ``null`` only when it gave none; an id no file can hold as UTF-8 is escaped,
not a crash; a run resumed from its resume line appends to the same file."""

from __future__ import annotations

from pathlib import Path

from contract.settings import Settings
from producer.ids_out import IdsOut
from producer.items import ItemError
from producer.sources import SourceRecord
from tests.producer_helpers import invoke, jsonl_lines, lane_messages


def test_a_refused_line_names_the_id_it_gave(bsettings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "one", "id": "a1"}\n'
                   '{"text": "again", "id": "a1"}\n'  # a duplicate id: refused, id a1
                   '{"text": "   ", "id": "a2"}\n'  # an empty text with an id
                   '{"text": "   "}\n'  # no id given: null (a made-up one names nothing)
                   'not json\n'  # unreadable: null
                   '{"text": "two", "id": 7}\n', encoding="utf-8")
    ids = tmp_path / "ids.jsonl"
    result = invoke(["stream", str(src), "--no-progress", "--ids-out", str(ids)], bsettings)
    assert result.exit_code == 5, result.output
    got = {x["line"]: x for x in jsonl_lines(ids)}
    assert got[1] == {"line": 1, "id": "a1"} and got[6] == {"line": 6, "id": "7"}
    assert got[2]["id"] == "a1" and "duplicate id 'a1' (first at 1)" in str(got[2]["error"])
    assert got[3]["id"] == "a2" and "empty" in str(got[3]["error"])
    assert got[4]["id"] is None and "empty" in str(got[4]["error"])
    assert got[5]["id"] is None and "invalid JSON" in str(got[5]["error"])
    # accepted lines are those without "error": their ids are exactly the queued ones
    queued = [it["id"] for m in lane_messages(bsettings.broker_url, f"{bsettings.queue}.bulk")
              for it in m["items"]]
    assert [x["id"] for x in jsonl_lines(ids) if "error" not in x] == queued == ["a1", "7"]


def test_an_id_that_is_no_utf8_is_written_escaped(tmp_path: Path) -> None:
    """A lone surrogate (valid in JSON text, not in UTF-8) in a refused id: the line is
    written as a JSON escape, which reads back as the same id, instead of failing the run."""
    path = tmp_path / "ids.jsonl"
    with IdsOut(path) as out:
        out.rejected(SourceRecord(4, {"text": "x", "id": "bad\ud800"}),
                     ItemError(4, "bad\ud800", "id is not valid text"))
        out.rejected(SourceRecord(5, error="invalid JSON"), ItemError(5, None, "invalid JSON"))
    raw = path.read_bytes()
    assert b"\\ud800" in raw
    assert jsonl_lines(path) == [{"line": 4, "id": "bad\ud800", "error": "id is not valid text"},
                            {"line": 5, "id": None, "error": "invalid JSON"}]


def test_a_resumed_run_appends_and_each_line_is_listed_once(bsettings: Settings,
                                                            tmp_path: Path) -> None:
    """The file is appended to: a first run over lines 1-3 and a resumed one over lines
    4-6 (fed from the resume line, as after an interruption) list each line once; the
    accepted ones (no ``error``) are exactly what is queued, the refused duplicate names
    its id."""
    rows = ['{"text": "t1", "id": "b1"}', '{"text": "t2", "id": "b2"}',
            '{"text": "t3", "id": "b1"}', '{"text": "t4", "id": "b4"}',
            '{"text": "t5", "id": "b4"}', '{"text": "t6", "id": "b6"}']
    ids = tmp_path / "ids.jsonl"
    first, second = tmp_path / "first.jsonl", tmp_path / "rest.jsonl"
    first.write_text("\n".join(rows[:3]) + "\n", encoding="utf-8")
    second.write_text("\n".join(rows[3:]) + "\n", encoding="utf-8")
    for part in (first, second):
        result = invoke(["stream", str(part), "--no-progress", "--ids-out", str(ids)], bsettings)
        assert result.exit_code == 5, result.output
    written = jsonl_lines(ids)
    assert [(x["line"], x["id"], "error" in x) for x in written] == [
        (3, "b1", True), (1, "b1", False), (2, "b2", False),
        (2, "b4", True), (1, "b4", False), (3, "b6", False)]
    queued = [it["id"] for m in lane_messages(bsettings.broker_url, f"{bsettings.queue}.bulk")
              for it in m["items"]]
    assert queued == [x["id"] for x in written if "error" not in x]
