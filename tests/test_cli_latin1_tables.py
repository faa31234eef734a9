"""A table's own mark of a cut cell on a stdout that cannot write "…" (a latin-1 or
ASCII locale): an all-ASCII text long enough to be cut made ``results`` exit 1 ("cannot
write U+2026") and ``submit --wait`` print ``\\u2026`` with a warning to change the
encoding. There the mark is "...", with no refusal and no warning; a stdout that can
write "…" (UTF-8, cp1252) keeps it."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from producer.formatting import MAX_CELL
from worker.process import settings_env

ROOT = Path(__file__).resolve().parents[1]
LONG = "custom ascii text that is long enough to be cut by the table of results, surely"


def _bertstream(settings: Settings, encoding: str,
                *args: str) -> subprocess.CompletedProcess[str]:
    env = {**settings_env(settings), "PYTHONIOENCODING": encoding}
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()",
                           *args], env=env, capture_output=True, timeout=120,
                          cwd=ROOT, check=False, encoding=encoding)


def _cut_cell(stdout: str, mark: str) -> str:
    """The text cell of the one row of a results table, checked to be cut with ``mark``."""
    [cell] = [line.split("  ")[-1] for line in stdout.splitlines() if LONG[:20] in line]
    assert cell == LONG[:MAX_CELL - len(mark)] + mark, stdout
    return cell


@pytest.fixture
def long_row(store: ResultStore, redis_url: str, db_url: str) -> Settings:
    store.upsert([ResultRecord(
        id="t1", text_sha256="a" * 64, text_chars=len(LONG), model="m", status="done",
        label="positive", score=0.9, source="web", text=LONG,
        scores={"positive": 0.9, "negative": 0.1},
        finished_at=dt.datetime(2026, 12, 5, tzinfo=dt.timezone.utc))])
    return Settings(broker_url=redis_url, database_url=db_url)


@pytest.mark.parametrize("encoding", ["latin-1", "ascii"])
def test_results_table_cuts_an_ascii_text_with_dots_where_stdout_has_no_ellipsis(
        long_row: Settings, encoding: str) -> None:
    out = _bertstream(long_row, encoding, "results")
    assert (out.returncode, out.stderr) == (0, ""), out.stderr
    _cut_cell(out.stdout, "...")


@pytest.mark.parametrize("encoding", ["utf-8", "cp1252"])
def test_a_stdout_that_can_write_it_keeps_the_ellipsis(long_row: Settings,
                                                     encoding: str) -> None:
    out = _bertstream(long_row, encoding, "results")
    assert (out.returncode, out.stderr) == (0, ""), out.stderr
    _cut_cell(out.stdout, "…")


def test_submit_wait_shows_an_ascii_text_without_a_warning(
        redis_url: str, sqlite_url: str, tmp_path: Path, tiny_model_dir: Path,
        worker_factory: Any) -> None:
    """Through a real worker: the table of ``submit --wait`` on a latin-1 stdout."""
    live = Settings(broker_url=redis_url, database_url=sqlite_url,
                    queue=f"bst-test-{uuid.uuid4().hex[:8]}", model=str(tiny_model_dir),
                    cache_dir=str(tmp_path / "cache"), max_wait_ms=20)
    worker_factory(live)
    out = _bertstream(live, "latin-1", "submit", LONG, "--wait", "--format", "table")
    assert (out.returncode, out.stderr) == (0, ""), out.stderr
    assert "done" in out.stdout and "\\u2026" not in out.stdout, out.stdout
    _cut_cell(out.stdout, "...")
