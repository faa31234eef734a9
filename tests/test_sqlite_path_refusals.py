"""A SQLite URL whose file cannot be opened for a reason a wait does not mend is a
setting to fix (exit 2 naming the path), not an outage.

SQLite says only "unable to open database file" for a directory that does not exist,
a path that is a directory, or a directory the user may not write in; each read as an
outage (exit 3), so a supervisor restarted the worker for ever and the log never named
the file. The default ``sqlite:///bertstream.db`` is relative to the working directory,
which a service manager sets to ``/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.producer_helpers import broker_settings
from tests.test_cli_option_edges import bertstream, error_line


def test_db_upgrade_in_a_missing_directory_names_it(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "results.db"
    line = error_line(bertstream(broker_settings(redis_url, f"sqlite:///{path}"), "db", "upgrade"))
    assert f"{path.parent} does not exist" in line and "BERTSTREAM_DATABASE_URL" in line, line
    assert not path.parent.exists()


def test_a_directory_as_the_database_file_is_named(redis_url: str, tmp_path: Path) -> None:
    line = error_line(bertstream(broker_settings(redis_url, f"sqlite:///{tmp_path}"),
                                 "db", "upgrade"))
    assert f"{tmp_path} is a directory" in line, line


def test_a_relative_path_is_shown_where_it_lies(redis_url: str, tmp_path: Path) -> None:
    settings = broker_settings(redis_url, "sqlite:///missing-dir/results.db")
    out = bertstream(settings, "--database-url", "sqlite:///missing-dir/results.db",
                     "db", "upgrade")
    line = error_line(out)
    # the tests run in the repository root (bertstream's cwd)
    shown = Path(__file__).resolve().parents[1] / "missing-dir"
    assert f"{shown} does not exist" in line and "--database-url" in line, line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in any directory")
def test_a_directory_without_write_permission_is_named(redis_url: str, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = error_line(bertstream(broker_settings(redis_url, f"sqlite:///{locked / 'r.db'}"),
                                     "db", "upgrade"))
    finally:
        locked.chmod(0o755)
    assert f"cannot create {locked / 'r.db'}" in line, line


def test_a_worker_on_a_missing_directory_exits_2_at_start(redis_url: str,
                                                           tmp_path: Path) -> None:
    path = tmp_path / "gone" / "results.db"
    settings = broker_settings(redis_url, f"sqlite:///{path}", cache_dir=str(tmp_path / "cache"))
    line = error_line(bertstream(settings, "worker"))
    assert f"{path.parent} does not exist" in line, line
