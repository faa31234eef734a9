"""The producer at the edges of its input: CSV headers, numeric ids, escaped lines, broker
URLs, an unwritable report, a silent database, a single string, wide characters."""

from __future__ import annotations

import io
import json
import logging
import unicodedata
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

import producer.cli as cli
from contract.errors import InvalidInput
from contract.messages import TaskItem
from contract.settings import Settings
from producer.client import Client
from producer.formatting import MAX_CELL, render_rows
from producer.items import ItemValidator
from producer.sources import FieldMap, SourceRecord, default_line_limit, read_records
from tests.producer_helpers import broker_settings, invoke, lane_messages
from tests.tcpproxy import SilentListener


def _read(data: bytes, **kwargs: object) -> list[SourceRecord]:
    return list(read_records(io.BytesIO(data), **kwargs))  # type: ignore[arg-type]


# -- CSV headers -----------------------------------------------------------


CSV = b"post_id,body,site\n1,great,web\n2,awful,web\n"


@pytest.mark.parametrize("option", ["--id-field", "--source-field", "--time-field",
                                    "--text-field"])
def test_a_csv_field_option_naming_no_column_is_refused_at_the_header(
        bsettings: Settings, tmp_path: Path, option: str) -> None:
    src = tmp_path / "posts.csv"
    src.write_bytes(CSV)
    args = ["stream", str(src), "--format", "csv", "--no-progress", "--text-field", "body",
            option, "postid"]
    result = invoke(args, bsettings)
    assert result.exit_code == 2, result.output
    assert f"{option} 'postid' is not a column" in result.stderr
    assert "'post_id', 'body', 'site'" in result.stderr
    assert lane_messages(bsettings.broker_url, f"{bsettings.queue}.bulk") == []


def test_default_csv_columns_may_be_missing(bsettings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "posts.csv"
    src.write_bytes(b"body\ngreat\n")
    result = invoke(["stream", str(src), "--format", "csv", "--no-progress",
                     "--text-field", "body"], bsettings)
    assert result.exit_code == 0, result.output
    assert "accepted 1, rejected 0" in result.stdout


@pytest.mark.parametrize(("data", "error"), [
    (b"id,t\xe9xt\n1,first post\n2,second post\n",
     "error: the CSV header (line 1) cannot be read: not valid UTF-8 (invalid continuation "
     "byte at byte 4)"),
    (b"id,body\n1,first post\n2,second post\n",
     "error: the CSV header has no 'text' column (its columns: 'id', 'body'); name the text "
     "column with --text-field"),
])
def test_a_bad_csv_header_is_one_error_up_front(bsettings: Settings, tmp_path: Path,
                                                 data: bytes, error: str) -> None:
    """Not a first data row taken for the header, nor every row refused one by one."""
    src = tmp_path / "posts.csv"
    src.write_bytes(data)
    result = invoke(["stream", str(src), "--format", "csv", "--no-progress"], bsettings)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == error
    assert result.stdout == ""
    assert lane_messages(bsettings.broker_url, f"{bsettings.queue}.bulk") == []


def test_a_csv_text_spanning_lines_is_one_text(bsettings: Settings, tmp_path: Path) -> None:
    """It used to be cut at the line break, its second half sent as a task of its own."""
    src = tmp_path / "posts.csv"
    src.write_bytes(b'id,text\r\n101,"Great hotel.\r\nBut the breakfast, was awful."\r\n'
                    b"102,plain post\r\n")
    ids = tmp_path / "ids.jsonl"
    result = invoke(["stream", str(src), "--format", "csv", "--no-progress",
                     "--ids-out", str(ids)], bsettings)
    assert result.exit_code == 0, result.output
    assert "accepted 2, rejected 0" in result.stdout
    items = [it for m in lane_messages(bsettings.broker_url, f"{bsettings.queue}.bulk")
             for it in m["items"]]
    assert [(it["id"], it["text"]) for it in items] == [
        ("101", "Great hotel.\r\nBut the breakfast, was awful."), ("102", "plain post")]
    assert [json.loads(x) for x in ids.read_text().splitlines()] == [
        {"line": 2, "id": "101"}, {"line": 4, "id": "102"}]


def test_a_field_named_explicitly_as_its_default_must_be_a_column() -> None:
    fields = FieldMap(text="body", given=frozenset({"text", "id"}))
    assert fields == FieldMap(text="body")  # what was given does not change the mapping
    with pytest.raises(InvalidInput, match="--id-field 'id' is not a column"):
        _read(CSV, fmt="csv", fields=fields)


# -- JSONL ids -------------------------------------------------------------


def test_integer_jsonl_ids_and_sources_become_text_with_the_default_mapping(
        sqlite_url: str) -> None:
    data = b'{"text":"a","id":123}\n{"text":"b","id":124,"source":5}\n'
    default = [r.item for r in _read(data)]
    mapped = [r.item for r in _read(data, fields=FieldMap(time="at"))]
    assert default == mapped == [{"text": "a", "id": "123"},
                                 {"text": "b", "id": "124", "source": "5"}]
    validator = ItemValidator(Settings(database_url=sqlite_url))
    checked = [validator.check(1, item) for item in default]
    assert [c.id for c in checked if isinstance(c, TaskItem)] == ["123", "124"]


def test_float_and_boolean_jsonl_ids_stay_as_given_on_either_path() -> None:
    data = b'{"text":"a","id":1.5}\n{"text":"b","id":true}\n'
    for fields in (None, FieldMap(time="at")):
        assert [r.item["id"] for r in _read(data, fields=fields)] == [1.5, True]  # type: ignore[index]


def test_the_line_limit_leaves_room_for_a_text_of_astral_characters() -> None:
    settings = Settings()
    # json.dumps escapes an emoji as a surrogate pair: 12 bytes per character
    line = json.dumps({"text": "\U0001F600" * settings.max_text_chars, "id": "i" * 128,
                       "source": "s" * 128})
    assert len(line.encode()) <= default_line_limit(settings)
    (rec,) = _read(line.encode(), max_line_bytes=default_line_limit(settings))
    assert rec.error is None and rec.item is not None


def test_jsonl_with_extra_keys_streams_once_a_field_is_named(bsettings: Settings,
                                                             tmp_path: Path) -> None:
    src = tmp_path / "posts.jsonl"
    src.write_bytes(b'{"id":"x1","text":"nice phone","user":"bob","created_at":"2026-12-01"}\n')
    strict = invoke(["stream", str(src), "--no-progress"], bsettings)
    assert strict.exit_code == 5, strict.output
    assert "(name the fields with --text-field/--id-field to ignore other keys)" in strict.stdout
    named = invoke(["stream", str(src), "--no-progress", "--text-field", "text",
                    "--id-field", "id"], bsettings)
    assert named.exit_code == 0, named.output
    items = [it for m in lane_messages(bsettings.broker_url, f"{bsettings.queue}.bulk")
             for it in m["items"]]
    assert [(it["id"], it["text"]) for it in items] == [("x1", "nice phone")]


def test_a_line_json_cannot_read_is_refused_alone(bsettings: Settings, tmp_path: Path) -> None:
    """Deep nesting (RecursionError) or a 5,000-digit number (ValueError) used to end the
    stream with a traceback (exit 1), the buffered lines before it dropped."""
    good = b"".join(b'{"text":"good %d"}\n' % i for i in range(300))
    src = tmp_path / "posts.jsonl"
    src.write_bytes(good + b'{"text":"x","meta":{"a":' + b"[" * 100_000 + b"]" * 100_000
                    + b'}}\n{"text":"y","id":' + b"1" * 5000 + b'}\n{"text":"after"}\n')
    result = invoke(["stream", str(src), "--no-progress"], bsettings)
    assert result.exit_code == 5, result.output
    assert "accepted 301, rejected 2" in result.stdout
    assert "line 301: invalid JSON (nested too deeply)" in result.stdout
    assert "line 302: invalid JSON (Exceeds the limit (4300 digits)" in result.stdout
    items = [it for m in lane_messages(bsettings.broker_url, f"{bsettings.queue}.bulk")
             for it in m["items"]]
    assert len(items) == 301 and items[-1]["text"] == "after"


# -- CLI guards ------------------------------------------------------------


@pytest.mark.parametrize("url", ["memory://", "foo://x"])
@pytest.mark.parametrize("command", [["submit", "hello"], ["stream", "-"]])
def test_the_cli_publishes_only_to_a_redis_broker(sqlite_url: str, url: str,
                                                  command: list[str]) -> None:
    result = CliRunner().invoke(cli.main, [*command, "--no-progress"] if command[0] == "stream"
                                else command, obj=Settings(broker_url=url, database_url=sqlite_url),
                                input="hello\n")
    assert result.exit_code == 2, result.output
    assert "BERTSTREAM_BROKER_URL" in result.stderr and "Traceback" not in result.output


def test_a_report_to_a_missing_directory_is_a_clean_error(bsettings: Settings,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "missing" / "r.png"
    result = invoke(["report", "--out", str(out)], bsettings)
    assert result.exit_code == 2, result.output
    assert f"cannot write {out}" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_refused_redis_stream_entry_is_shown_by_position_and_entry_id(
        bsettings: Settings) -> None:
    client = redis.Redis.from_url(bsettings.broker_url, decode_responses=True)
    try:
        client.xadd("posts", {"text": "fine"})
        bad = str(client.xadd("posts", {"body": "no text field"}))
    finally:
        client.close()
    result = invoke(["stream", "--from-redis-stream", "posts", "--group", "g",
                     "--idle-exit", "0", "--no-progress"], bsettings)
    assert result.exit_code == 5, result.output
    assert "rejected entries (first 1):" in result.stdout
    assert f"  entry #2 (id {bad}): missing 'text'" in result.stdout


# -- the client --------------------------------------------------------------


@pytest.mark.parametrize("one", ["hello", b"hello", bytearray(b"hello")])
def test_submit_many_refuses_a_single_string(bsettings: Settings, one: object) -> None:
    with Client(bsettings) as client, pytest.raises(TypeError, match="submit_many"):
        client.submit_many(one)  # type: ignore[arg-type]
    assert lane_messages(bsettings.broker_url, f"{bsettings.queue}.bulk") == []


def test_a_silent_database_is_tried_once_per_run_for_caller_ids(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The caller-id check gives up on a database that accepts and never answers, says so
    once, and the chunks after the first do not try again (each try costs the connect
    timeout)."""
    listener = SilentListener()
    try:
        s = broker_settings(
            redis_url, f"postgresql+psycopg://postgres@127.0.0.1:{listener.port}/none",
            db_connect_timeout_s=1)
        items = [{"text": f"text {i}", "id": f"id-{i}"} for i in range(6)]
        with caplog.at_level(logging.WARNING, logger="producer.client"), Client(s) as client:
            report = client.submit_many(items, chunk_size=2)
        attempts = len(listener._held)
    finally:
        listener.close()
    assert report.accepted == 6 and report.messages == 3
    assert attempts == 1
    warnings = [r for r in caplog.records if r.name == "producer.client"]
    assert len(warnings) == 1 and "not checked" in warnings[0].getMessage()


# -- tables ------------------------------------------------------------------


def _columns(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def test_a_table_of_chinese_texts_stays_aligned() -> None:
    rows = [{"text": "这家酒店很好", "score": 0.9}, {"text": "ok", "score": 0.25},
            {"text": "服务" * 60, "score": 0.5}]
    lines = render_rows(rows, ["text", "score"], "table").splitlines()
    # the score column ends at the same terminal column on every line
    assert len({_columns(line) for line in lines}) == 1, lines
    cell = lines[-1].rsplit("  ", 1)[0].rstrip()
    assert cell.endswith("…") and _columns(cell) <= MAX_CELL
