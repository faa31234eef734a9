"""A worker stopped warmly closes its result store: on SQLite its rows are in the database
file itself, not only in the write-ahead log, so a copy of that one file holds them."""

from __future__ import annotations

import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from contract.constants import RESULTS_TABLE
from contract.settings import Settings
from producer.client import Client

pytestmark = pytest.mark.slow


def test_sigterm_leaves_the_rows_in_the_sqlite_file(redis_url: str, tmp_path: Path,
                                                    tiny_model_dir: Path,
                                                    worker_factory: Any) -> None:
    db = tmp_path / "results.db"
    s = Settings(broker_url=redis_url, database_url=f"sqlite:///{db}", model=str(tiny_model_dir),
                 queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                 max_wait_ms=20)
    worker = worker_factory(s)
    # A reader keeps the database open through the stop, as the API would: the worker's
    # connections are not the last ones, so SQLite does not fold the log in on its own.
    reader = sqlite3.connect(db)
    try:
        with Client(s) as client:
            ids = [client.submit(f"the hotel is good {i}") for i in range(5)]
            client.wait(ids, timeout=60)
        assert reader.execute(f"SELECT count(*) FROM {RESULTS_TABLE}").fetchone() == (5,)
        assert worker.stop(timeout=30) == 0
        copy = tmp_path / "copy" / "results.db"
        copy.parent.mkdir()
        shutil.copyfile(db, copy)  # the database file alone: no -wal, no -shm
        copied = sqlite3.connect(copy)
        try:
            stored = {row[0] for row in copied.execute(f"SELECT id FROM {RESULTS_TABLE}")}
        finally:
            copied.close()
        assert stored == set(ids)
    finally:
        reader.close()


def test_a_busy_database_does_not_hold_up_the_stop(redis_url: str, tmp_path: Path,
                                                   tiny_model_dir: Path,
                                                   worker_factory: Any) -> None:
    """A reader in a long transaction keeps the log from being folded in: the worker
    stops at once all the same (not after its lock wait, a minute here), its rows still
    in the log for readers."""
    db = tmp_path / "results.db"
    s = Settings(broker_url=redis_url, database_url=f"sqlite:///{db}", model=str(tiny_model_dir),
                 queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                 max_wait_ms=20, db_statement_timeout_s=60)
    worker = worker_factory(s)
    reader = sqlite3.connect(db, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute(f"SELECT count(*) FROM {RESULTS_TABLE}").fetchone() == (0,)
        with Client(s) as client:  # written after the reader's snapshot
            ids = [client.submit(f"the hotel is good {i}") for i in range(3)]
            client.wait(ids, timeout=60)
        assert worker.stop(timeout=30) == 0
        assert "stay in its write-ahead log" in worker.tail()
        reader.execute("COMMIT")
        assert reader.execute(f"SELECT count(*) FROM {RESULTS_TABLE}").fetchone() == (3,)
    finally:
        reader.close()
