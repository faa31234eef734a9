"""`bertstream results` writes row by row: --all on a large table stays in bounded memory
(the real CLI, its peak RSS measured), and prints what the list-building path printed."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import producer.formatting as formatting
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from producer.cli import main
from producer.client import Client
from producer.formatting import iter_results, render_results
from tests.producer_helpers import broker_settings, record

ROOT = Path(__file__).resolve().parent.parent
T0 = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.timezone.utc)

#: Runs a command (argv[2:]) with its stdout to the file argv[1]; prints its exit status
#: and its peak RSS in KiB (Linux), the only child this wrapper ever had.
PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "with open(sys.argv[1], 'wb') as out:\n"
    "    code = subprocess.run(sys.argv[2:], stdout=out).returncode\n"
    "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def _peak_rss_mib(args: list[str], out: Path) -> int:
    cli = [sys.executable, "-c", "from producer.cli import main; main()"]
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(out), *cli, *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    code, peak_kib = done.stdout.split()
    assert code == "0", done.stderr
    return int(peak_kib) // 1024


def _fill(url: str, rows: int, chars: int) -> None:
    store = ResultStore.from_url(url)
    store.create_schema()
    for start in range(0, rows, 2000):
        batch = []
        for i in range(start, min(rows, start + 2000)):
            text = f"text {i:06d} " + "x" * (chars - 12)
            batch.append(ResultRecord(
                id=f"t{i:06d}", text_sha256=hashlib.sha256(text.encode()).hexdigest(),
                text_chars=len(text), model="m1", status="done", source="s", text=text,
                finished_at=T0 + dt.timedelta(seconds=i // 3), label="positive", score=0.9,
                scores={"positive": 0.9, "negative": 0.1}, lang="en"))
        store.upsert(batch)
    store.close()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB: Linux")
def test_results_all_holds_a_page_not_the_result_set(sqlite_url: str, tmp_path: Path) -> None:
    """`results --all` built a list of every row and one string of the whole output: its
    memory grew with the table until it ran out. Each format now writes row by row (the
    table spools its cells), so the peak stays well under the texts it prints: here it
    may exceed `results --limit 10`'s by less than half of them."""
    rows, chars = 10_000, 8_000
    _fill(sqlite_url, rows, chars)
    texts_mib = rows * chars // 2**20
    db = ["--database-url", sqlite_url]
    base = _peak_rss_mib([*db, "results", "--limit", "10", "--format", "csv"], tmp_path / "few")
    for fmt in ("csv", "json", "table"):
        out = tmp_path / f"all.{fmt}"
        peak = _peak_rss_mib([*db, "results", "--all", "--format", fmt], out)
        assert peak - base < texts_mib // 2, (fmt, base, peak, texts_mib)
        with out.open(encoding="utf-8") as printed:
            lines = [line[:20] for line in printed]
        if fmt == "json":
            assert (lines[0], lines[-1]) == ("[\n", "]\n")
            assert sum(line.startswith('    "id": ') for line in lines) == rows
        else:  # the header (and the table's rule), then each row, the oldest last
            assert len(lines) == rows + (2 if fmt == "table" else 1)
            assert lines[0].startswith("ID" if fmt == "table" else "id,")
            assert lines[-1].startswith("t000002")


def _tricky_rows(store: ResultStore) -> None:
    """Rows that exercise every formatting rule: five tasks finished at one instant
    (the newest), control characters and ANSI styles, wide and combining characters,
    formulas, a failed row, a text with a newline, a task with a second model's row."""
    tie = T0 + dt.timedelta(hours=3)
    store.upsert([
        record(tid, source="web", text=text, finished_at=tie)
        for tid, text in (("t-b", "=SUM(A1:A9)"), ("t-a", "\x1b[31mred\x1b[0m and \x07"),
                          ("t-10", "今天天气很好" * 8), ("t-2", "line one\nline two"),
                          ("t-c", "e\u0301" * 60))
    ])
    store.upsert([
        record("r1", source="@feed", text="+fine", score=0.6, finished_at=T0),
        record("r2", source="-web", status="failed", error="text is empty\x9b",
               finished_at=T0 + dt.timedelta(hours=1)),
        record("r3", text="a very long text " * 10, score=0.75,
               finished_at=T0 + dt.timedelta(hours=2)),
        dataclasses.replace(record("r1", source="@feed", text="+fine", score=0.2),
                            model="other", finished_at=T0 + dt.timedelta(hours=2, minutes=30)),
    ])


#: Options of `results`, and the same filters as Client.query keywords (the old path).
CASES: list[tuple[list[str], dict[str, object]]] = [
    ([], {"limit": 100}),
    (["--all"], {"limit": None}),
    (["--limit", "3"], {"limit": 3}),  # inside the five tasks of one instant
    (["--limit", "6"], {"limit": 6}),
    (["--model", "tiny-test", "--all"], {"model": "tiny-test", "limit": None}),
    (["--source", "web", "--limit", "2"], {"source": "web", "limit": 2}),
    (["--status", "failed"], {"status": "failed", "limit": 100}),
    (["--id", "r1", "--id", "t-a", "--id", "t-2", "--limit", "2"],
     {"ids": ["r1", "t-a", "t-2"], "limit": 2}),
]


@pytest.mark.parametrize("fmt, extra", [("table", []), ("json", []), ("csv", []),
                                        ("csv", ["--excel-safe"])],
                         ids=["table", "json", "csv", "csv-excel-safe"])
def test_results_prints_what_the_list_path_printed(store: ResultStore, redis_url: str,
                                                   db_url: str, fmt: str,
                                                   extra: list[str]) -> None:
    """Byte for byte, stdout and stderr ("N of M shown"), what `results` printed when it
    rendered Client.query's list in one string (rows of one instant by id ascending)."""
    _tricky_rows(store)
    settings = broker_settings(redis_url, db_url)
    with Client(settings) as client:
        for args, query in CASES:
            filters = {k: v for k, v in query.items() if k != "limit"}
            limit = query["limit"]
            assert limit is None or isinstance(limit, int)
            records = client.query(**filters, limit=limit)  # type: ignore[arg-type]
            text = render_results(records, fmt, terminal=False, excel_safe=bool(extra))
            note = ""
            if limit is not None and len(records) == limit:
                matched = client.count(**filters)  # type: ignore[arg-type]
                note = f"{limit} of {matched} shown; --limit N or --all\n" if matched > limit else ""
            got = CliRunner().invoke(main, ["results", "--format", fmt, *extra, *args],
                                     obj=settings)
            assert got.exit_code == 0, got.output
            # CSV off a terminal keeps every value as stored, ANSI sequences too; click.echo
            # removes them from the other formats
            assert got.stdout == (text + "\n" if fmt == "csv" else click.unstyle(text + "\n")), args
            if fmt == "csv" and args == []:
                assert "\x1b[31mred\x1b[0m and \x07" in got.stdout
            assert got.stderr == note, args


@pytest.mark.parametrize("spool", [formatting.TABLE_SPOOL_BYTES, 1])
def test_iter_results_joins_to_render_results(monkeypatch: pytest.MonkeyPatch,
                                              spool: int) -> None:
    """On a terminal too (escaped CSV), none or one row, and a table spooled to disk."""
    monkeypatch.setattr(formatting, "TABLE_SPOOL_BYTES", spool)
    rows = [record(f"id{i}", text=text, source=source, score=score, status=status,
                   error="boom\x1b]0;title\x07" if status == "failed" else None)
            for i, (text, source, score, status) in enumerate([
                ("=1+1", "@x", 0.5, "done"), ("中文", None, None, "done"),
                ("t", "-s", 0.1, "failed"), ("x" * 100, "s", 0.99, "expired")])]
    rows[1] = dataclasses.replace(rows[1], text="中文 \x9b\ud800")  # a lone surrogate too
    rows.append(dataclasses.replace(rows[0], id="m2", model="second"))
    for records in ([], rows[:1], rows[:4], rows):
        for fmt in formatting.FORMATS:
            for terminal in (False, True):
                for excel_safe in (False, True):
                    kwargs = {"terminal": terminal, "excel_safe": excel_safe}
                    joined = "".join(iter_results(iter(records), fmt, **kwargs))
                    # JSONL of no rows is no line at all, not an empty one
                    end = "" if fmt == "jsonl" and not records else "\n"
                    assert joined == render_results(records, fmt, **kwargs) + end, (
                        fmt, kwargs, len(records))


def test_results_with_no_table_or_no_rows_prints_none(redis_url: str, sqlite_url: str,
                                                      tmp_path: Path) -> None:
    settings = broker_settings(redis_url, f"sqlite:///{tmp_path / 'absent.db'}")
    for fmt, shown in (("table", "(no results)\n"), ("json", "[]\n")):
        got = CliRunner().invoke(main, ["results", "--all", "--format", fmt], obj=settings)
        assert (got.exit_code, got.stdout, got.stderr) == (0, shown, "")
    assert not (tmp_path / "absent.db").exists()  # a reader never creates the file
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    store.close()
    got = CliRunner().invoke(main, ["results", "--format", "csv"],
                             obj=Settings(database_url=sqlite_url, broker_url=redis_url))
    assert got.exit_code == 0 and got.stdout.startswith("id,") and len(got.stdout.splitlines()) == 1
