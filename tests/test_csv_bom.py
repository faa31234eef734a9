"""A CSV export for Excel: a UTF-8 byte-order mark on request, once, and read back.

Excel opens a UTF-8 CSV without the mark in the legacy code page, so Chinese texts show
as mojibake; neither ``results --format csv`` nor the API's ``format=csv`` could write
it. ``--bom`` / ``bom=true`` asks for it (off by default: a script reading the CSV as
plain UTF-8 would get ``\\ufeffid`` as its first header), and the readers of an
exported or Excel-saved CSV (``stream --format csv``, ``db delete --ids-file``) take it
off.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from producer.sources import read_records
from tests.producer_helpers import broker_settings, invoke, lane_messages
from worker.process import settings_env

UTC = dt.timezone.utc
BOM = "\ufeff".encode()
ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from producer.cli import main; main()"]
#: Over the CLI's page of 1,000 rows and its 64 KiB writes, and the API's 500-row chunks.
MANY = 2300


def _rows(n: int) -> list[ResultRecord]:
    return [ResultRecord(id=f"t{i:05d}", text_sha256="a" * 64, text_chars=8, model="m",
                         status="done", label="positive", score=0.9, source="微博",
                         text=f"这部电影很好看 {i}", scores={"positive": 0.9, "negative": 0.1},
                         finished_at=dt.datetime(2026, 12, 5, 0, i // 60, i % 60, tzinfo=UTC))
            for i in range(n)]


def _read(body: bytes) -> list[dict[str, str]]:
    """The rows of a CSV export as Excel and ``utf-8-sig`` read it."""
    return list(csv.DictReader(io.StringIO(body.decode("utf-8-sig"), newline="")))


def _one_bom(body: bytes) -> None:
    assert body.startswith(BOM) and body.count(BOM) == 1, body[:40]
    assert body[len(BOM):].startswith(b"id,"), body[:40]


def test_results_bom_is_an_opt_in_written_once(store: ResultStore, redis_url: str,
                                               db_url: str) -> None:
    """``results --format csv --bom`` starts with the mark, once, over many pages, and
    with ``--aggregate``; without it the first header is ``id`` as before."""
    store.upsert(_rows(MANY))
    settings = Settings(broker_url=redis_url, database_url=db_url)
    plain = invoke(["results", "--format", "csv", "--all"], settings)
    assert plain.exit_code == 0, plain.output
    assert plain.stdout_bytes.startswith(b"id,") and BOM not in plain.stdout_bytes
    marked = invoke(["results", "--format", "csv", "--all", "--bom"], settings)
    assert marked.exit_code == 0, marked.output
    _one_bom(marked.stdout_bytes)
    rows = _read(marked.stdout_bytes)
    assert len(rows) == MANY and rows[0]["id"] == f"t{MANY - 1:05d}"
    assert rows[-1]["text"] == "这部电影很好看 0" and rows[-1]["source"] == "微博"
    assert marked.stdout_bytes[len(BOM):] == plain.stdout_bytes
    few = invoke(["results", "--format", "csv", "--limit", "3", "--bom", "--excel-safe"],
                 settings)
    assert few.exit_code == 0 and len(_read(few.stdout_bytes)) == 3, few.output
    _one_bom(few.stdout_bytes)
    grouped = invoke(["results", "--aggregate", "source", "--format", "csv", "--bom"],
                     settings)
    assert grouped.exit_code == 0, grouped.output
    assert grouped.stdout_bytes.startswith(BOM + "source,count,mean_score\n微博,2300,".encode())
    assert grouped.stdout_bytes.count(BOM) == 1


def test_bom_with_another_format_is_a_usage_error(sqlite_url: str, redis_url: str) -> None:
    """The mark is for CSV: before JSON a parser refuses it, before a table it is noise."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url)
    for args in ([], ["--format", "json"], ["--format", "jsonl"], ["--format", "table"],
                 ["--aggregate", "label", "--format", "json"]):
        out = invoke(["results", *args, "--bom"], settings)
        assert out.exit_code == 2, (args, out.output)
        assert "--bom applies to --format csv only" in out.stderr, out.stderr
        assert out.stdout == ""


@pytest.mark.parametrize("encoding", ["cp1252", "utf-8-sig", "latin-1"])
def test_bom_output_is_utf8_whatever_the_stdout_encoding(sqlite_url: str, redis_url: str,
                                                         encoding: str) -> None:
    """Redirected to a file on Windows stdout is in the ANSI code page: cp1252 cannot
    write the mark (nor Chinese) and a traceback came; ``utf-8-sig`` would write a
    second mark. ``--bom`` writes UTF-8 with one mark, as it says."""
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    store.upsert(_rows(3))
    store.close()
    env = {**settings_env(Settings(broker_url=redis_url, database_url=sqlite_url)),
           "PYTHONIOENCODING": encoding}
    out = subprocess.run([*CLI, "results", "--format", "csv", "--bom"], env=env, cwd=ROOT,
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    _one_bom(out.stdout)
    assert [r["text"] for r in _read(out.stdout)] == [f"这部电影很好看 {i}" for i in (2, 1, 0)]


def test_api_csv_bom_is_an_opt_in_streamed_once(settings: Settings, api_factory: Any) -> None:
    """``GET /v1/results?format=csv&bom=true`` starts with the mark, once, however many
    chunks the export streams; ``bom`` is a declared parameter (the known-query check
    passes it), refused with another format as ``limit`` is, and off by default."""
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=60) as http:
        empty = http.get("/v1/results", params={"format": "csv", "bom": "true"})
        assert empty.status_code == 200, empty.text  # no table yet: the mark, then the header
        assert empty.content.startswith(BOM + b"id,") and empty.content.count(b"\n") == 1
        store = ResultStore.from_url(settings.database_url)
        store.create_schema()
        store.upsert(_rows(MANY))
        store.close()
        plain = http.get("/v1/results", params={"format": "csv"})
        assert plain.status_code == 200 and plain.content.startswith(b"id,"), plain.text[:200]
        for value in ("true", "1", "yes"):
            marked = http.get("/v1/results", params={"format": "csv", "bom": value})
            assert marked.status_code == 200, marked.text[:300]
            assert marked.headers["content-type"] == "text/csv; charset=utf-8"
            _one_bom(marked.content)
            assert marked.content[len(BOM):] == plain.content
        rows = _read(marked.content)
        assert len(rows) == MANY and rows[0]["text"] == f"这部电影很好看 {MANY - 1}"
        off = http.get("/v1/results", params={"format": "csv", "bom": "false"})
        assert off.status_code == 200 and off.content == plain.content
        for params in ({"bom": "true"}, {"format": "json", "bom": "true"},
                       {"format": "jsonl", "bom": "false"}):
            refused = http.get("/v1/results", params=params)
            assert refused.status_code == 422, (params, refused.text)
            error = refused.json()["error"]
            assert error["code"] == "invalid_input", error
            assert "bom applies to format=csv only" in error["message"], error
        bad = http.get("/v1/results", params={"format": "csv", "bom": "maybe"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
        assert "query.bom" in bad.json()["error"]["message"], bad.text
        declared = http.get("/openapi.json").json()["paths"]["/v1/results"]["get"]
        assert "bom" in {p["name"] for p in declared["parameters"]}


def test_a_marked_csv_streams_with_its_header_read(tmp_path: Path, redis_url: str,
                                                   sqlite_url: str) -> None:
    """A CSV saved by Excel as "CSV UTF-8" (or exported with the mark) starts with it:
    ``stream --format csv`` reads ``id`` and ``text`` as its columns, not ``\\ufeffid``."""
    excel = tmp_path / "excel.csv"
    excel.write_bytes(BOM + "id,text,source\r\nx-1,这部电影很好看,微博\r\nx-2,太差了,微博\r\n"
                      .encode())
    records = list(read_records(io.BytesIO(excel.read_bytes()), fmt="csv"))
    assert [r.item for r in records] == [
        {"id": "x-1", "text": "这部电影很好看", "source": "微博"},
        {"id": "x-2", "text": "太差了", "source": "微博"}]
    bsettings = broker_settings(redis_url, sqlite_url)
    out = invoke(["stream", str(excel), "--format", "csv"], bsettings)
    assert out.exit_code == 0, out.output
    assert "accepted 2, rejected 0" in out.output
    items = [it for m in lane_messages(redis_url, f"{bsettings.queue}.bulk")
             for it in m["items"]]
    assert [(it["id"], it["text"], it["source"]) for it in items] == [
        ("x-1", "这部电影很好看", "微博"), ("x-2", "太差了", "微博")]
    # a text-only file: its one column is the text column
    only = tmp_path / "only.csv"
    only.write_bytes(BOM + "text\n好\n".encode())
    assert [r.item for r in read_records(io.BytesIO(only.read_bytes()), fmt="csv")] == [
        {"text": "好"}]


def test_db_delete_reads_ids_with_a_mark(sqlite_url: str, redis_url: str) -> None:
    """``db delete --ids-file -``: ids piped from a file with the mark (Windows editors)
    name their tasks, the first one too."""
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    store.upsert(_rows(3))
    store.close()
    env = settings_env(Settings(broker_url=redis_url, database_url=sqlite_url))
    out = subprocess.run([*CLI, "db", "delete", "--ids-file", "-"], env=env, cwd=ROOT,
                         input=BOM + b"t00000\r\nt00002\r\n", capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert b"would delete 2 row(s) of 2 task(s)" in out.stdout, out.stdout
