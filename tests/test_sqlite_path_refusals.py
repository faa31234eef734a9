"""A SQLite URL whose file cannot be opened for a reason a wait does not mend is a
setting to fix (exit 2 naming the path), not an outage.

SQLite says only "unable to open database file" for a directory that does not exist,
a path that is a directory, or a directory the user may not write in; each read as an
outage (exit 3), so a supervisor restarted the worker for ever and the log never named
the file. The default ``sqlite:///bertstream.db`` is relative to the working directory,
which a service manager sets to ``/``. A file in place of a directory on the way, or a
directory the user may not search, crashed the writers (exit 1, a traceback) before
SQLite was asked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contract.settings import Settings
from tests.producer_helpers import broker_settings
from tests.test_cli_option_edges import ROOT, bertstream, error_line
from worker.process import settings_env


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


def bound_by_modes(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``bertstream ARGS`` as a user whom file modes stop: as root, without the
    capabilities that let root past them (root reads, writes and searches anywhere)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root, and no setpriv to drop its right past file modes")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    return subprocess.run([*prefix, sys.executable, "-c", "from producer.cli import main; main()",
                           *args], env=settings_env(settings), capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("below", ["", "sub/"], ids=["in-it", "deeper"])
@pytest.mark.parametrize("command", [["db", "upgrade"], ["worker"], ["serve"], ["results"]],
                         ids=["db-upgrade", "worker", "serve", "results"])
def test_a_file_in_place_of_a_directory_is_named(redis_url: str, tmp_path: Path,
                                                 command: list[str], below: str) -> None:
    """A regular file where the URL needs a directory: each writer refused it with a
    NotADirectoryError traceback (exit 1) from creating the private database file; a
    reader (``results``) refuses it as a missing directory, not as an empty store."""
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    path = f"{afile}/{below}results.db"
    settings = broker_settings(redis_url, f"sqlite:///{path}", cache_dir=str(tmp_path / "cache"))
    line = error_line(bertstream(settings, *command))
    assert f"{afile} is a file, not a directory" in line and path in line, line
    assert afile.read_text() == "not a directory"


@pytest.mark.parametrize("below", ["", "sub/"], ids=["in-it", "deeper"])
@pytest.mark.parametrize("command", [["db", "upgrade"], ["worker"], ["serve"], ["results"]],
                         ids=["db-upgrade", "worker", "serve", "results"])
def test_a_directory_this_user_may_not_search_is_named(redis_url: str, tmp_path: Path,
                                                       command: list[str], below: str) -> None:
    """A directory of mode 000 on the way (the URL's directory or one above it): each
    writer refused it with a PermissionError traceback (exit 1); a reader read it as
    an empty store (exit 0) when it was the URL's own directory."""
    locked = tmp_path / "locked"
    (locked / "sub").mkdir(parents=True)
    path = f"{locked}/{below}results.db"
    settings = broker_settings(redis_url, f"sqlite:///{path}", cache_dir=str(tmp_path / "cache"))
    locked.chmod(0o000)
    try:
        line = error_line(bound_by_modes(settings, *command))
    finally:
        locked.chmod(0o755)
    assert f"this user may not search {locked}" in line and path in line, line
    assert os.listdir(locked) == ["sub"] and os.listdir(locked / "sub") == []


def test_a_directory_without_write_permission_is_named(redis_url: str, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = error_line(bound_by_modes(broker_settings(redis_url,
                                                         f"sqlite:///{locked / 'r.db'}"),
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
