"""The command line meeting what a first-time user meets: `stream` stopped by an I/O error
(a full disk under --ids-out, a source that fails to read) or given a closed stdin, a
login refusal of a --database-url, a line of exactly the limit ending in CR LF."""

from __future__ import annotations

import datetime as dt
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from producer.sources import read_records
from tests.producer_helpers import broker_settings, jsonl_lines, lane_messages
from worker.process import settings_env

ROOT = Path(__file__).resolve().parents[1]


def bertstream(settings: Settings, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    pipes: dict[str, object] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", *args],
                          env=settings_env(settings), text=True, timeout=120, cwd=ROOT,
                          **{**pipes, **kwargs})  # type: ignore[call-overload]


def sent_items(redis_url: str, settings: Settings) -> list[str]:
    return [item["id"] for m in lane_messages(redis_url, f"{settings.queue}.bulk")
            for item in m["items"]]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_stream_ids_out_on_a_full_disk_says_what_was_sent(
        redis_url: str, sqlite_url: str, tmp_path: Path) -> None:
    """--ids-out whose disk fills up mid-run: one error line naming the ids file, how many
    items were sent (they stay queued) and the line to resume from, not a traceback."""
    settings = broker_settings(redis_url, sqlite_url, bulk_chunk_size=10)
    source = tmp_path / "posts.txt"
    source.write_text("".join(f"text number {i}\n" for i in range(100)), encoding="utf-8")
    out = bertstream(settings, "stream", str(source), "--no-progress", "--ids-out", "/dev/full")
    assert "Traceback" not in out.stderr, out.stderr
    sent = sent_items(redis_url, settings)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1, out.stderr
    assert last.startswith("error: cannot write the ids file /dev/full"), last
    assert f"{len(sent)} item(s) were sent" in last
    assert f"resume from line {len(sent) + 1}" in last


def test_stream_source_read_error_says_what_was_sent(
        redis_url: str, sqlite_url: str) -> None:
    """A source that fails to read (EIO: a failing disk or network mount; /proc/self/mem
    answers a read at offset 0 so) stops the stream with one error line, not a traceback."""
    if not os.path.exists("/proc/self/mem"):
        pytest.skip("needs Linux /proc")
    settings = broker_settings(redis_url, sqlite_url)
    out = bertstream(settings, "stream", "/proc/self/mem", "--no-progress")
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1, out.stderr
    assert last.startswith("error: cannot read the source: Input/output error"), last
    assert "0 item(s) were sent" in last and "resume from line 1" in last


def test_stream_stdin_closed_is_a_clear_error(redis_url: str, sqlite_url: str) -> None:
    """`stream -` with stdin closed (`<&-`, a daemon's): exit 2 in one line, not a traceback."""
    settings = broker_settings(redis_url, sqlite_url)
    out = bertstream(settings, "stream", "-", "--no-progress", stdin=subprocess.DEVNULL,
                     preexec_fn=lambda: os.close(0))
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: cannot read standard input")


def test_stream_ids_out_lists_every_sent_item(
        redis_url: str, sqlite_url: str, tmp_path: Path) -> None:
    """A run whose ids file works keeps writing it: the fix leaves the normal path alone."""
    settings = broker_settings(redis_url, sqlite_url, bulk_chunk_size=10)
    source = tmp_path / "posts.txt"
    source.write_text("".join(f"text number {i}\n" for i in range(25)), encoding="utf-8")
    ids = tmp_path / "ids.jsonl"
    out = bertstream(settings, "stream", str(source), "--no-progress", "--ids-out", str(ids))
    assert out.returncode == 0, out.stderr
    assert [x["id"] for x in jsonl_lines(ids)] == sent_items(redis_url, settings)


def test_database_url_option_is_named_in_a_login_refusal(redis_url: str) -> None:
    """A --database-url naming a role PostgreSQL does not have: the fix names the option
    that gave the URL, not BERTSTREAM_DATABASE_URL (unset; setting it would change nothing)."""
    url = "postgresql+psycopg://bertstream_no_such_role@127.0.0.1:5432/postgres"
    env = settings_env(Settings(broker_url=redis_url))
    env.pop("BERTSTREAM_DATABASE_URL", None)
    out = subprocess.run([sys.executable, "-c", "from producer.cli import main; main()",
                          "results", "--database-url", url],
                         env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert "role bertstream_no_such_role does not exist" in out.stderr, out.stderr
    assert "fix the user of --database-url" in out.stderr, out.stderr
    assert "BERTSTREAM_DATABASE_URL" not in out.stderr, out.stderr


@pytest.mark.parametrize("fmt", ["jsonl", "lines"])
def test_line_of_the_limit_with_crlf_is_read_as_with_lf(fmt: str) -> None:
    """A line of exactly the byte limit is read whether it ends in LF or CR LF (a Windows
    file), as a CSV record is; one byte more is refused either way, and the next line read."""
    limit = 200
    body = b'{"text": "hi there"' + b" " * (limit - 20) + b"}" if fmt == "jsonl" else b"x" * limit
    assert len(body) == limit
    after = b'{"text": "next"}' if fmt == "jsonl" else b"next"
    for end in (b"\n", b"\r\n"):
        got = list(read_records(io.BytesIO(body + end + after + end), fmt=fmt,
                                max_line_bytes=limit))
        assert [r.error for r in got] == [None, None], (end, got)
        over = list(read_records(io.BytesIO(b" " + body + end + after + end), fmt=fmt,
                                 max_line_bytes=limit))
        assert over[0].error == f"line is over the limit of {limit} bytes", (end, over)
        assert over[1].item is not None and over[1].line == 2, (end, over)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_output_to_a_full_disk_is_one_line(redis_url: str, sqlite_url: str) -> None:
    """``results`` and ``--help`` written to a full disk exit 1 with one error line (was a
    traceback, and a second report as the interpreter flushed stdout at exit)."""
    settings = broker_settings(redis_url, sqlite_url)
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    store.upsert([ResultRecord(id=f"full-{i}", text_sha256="a" * 64, text_chars=4, model="m",
                               status="done", label="positive", score=0.9, text="fine " * 40,
                               finished_at=dt.datetime.now(dt.timezone.utc))
                  for i in range(500)])
    store.close()
    for args in (["results", "--all"], ["--help"], ["results", "--help"]):
        with open("/dev/full", "w") as full:
            out = bertstream(settings, *args, stdout=full)
        assert out.returncode == 1, (args, out.stderr)
        assert out.stderr.strip().splitlines() == [
            "error: cannot write the output: No space left on device"], (args, out.stderr)
