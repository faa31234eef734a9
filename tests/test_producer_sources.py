"""Sources: JSONL and plain lines, auto-detection, bad lines refused alone (no services)."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contract.errors import InvalidInput
from contract.settings import Settings
from producer.sources import (
    FieldMap,
    SourceRecord,
    default_line_limit,
    open_source,
    read_records,
)


def _read(data: bytes, **kwargs: object) -> list[SourceRecord]:
    return list(read_records(io.BytesIO(data), **kwargs))  # type: ignore[arg-type]


def test_jsonl_objects_keep_their_fields() -> None:
    data = (
        json.dumps({"text": "great", "id": "a1", "source": "s", "meta": {"k": 1}}) + "\n"
        + json.dumps({"text": "meh"}) + "\n"
    ).encode()
    recs = _read(data)
    assert recs == [
        SourceRecord(1, {"text": "great", "id": "a1", "source": "s", "meta": {"k": 1}}),
        SourceRecord(2, {"text": "meh"}),
    ]


def test_plain_lines_are_texts_and_blank_lines_are_skipped() -> None:
    recs = _read(b"first line\r\n\n   \nsecond { not json\nlast without newline")
    assert [(r.line, r.item) for r in recs] == [
        (1, {"text": "first line"}),
        (4, {"text": "second { not json"}),
        (5, {"text": "last without newline"}),
    ]


def test_auto_detects_per_file_from_the_first_non_blank_line() -> None:
    # A plain-text file whose later line starts with "{" stays plain text.
    plain = _read(b"\nhello\n{not an object}\n")
    assert [r.item for r in plain] == [{"text": "hello"}, {"text": "{not an object}"}]
    # A JSONL file's plain line is a bad line, reported, not a text.
    jsonl = _read(b'{"text": "a"}\nplain\n')
    assert jsonl[0].item == {"text": "a"}
    assert jsonl[1].item is None and "invalid JSON" in (jsonl[1].error or "")


def test_explicit_format_wins_over_detection() -> None:
    assert _read(b'{"text": "x"}\n', fmt="lines")[0].item == {"text": '{"text": "x"}'}
    assert "invalid JSON" in (_read(b"plain\n", fmt="jsonl")[0].error or "")
    with pytest.raises(InvalidInput, match="unknown source format"):
        _read(b"x\n", fmt="xml")


def test_bad_jsonl_lines_are_reported_with_line_numbers() -> None:
    data = b"\n".join([
        b'{"text": "ok 1"}',
        b'{"text": "broken"',
        b'["a", "list"]',
        b'{"id": "no-text"}',
        b'{"text": "caf\xe9 latin-1"}',
        b'{"text": "ok 2"}',
    ])
    recs = _read(data)
    assert [r.line for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[0].item == {"text": "ok 1"} and recs[5].item == {"text": "ok 2"}
    assert "invalid JSON" in (recs[1].error or "")
    assert "expected a JSON object, got list" in (recs[2].error or "")
    assert "missing 'text'" in (recs[3].error or "")
    assert "not valid UTF-8" in (recs[4].error or "")


def test_undecodable_plain_line_is_refused_alone() -> None:
    recs = _read(b"good\nbad \xff\xfe bytes\nalso good\n", fmt="lines")
    assert recs[0].item == {"text": "good"}
    assert recs[1].item is None and "not valid UTF-8" in (recs[1].error or "")
    assert recs[2].item == {"text": "also good"}


def test_oversized_line_is_refused_and_the_next_line_survives() -> None:
    data = b"short\n" + b"x" * 5000 + b"\nafter\n"
    recs = _read(data, max_line_bytes=100)
    assert recs[0].item == {"text": "short"}
    assert recs[1].line == 2 and "over the limit of 100 bytes" in (recs[1].error or "")
    assert recs[2] == SourceRecord(3, {"text": "after"})


def test_bom_is_stripped_and_surrogate_escapes_reach_validation() -> None:
    recs = _read(b'\xef\xbb\xbf{"text": "bom"}\n{"text": "\\ud800"}\n')
    assert recs[0].item == {"text": "bom"}
    # JSON allows a lone surrogate escape; the validator refuses it later.
    assert recs[1].item == {"text": "\ud800"}


def test_open_source_reads_files_and_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes(b"from file\n")
    with open_source(path) as fh:
        assert [r.item for r in read_records(fh)] == [{"text": "from file"}]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin\n")))
    with open_source("-") as fh:
        assert [r.item for r in read_records(fh)] == [{"text": "from stdin"}]
    with pytest.raises(InvalidInput, match="cannot open"):
        with open_source(tmp_path / "missing.txt"):
            pass


def test_default_line_limit_leaves_room_for_the_longest_valid_text() -> None:
    settings = Settings(max_text_chars=100)
    worst = json.dumps({"text": "\u0001" * 100, "id": "i" * 128, "source": "s" * 128})
    assert len(worst.encode()) <= default_line_limit(settings)


def test_csv_records_with_a_header_and_field_mapping() -> None:
    data = (b"\xef\xbb\xbfpost_id,body,site,at,meta\n"
            b'1,"Great, really",web,2026-11-28T10:00Z,"{""k"": 1}"\n'
            b"2,meh,,,\n"
            b"3,too,many,fields,,extra\n"
            b'4,x,web,,"{bad"\n')
    recs = _read(data, fmt="csv", fields=FieldMap(text="body", id="post_id", source="site",
                                                    time="at"))
    assert recs[0] == SourceRecord(2, {"text": "Great, really", "id": "1", "source": "web",
                                       "meta": {"k": 1, "time": "2026-11-28T10:00Z"}})
    assert recs[1] == SourceRecord(3, {"text": "meh", "id": "2"})  # empty cells are absent
    assert recs[2].error == "expected 5 CSV fields, got 6"
    assert "'meta' is not valid JSON" in (recs[3].error or "")


def test_a_csv_cell_longer_than_csvs_own_limit_is_read_whole() -> None:
    """csv refuses a field over 128 KiB by default; the line limit (1 MiB) is the bound
    that counts, so a long text in a cell is read, not a traceback that ends the stream."""
    long = "好" * 150_000  # 450,000 bytes, under the line limit
    recs = _read(f"text,id\n{long},a\nshort,b\n".encode(), fmt="csv")
    assert [r.item for r in recs] == [{"text": long, "id": "a"}, {"text": "short", "id": "b"}]


def test_jsonl_field_mapping_takes_mapped_fields_only() -> None:
    data = (b'{"content": "hi", "tweet_id": 12345, "user": "u", "ts": 1700000000}\n'
            b'{"text": "no content"}\n')
    recs = _read(data, fields=FieldMap(text="content", id="tweet_id", source="user", time="ts"))
    assert recs[0].item == {"text": "hi", "id": "12345", "source": "u", "meta": {"time": 1700000000}}
    assert recs[1].error == "missing 'content'"
    # the default map keeps JSONL strict: an unknown key is refused
    assert "unknown field(s) ['txt']" in (_read(b'{"text": "a", "txt": "b"}\n')[0].error or "")


def test_blank_lines_are_yielded_marked_when_asked() -> None:
    assert _read(b"a\n\n  \nb\n", keep_blank=True) == [
        SourceRecord(1, {"text": "a"}), SourceRecord(2, blank=True), SourceRecord(3, blank=True),
        SourceRecord(4, {"text": "b"})]
    assert len(_read(b"a\n\n  \nb\n")) == 2


# -- one bad record never ends the stream ------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "1" * 5000  # json.loads refuses an integer of more than 4,300 digits


@pytest.mark.parametrize(("value", "problem"), [(DEEP, "nested too deeply"),
                                                (HUGE, "4300 digits")])
def test_deep_or_huge_json_is_refused_alone(value: str, problem: str) -> None:
    """json.loads raises RecursionError / ValueError for these, not JSONDecodeError:
    the line is refused like any invalid JSON, and the lines around it go through."""
    data = f'{{"text": "a"}}\n{{"text": "x", "meta": {{"k": {value}}}}}\n{{"text": "b"}}\n'.encode()
    for fields in (None, FieldMap(time="at")):
        recs = _read(data, fields=fields)
        assert [r.item for r in recs] == [{"text": "a"}, None, {"text": "b"}]
        assert recs[1].error is not None and recs[1].error.startswith("invalid JSON (")
        assert problem in recs[1].error
    # the same in a CSV meta cell (a Redis Stream entry's meta goes the same way)
    cell = value.replace('"', '""')
    recs = _read(f'text,meta\na,\nx,"{{""k"": {cell}}}"\nb,\n'.encode(), fmt="csv",
                 max_line_bytes=1 << 20)
    assert [r.item for r in recs] == [{"text": "a"}, None, {"text": "b"}]
    assert "'meta' is not valid JSON" in (recs[1].error or "") and problem in (recs[1].error or "")


# -- CSV: quoted fields spanning lines -----------------------------------------


def test_a_quoted_csv_field_may_span_lines() -> None:
    data = (b'id,text\r\n'
            b'101,"Great hotel.\r\nBut the breakfast, was awful."\r\n'
            b'102,plain post\r\n'
            b'103,"three\n\nlines, with ""quotes"""\n'
            b'104,5" screen\n')
    recs = _read(data, fmt="csv")
    assert recs == [
        SourceRecord(2, {"id": "101", "text": "Great hotel.\r\nBut the breakfast, was awful."},
                     last=3),
        SourceRecord(4, {"id": "102", "text": "plain post"}),
        SourceRecord(5, {"id": "103", "text": 'three\n\nlines, with "quotes"'}, last=7),
        SourceRecord(8, {"id": "104", "text": '5" screen'}),  # a quote inside a field: a quote
    ]
    assert [r.next_line for r in recs] == [4, 5, 8, 9]


# (csv.writer leaves a lone "\r" unquoted when the line ends in "\n": no reader reads that back)
_CELLS = st.lists(st.sampled_from(["a", "b", " ", ",", '"', "\n", "\r\n", "\u597d"]),
                  max_size=12).map("".join)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(_CELLS.filter(str.strip), _CELLS), min_size=1, max_size=6),
       ending=st.sampled_from(["\n", "\r\n"]))
def test_csv_records_read_back_as_csv_wrote_them(rows: list[tuple[str, str]],
                                                 ending: str) -> None:
    """Whatever quotes, commas and line breaks the cells hold, each record is read whole,
    numbered by its first line, and the next starts on the line after its last."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=ending)
    writer.writerow(["text", "source"])
    writer.writerows(rows)
    recs = _read(out.getvalue().encode(), fmt="csv")
    assert [(r.item or {}).get("text") for r in recs] == [text for text, _ in rows]
    assert [(r.item or {}).get("source", "") for r in recs] == [source for _, source in rows]
    line = 2
    for rec, (text, source) in zip(recs, rows, strict=True):
        breaks = sum(cell.count("\n") for cell in (text, source))
        assert (rec.line, rec.next_line) == (line, line + breaks + 1)
        line = rec.next_line


def test_a_bad_line_inside_a_csv_record_refuses_the_record_alone() -> None:
    data = (b'id,text\n'
            b'1,"caf\xe9\nstill the same text"\n'
            b'2,fine\n')
    recs = _read(data, fmt="csv")
    assert recs[0].line == 2 and recs[0].last == 3 and "not valid UTF-8" in (recs[0].error or "")
    assert recs[1] == SourceRecord(4, {"id": "2", "text": "fine"})


def test_a_csv_record_over_the_limit_is_read_to_its_end_and_refused() -> None:
    """The limit bounds a whole record; past it the record is read (not kept) to its
    closing quote, so its later lines do not become records of their own."""
    long_lines = b"\n".join(b"line %d of a long, long text" % i for i in range(20))
    data = b'id,text\n1,"' + long_lines + b'"\n2,after\n3,' + b"x" * 300 + b"\n4,last\n"
    recs = _read(data, fmt="csv", max_line_bytes=100)
    assert [(r.line, r.last) for r in recs] == [(2, 21), (22, None), (23, None), (24, None)]
    assert recs[0].error == "record (lines 2-21) is over the limit of 100 bytes"
    assert recs[1].item == {"id": "2", "text": "after"}
    assert recs[2].error == "line is over the limit of 100 bytes"
    assert recs[3].item == {"id": "4", "text": "last"}


def test_a_csv_quote_left_open_at_the_end_is_refused() -> None:
    recs = _read(b'id,text\n1,ok\n2,"never closed\n3,more\n', fmt="csv")
    assert recs[0].item == {"id": "1", "text": "ok"}
    assert recs[1].line == 3 and recs[1].last == 4
    assert recs[1].error == ("a quoted field opened on line 3 is not closed at the end of the "
                             "input (lines 3-4)")


# -- CSV headers -----------------------------------------------------------------


@pytest.mark.parametrize(("header", "problem"), [
    (b"id,t\xe9xt", "not valid UTF-8"),
    (b"id,text," + b"c" * 200, "over the limit of 100 bytes"),
    (b'id,"text', "not closed"),
])
def test_a_csv_header_that_cannot_be_read_stops_the_stream(header: bytes, problem: str) -> None:
    """Refused alone, it would make the first data row the header."""
    with pytest.raises(InvalidInput, match=f"the CSV header \\(line 1\\) cannot be read: .*{problem}"):
        _read(header + b"\n1,first post\n2,second post\n", fmt="csv", max_line_bytes=100)


def test_a_csv_header_without_the_text_column_stops_the_stream() -> None:
    with pytest.raises(InvalidInput, match="the CSV header has no 'text' column "
                       r"\(its columns: 'id', 'body'\); name the text column with --text-field"):
        _read(b"id,body\n1,first post\n", fmt="csv")
    assert _read(b"id,body\n1,first post\n", fmt="csv", fields=FieldMap(text="body"))[0].item == {
        "id": "1", "text": "first post"}


# -- JSONL with extra keys ---------------------------------------------------------


def test_naming_a_field_even_as_its_default_ignores_other_jsonl_keys() -> None:
    data = b'{"id": "x1", "text": "nice phone", "user": "bob", "created_at": "2026-12-01"}\n'
    (strict,) = _read(data)
    assert strict.error == ("unknown field(s) ['created_at', 'user']; expected ['id', 'meta', "
                            "'source', 'text'] (name the fields with --text-field/--id-field "
                            "to ignore other keys)")
    for named in ({"text"}, {"text", "id"}, {"source"}):
        (rec,) = _read(data, fields=FieldMap(given=frozenset(named)))
        assert rec.item == {"id": "x1", "text": "nice phone"}
