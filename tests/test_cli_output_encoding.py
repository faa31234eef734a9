"""Output to a stdout whose encoding cannot write the text (a latin-1 or cp1252 locale, a
file redirected on Windows): one line naming the encoding and the fix, exit 1, not a
traceback; a UTF-8 stdout is unchanged."""

from __future__ import annotations

import codecs
import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest

from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from worker.process import settings_env

ROOT = Path(__file__).resolve().parents[1]


def _run(settings: Settings, encoding: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**settings_env(settings), "PYTHONIOENCODING": encoding}
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()",
                           *args], env=env, capture_output=True, timeout=120, cwd=ROOT,
                          check=False)


@pytest.fixture
def chinese_row(store: ResultStore, redis_url: str, db_url: str) -> Settings:
    store.upsert([ResultRecord(
        id="t1", text_sha256="a" * 64, text_chars=7, model="m", status="done",
        label="positive", score=0.9, source="微博", text="这部电影很好看",
        scores={"positive": 0.9, "negative": 0.1},
        finished_at=dt.datetime(2026, 12, 5, tzinfo=dt.timezone.utc))])
    return Settings(broker_url=redis_url, database_url=db_url)


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "jsonl"])
@pytest.mark.parametrize("encoding", ["latin-1", "cp1252"])
def test_an_output_encoding_that_cannot_write_the_text_is_one_line(
        chinese_row: Settings, fmt: str, encoding: str) -> None:
    """The line is ASCII (any stderr writes it) and names a character of the row."""
    out = _run(chinese_row, encoding, "results", "--format", fmt)
    err = out.stderr.decode("ascii")
    assert out.returncode == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    prefix = "error: the output's encoding ("
    assert err.startswith(prefix), err
    named, rest = err[len(prefix):].split(") cannot write U+", 1)
    assert codecs.lookup(named).name == codecs.lookup(encoding).name, err
    code = rest.split(":", 1)[0]
    assert chr(int(code, 16)) in "微博这部电影很好看", err
    assert err.rstrip().endswith(
        ": set PYTHONIOENCODING=utf-8 or a UTF-8 locale (LANG=C.UTF-8)"), err


def test_an_ascii_stdout_is_written_as_utf8(chinese_row: Settings) -> None:
    """Click takes an ASCII stdout (a C locale) for a misconfigured one and writes UTF-8."""
    out = _run(chinese_row, "ascii", "results", "--format", "csv")
    assert out.returncode == 0, out.stderr
    assert "这部电影很好看".encode() in out.stdout


def test_a_utf8_stdout_writes_the_text(chinese_row: Settings) -> None:
    out = _run(chinese_row, "utf-8", "results", "--format", "csv")
    assert out.returncode == 0, out.stderr
    assert "这部电影很好看".encode() in out.stdout


def test_a_latin1_stdout_writes_what_it_can(store: ResultStore, redis_url: str,
                                            db_url: str) -> None:
    """Nothing is refused up front: a latin-1 stdout writes latin-1 texts as before."""
    store.upsert([ResultRecord(
        id="t2", text_sha256="b" * 64, text_chars=9, model="m", status="done",
        label="positive", score=0.8, source="web", text="très bien",
        scores={"positive": 0.8, "negative": 0.2},
        finished_at=dt.datetime(2026, 12, 5, tzinfo=dt.timezone.utc))])
    settings = Settings(broker_url=redis_url, database_url=db_url)
    out = _run(settings, "latin-1", "results", "--format", "csv")
    assert out.returncode == 0, out.stderr
    assert "très bien".encode("latin-1") in out.stdout
