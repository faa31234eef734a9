"""README commands run as written, where what they did differed from what the README says."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

from contract.settings import Settings
from tests.producer_helpers import broker_settings, invoke, lane_messages
from worker.demo import run_demo, subprocess_worker
from worker.process import WorkerProc


def test_an_empty_meta_cell_counts_as_absent_beside_a_time_field(
        bsettings: Settings, tmp_path: Path) -> None:
    """README: "An empty id, source, time or meta cell counts as absent"; with
    --time-field the empty meta cell was refused as "'meta' must be a JSON object"."""
    src = tmp_path / "posts.csv"
    src.write_bytes(b"post_id,body,site,created_at,meta\n"
                    b"c1,\"Lovely place, would return\",weibo,2026-11-28T07:00:00,\n"
                    b"c2,fine,weibo,2026-11-28T08:00:00,\"{\"\"u\"\": 1}\"\n")
    result = invoke(["stream", str(src), "--format", "csv", "--no-progress",
                     "--text-field", "body", "--id-field", "post_id",
                     "--source-field", "site", "--time-field", "created_at"], bsettings)
    assert result.exit_code == 0, result.output
    items = [item for m in lane_messages(bsettings.broker_url, f"{bsettings.queue}.bulk")
             for item in m["items"]]
    assert [(i["id"], i["meta"]) for i in items] == [
        ("c1", {"time": "2026-11-28T07:00:00"}),
        ("c2", {"u": 1, "time": "2026-11-28T08:00:00"}),
    ]


@pytest.mark.parametrize(("args", "code"), [
    (["db", "current"], 0),
    (["db", "current", "--check"], 1),
    (["db", "delete", "--older-than", "90d"], 2),
    (["db", "delete", "--older-than", "90d", "--yes"], 2),
    (["db", "settle"], 2),
    (["db", "downgrade", "base"], 0),
])
def test_db_commands_never_create_a_missing_sqlite_file(
        redis_url: str, tmp_path: Path, args: list[str], code: int) -> None:
    """README (configuration): "a producer never creates a missing SQLite file (it
    reads as no rows)"; `db current`, `db delete`, `db settle` and `db downgrade` left
    an empty bertstream.db behind (a mistyped --database-url made a file of its own)."""
    path = tmp_path / "bertstream.db"
    settings = broker_settings(redis_url, f"sqlite:///{path}")
    result = invoke(args, settings)
    assert result.exit_code == code, result.output
    assert not path.exists()
    assert "no such file" in result.output


def test_db_upgrade_creates_the_sqlite_file(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "bertstream.db"
    result = invoke(["db", "upgrade"], broker_settings(redis_url, f"sqlite:///{path}"))
    assert result.exit_code == 0, result.output
    assert "upgraded empty -> " in result.output
    assert path.exists()


@pytest.mark.slow
def test_the_in_memory_demo_prints_no_library_noise(
        sqlite_url: str, tiny_model_dir: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """`bertstream demo` without Redis printed kombu's "No hostname was supplied.
    Reverting to default 'localhost'" warning twice and transformers' "Loading weights"
    bar between its own lines: noise that reads as a setting gone wrong."""
    lines: list[str] = []
    settings = Settings(broker_url="redis://127.0.0.1:1/0", database_url=sqlite_url,
                        model=str(tiny_model_dir), cache_dir=str(tmp_path))
    assert run_demo(settings, repeat=1, echo=lines.append) == 0
    assert any("in-memory transport" in line for line in lines)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "No hostname was supplied" in w]
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err


def _worker_settings(redis_url: str, sqlite_url: str, cache: Path, model: Path) -> Settings:
    return Settings(broker_url=redis_url, database_url=sqlite_url,
                    queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(cache),
                    model=str(model), max_wait_ms=20)


@pytest.mark.slow
def test_the_demo_worker_leaves_no_ready_file_in_the_cache_dir(
        redis_url: str, sqlite_url: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    """`bertstream demo` runs its worker with a ready file beside its log in the cache
    directory, named after the worker's random node name: each demo run left one more
    `demo-worker.log.demo-<hex>@localhost.ready` there, for good."""
    cache = tmp_path / "cache"
    with subprocess_worker(_worker_settings(redis_url, sqlite_url, cache, tiny_model_dir),
                           echo=lambda _line: None):
        assert len(list(cache.glob("*.ready"))) == 1, "the worker reports ready by its file"
    assert sorted(p.name for p in cache.glob("*.ready")) == []


@pytest.mark.slow
def test_a_killed_worker_process_leaves_no_ready_file(
        redis_url: str, sqlite_url: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    """A worker killed outright cannot remove its ready file; the process that started
    it does."""
    proc = WorkerProc(_worker_settings(redis_url, sqlite_url, tmp_path / "cache",
                                       tiny_model_dir),
                      tmp_path / "worker.log", args=("--device", "cpu"))
    try:
        proc.wait_ready(120)
        assert proc.ready_path is not None and proc.ready_path.exists()
        proc.kill()
        assert not proc.ready_path.exists()
    finally:
        proc.stop(timeout=10)
