"""Sources: JSONL and plain lines, auto-detection, bad lines refused alone (no services)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

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
    assert _read(b"body\nhello\n", fmt="csv")[0].error == "missing 'text'"


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
    # the default map keeps JSONL strict: an unknown key reaches the validator as it is
    assert _read(b'{"text": "a", "txt": "b"}\n')[0].item == {"text": "a", "txt": "b"}


def test_blank_lines_are_yielded_marked_when_asked() -> None:
    assert _read(b"a\n\n  \nb\n", keep_blank=True) == [
        SourceRecord(1, {"text": "a"}), SourceRecord(2, blank=True), SourceRecord(3, blank=True),
        SourceRecord(4, {"text": "b"})]
    assert len(_read(b"a\n\n  \nb\n")) == 2
