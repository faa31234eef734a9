"""Review (session 18, an operator on bare metal): a worker that outlives a long Redis
outage, a ready file in a missing directory, a password's unencoded '@', the health
check's refusal of a setting. (The launcher's line naming the child that stopped its
set is checked in tests/test_launcher.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from contract.settings import Settings
from producer.cli import main
from tests.polling import until
from tests.test_launcher import Launcher, launcher_factory  # noqa: F401 - fixture
from tests.workers import WorkerProcess

__all__ = ["launcher_factory"]


@pytest.mark.slow
def test_a_worker_that_loses_redis_never_gives_up_reconnecting(
        redis_server: Any, sqlite_url: str, tmp_path: Path,
        worker_factory: Callable[..., WorkerProcess]) -> None:
    """The README promises that a worker which loses Redis after its start reconnects for
    as long as it takes. Celery's default gave up after 100 tries (its log counts them:
    ``(1/100)``), about 47 minutes in, with an "Unrecoverable error" and exit 1."""
    settings = Settings(broker_url=redis_server.url, database_url=sqlite_url, model="null",
                        queue=f"bst-18b-{uuid.uuid4().hex[:8]}",
                        cache_dir=str(tmp_path / "cache"))
    worker = worker_factory(settings)
    try:
        redis_server.stop()
        tries = until(lambda: re.findall(r"Trying again in [\d.]+ seconds\.\.\. \((\d+)/(\w+)\)",
                                         worker.log()), 60, "a reconnection try logged")
    finally:
        redis_server.start()
    assert tries[0][1] == "None", worker.log()  # no limit on the tries
    assert worker.proc.poll() is None, worker.log()


@pytest.mark.parametrize("command", [["db", "current"], ["db", "upgrade"],
                                     ["results", "--limit", "1"]])
def test_an_unencoded_at_sign_in_the_database_password_is_refused_unprinted(
        command: list[str], pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL password holding '@' (``u:p@ss@host``): SQLAlchemy reads the password up
    to the first '@' and the rest as the host, whose failed look-up printed that piece of
    the password (worker logs too) and read as an outage (exit 3). It is a setting to fix,
    said without the password."""
    host = pg_url.rpartition("@")[2]
    url = f"postgresql+psycopg://postgres:p@SECRET18b@{host}"
    monkeypatch.setenv("BERTSTREAM_DATABASE_URL", url)
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2, result.output
    assert "SECRET18b" not in result.output
    assert "BERTSTREAM_DATABASE_URL=" in result.output and "%40" in result.output
    # Percent-encoded, the same password is taken (trust authentication ignores it).
    monkeypatch.setenv("BERTSTREAM_DATABASE_URL",
                       f"postgresql+psycopg://postgres:p%40SECRET18b@{host}")
    assert CliRunner().invoke(main, ["db", "current"]).exit_code == 0


def test_the_healthcheck_says_a_refused_setting_in_one_line() -> None:
    """``python -m worker.healthcheck`` under a setting the worker refuses: unhealthy (1, as
    a container health check reads it; 2 is reserved there), the reason in one line with
    the password masked, not a traceback in every health log entry."""
    env = {**os.environ, "BERTSTREAM_BROKER_URL": "redis://:SECRET18b@127.0.0.1:notaport/0"}
    proc = subprocess.run([sys.executable, "-m", "worker.healthcheck"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("unhealthy: BERTSTREAM_BROKER_URL="), proc.stderr
    assert "Traceback" not in proc.stderr and "SECRET18b" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("models", [1, 2], ids=["one-worker", "launcher"])
def test_a_ready_file_in_a_missing_directory_is_made(
        models: int, redis_url: str, sqlite_url: str, tiny_model_dir: Path, tmp_path: Path,
        launcher_factory: Callable[..., Launcher]) -> None:  # noqa: F811
    """``--ready-file /run/bertstream/ready`` on a host whose /run was emptied by a boot:
    the write failed in a signal handler (one traceback in the log), the worker consumed
    without it, and a health check waiting for the file never passed."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url, device="cpu",
                        torch_threads=1, queue=f"bst-18b-{uuid.uuid4().hex[:8]}",
                        cache_dir=str(tmp_path / "cache"))
    ready = tmp_path / "run" / "bertstream" / "ready"
    args = [arg for i in range(models) for arg in ("--model", f"m{i}={tiny_model_dir}")]
    launcher = launcher_factory(settings, *args, "--ready-file", str(ready))
    until(lambda: ready.is_file() or launcher.proc.poll() is not None, 120, "ready file")
    assert launcher.proc.poll() is None and ready.is_file(), launcher.log()


@pytest.mark.parametrize("models", [1, 2], ids=["one-worker", "launcher"])
def test_a_ready_file_that_cannot_be_made_is_refused_at_start(
        models: int, redis_url: str, sqlite_url: str, tiny_model_dir: Path, tmp_path: Path,
        launcher_factory: Callable[..., Launcher]) -> None:  # noqa: F811
    """A ready file whose directory cannot be made is a setting to fix: exit 2 naming
    ``--ready-file``, not a worker that runs for ever unready."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url, device="cpu",
                        torch_threads=1, queue=f"bst-18b-{uuid.uuid4().hex[:8]}",
                        cache_dir=str(tmp_path / "cache"))
    (tmp_path / "a-file").write_text("")
    args = [arg for i in range(models) for arg in ("--model", f"m{i}={tiny_model_dir}")]
    launcher = launcher_factory(settings, *args,
                                "--ready-file", str(tmp_path / "a-file" / "ready"))
    until(lambda: launcher.proc.poll() is not None, 120, "the worker's exit")
    assert launcher.proc.returncode == 2, launcher.log()
    assert "--ready-file" in launcher.log() and "a-file" in launcher.log()
