"""``bertstream submit`` (and ``stream``'s summary) run by an operator in a shell whose
stdout cannot write the texts (a latin-1 or cp1252 locale): the texts are sent before
anything is printed, so their ids and results must be shown, escaped, not refused with
exit 1 (which left the user with tasks sent and no id to follow them by)."""

from __future__ import annotations

import codecs
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from contract.errors import EXIT_REJECTED
from contract.settings import Settings
from worker.process import settings_env

ROOT = Path(__file__).resolve().parents[1]
TEXT = "这部电影很好看"
EMOJI = "good film 😀"  # past U+FFFF: JSON needs a surrogate pair, not Python's \U escape


def _submit(settings: Settings, encoding: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _bertstream(settings, encoding, "submit", *args)


def _bertstream(settings: Settings, encoding: str,
                *args: str) -> subprocess.CompletedProcess[str]:
    env = {**settings_env(settings), "PYTHONIOENCODING": encoding}
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()",
                           *args], env=env, capture_output=True, timeout=120,
                          cwd=ROOT, check=False, encoding=encoding)


def _escaped_once(err: str, encoding: str) -> None:
    """One warning on stderr naming the encoding and the fix; no error, no traceback."""
    [line] = err.strip().splitlines()
    prefix = "warning: the output's encoding ("
    assert line.startswith(prefix), err
    named = line[len(prefix):].split(")", 1)[0]
    assert codecs.lookup(named).name == codecs.lookup(encoding).name, err
    assert "set PYTHONIOENCODING=utf-8" in line, err


@pytest.fixture
def live(redis_url: str, sqlite_url: str, tmp_path: Path, tiny_model_dir: Path,
         worker_factory: Any) -> Settings:
    settings = Settings(broker_url=redis_url, database_url=sqlite_url,
                        queue=f"bst-test-{uuid.uuid4().hex[:8]}", model=str(tiny_model_dir),
                        cache_dir=str(tmp_path / "cache"), max_wait_ms=20)
    worker_factory(settings)
    return settings


def test_submit_wait_shows_ids_and_results_escaped_where_stdout_cannot_write_them(
        live: Settings) -> None:
    for encoding in ("latin-1", "cp1252"):
        out = _submit(live, encoding, TEXT, EMOJI, "--wait", "--format", "json")
        assert out.returncode == 0, out.stderr
        _escaped_once(out.stderr, encoding)
        rows = json.loads(out.stdout)  # still JSON, with the very texts sent
        assert [r["text"] for r in rows] == [TEXT, EMOJI]
        assert all(r["status"] == "done" and len(r["id"]) == 32 for r in rows)

        out = _submit(live, encoding, TEXT, "--wait", "--format", "jsonl", "--source", "微博")
        assert out.returncode == 0, out.stderr
        row = json.loads(out.stdout)
        assert (row["text"], row["source"], row["status"]) == (TEXT, "微博", "done")

        for fmt in ("table", "csv"):
            out = _submit(live, encoding, TEXT, "--wait", "--format", fmt)
            assert out.returncode == 0, out.stderr
            _escaped_once(out.stderr, encoding)
            assert "\\u8fd9\\u90e8" in out.stdout and "done" in out.stdout, out.stdout


def test_submit_shows_an_id_its_stdout_cannot_write_escaped(
        redis_url: str, sqlite_url: str) -> None:
    """Without --wait too (an id of the caller's may be any text): no worker needed."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url,
                        queue=f"bst-test-{uuid.uuid4().hex[:8]}")
    out = _submit(settings, "cp1252", TEXT, "--id", "任务-1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "\\u4efb\\u52a1-1"
    out = _submit(settings, "latin-1", TEXT, "--id", "任务-2", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [{"id": "任务-2"}]


def test_submit_writes_what_the_encoding_can_as_it_is(redis_url: str, sqlite_url: str) -> None:
    """A latin-1 id is written in latin-1, with no warning."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url,
                        queue=f"bst-test-{uuid.uuid4().hex[:8]}")
    out = _submit(settings, "latin-1", "très bien", "--id", "tâche-1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tâche-1" and "warning: the output" not in out.stderr


def test_stream_summary_shows_escaped_what_stdout_cannot_write(
        redis_url: str, sqlite_url: str, tmp_path: Path) -> None:
    """``stream`` prints its summary once its texts are sent: a rejected line whose reason
    quotes an id stdout cannot write (a repeated id) is shown escaped. Refused, it was exit
    1 with no summary, as if nothing had been sent, and a rerun sent the texts again."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url,
                        queue=f"bst-test-{uuid.uuid4().hex[:8]}")
    source = tmp_path / "texts.jsonl"
    records = [{"text": "ok"}, {"text": TEXT, "id": "任务-3"}, {"text": TEXT, "id": "任务-3"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = _bertstream(settings, "cp1252", "stream", "--no-progress", str(source))
    assert out.returncode == EXIT_REJECTED, out.stderr
    assert out.stdout.startswith("accepted 2, rejected 1"), out.stdout
    assert "duplicate id '\\u4efb\\u52a1-3'" in out.stdout, out.stdout
    assert "error:" not in out.stderr
    [warning] = [line for line in out.stderr.splitlines() if "output's encoding" in line]
    _escaped_once(warning, "cp1252")
