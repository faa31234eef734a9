"""``stream --ids-out`` and the stream report: a line the reader itself refuses (missing
``text``, unknown keys, a bad ``meta``, a CSV row of the wrong width) names the id it
gave, mapped by ``--id-field`` and with an integer as text, as an accepted line would;
``null`` stays for a line whose id cannot be read or is no id at all."""

from __future__ import annotations

import io
from pathlib import Path

from contract.settings import Settings
from producer.sources import FieldMap, read_records
from tests.producer_helpers import invoke, jsonl_lines, lane_messages


def _ids(data: str, fmt: str = "auto", fields: FieldMap | None = None) -> list[object]:
    records = read_records(io.BytesIO(data.encode()), fmt=fmt, fields=fields)
    return [(r.line, r.id, r.error is not None) for r in records]


def test_jsonl_reader_refusals_name_the_id_they_gave(bsettings: Settings,
                                                     tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"txt": "a typo", "id": "k1"}\n'  # unknown key, no text
                   '{"id": "k2"}\n'  # missing text
                   '{"text": "x", "id": 3, "extra": 1}\n'  # unknown key; int id as text
                   '{"text": "ok", "id": "k4"}\n'
                   '{"txt": "y", "id": 1.5}\n'  # an id that is no id: null
                   '{"txt": "y", "id": ["k6"]}\n'  # null
                   '{"txt": "y"}\n'  # no id: null
                   '[1, 2]\n'  # not an object: null
                   '{"text": "z", "id": "k9"\n', encoding="utf-8")  # unreadable: null
    ids = tmp_path / "ids.jsonl"
    result = invoke(["stream", str(src), "--no-progress", "--ids-out", str(ids)], bsettings)
    assert result.exit_code == 5, result.output
    got = {x["line"]: x for x in jsonl_lines(ids)}
    assert {n: x["id"] for n, x in got.items()} == {
        1: "k1", 2: "k2", 3: "3", 4: "k4", 5: None, 6: None, 7: None, 8: None, 9: None}
    assert "unknown field(s) ['txt']" in str(got[1]["error"])
    assert got[2]["error"] == "missing 'text'" and "'extra'" in str(got[3]["error"])
    assert "error" not in got[4]
    queued = [it["id"] for m in lane_messages(bsettings.broker_url, f"{bsettings.queue}.bulk")
              for it in m["items"]]
    assert queued == ["k4"]


def test_a_mapped_id_field_is_named_on_a_reader_refusal(bsettings: Settings,
                                                         tmp_path: Path) -> None:
    """With ``--id-field`` the id is read from that field (an int as text), as for an
    accepted line; a ``meta`` that is no object is refused by the reader."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"body": "one", "post": 11}\n'
                   '{"post": 12, "id": "not-this"}\n'  # missing the text field
                   '{"body": "t", "post": "p3", "meta": [1], "created": "2024"}\n'
                   '{"id": "not-this"}\n', encoding="utf-8")  # no post: null
    ids = tmp_path / "ids.jsonl"
    result = invoke(["stream", str(src), "--no-progress", "--ids-out", str(ids),
                     "--text-field", "body", "--id-field", "post", "--time-field", "created"],
                    bsettings)
    assert result.exit_code == 5, result.output
    got = {x["line"]: x for x in jsonl_lines(ids)}
    assert got[1] == {"line": 1, "id": "11"}
    assert got[2] == {"line": 2, "id": "12", "error": "missing 'body'"}
    assert got[3] == {"line": 3, "id": "p3", "error": "'meta' must be a JSON object"}
    assert got[4] == {"line": 4, "id": None, "error": "missing 'body'"}


def test_csv_reader_refusals_name_the_id_when_its_cell_is_certain(
        bsettings: Settings, tmp_path: Path) -> None:
    """A bad ``meta`` cell names the row's id; a row of the wrong width names it only
    from the first column with too many fields (an unquoted comma in a later cell),
    never from a row too short (which cell is missing cannot be told)."""
    src = tmp_path / "in.csv"
    src.write_text("id,text,meta\n"
                   "c1,fine,\n"
                   "c2,bad meta,{oops\n"
                   "c3,hello, world,\n"  # 4 fields: the id is still the first cell
                   "just a text\n"  # 1 field: is it the id or the text? null
                   ",no id,{oops\n", encoding="utf-8")  # an empty id is none: null
    ids = tmp_path / "ids.jsonl"
    result = invoke(["stream", str(src), "--format", "csv", "--no-progress",
                     "--ids-out", str(ids)], bsettings)
    assert result.exit_code == 5, result.output
    got = {x["line"]: x for x in jsonl_lines(ids)}
    assert {n: x["id"] for n, x in got.items()} == {2: "c1", 3: "c2", 4: "c3", 5: None, 6: None}
    assert "not valid JSON" in str(got[3]["error"])
    assert got[4]["error"] == "expected 3 CSV fields, got 4"


def test_csv_wide_row_names_the_id_of_the_last_column() -> None:
    assert _ids("text,id\nhello, world,7\nshort\n", "csv") == [(2, "7", True), (3, None, True)]
    # a middle column of a row of the wrong width may have moved: null
    assert _ids("text,id,source\na,b,7,s\n", "csv") == [(2, None, True)]


def test_unreadable_lines_keep_no_id() -> None:
    data = '{"txt": "a", "id": "u1"}\n' + '{"id": "u2", "txt": "\\x"}\n'
    assert _ids(data) == [(1, "u1", True), (2, None, True)]
    recs = list(read_records(io.BytesIO(b'{"id": "u3", "txt": "\xff"}\n'), fmt="jsonl"))
    assert [(r.id, r.error is not None) for r in recs] == [(None, True)]  # not UTF-8
    # an accepted record carries its id in the item only
    assert _ids('{"text": "a", "id": 5}\n') == [(1, None, False)]


def test_the_stream_report_names_the_id(bsettings: Settings, tmp_path: Path) -> None:
    """The refusal the stream reports (and every tracker is told) carries the id too."""
    from producer.client import Client
    from producer.stream import stream

    records = read_records(io.BytesIO(b'{"txt": "a", "id": 9}\n'), fmt="jsonl")
    with Client(bsettings) as client:
        report = stream(client, records, progress=False, linger_s=None)
    assert [(e.index, e.id) for e in report.errors] == [(1, "9")]
