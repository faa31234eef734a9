"""Edges of the command line's options, each run as a user runs it (a subprocess).

A worker option out of range was refused under its variable's name
(``BERTSTREAM_MAX_WAIT_MS must be >= 1``), though the user typed ``--max-wait-ms``. A
``--database-url`` naming a file that is no SQLite database read as an outage to retry
(exit 3, a worker restarted for ever) and ``serve`` started on it. ``results --all
--limit 5`` printed every row and ``results --aggregate ... --limit 1`` every group, the
limit silently dropped.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from contract.settings import Settings
from tests.producer_helpers import broker_settings, lane_messages
from worker.process import free_port, settings_env

ROOT = Path(__file__).resolve().parents[1]


def bertstream(settings: Settings, *args: str, env: dict[str, str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``bertstream ARGS`` in a subprocess on ``settings`` (``env``: variables on top)."""
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", *args],
                          env={**settings_env(settings), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def error_line(out: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The last stderr line of a command that exited ``code`` without a traceback."""
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == code, (out.returncode, out.stderr)
    return out.stderr.strip().splitlines()[-1]


#: Worker options that override a setting: (the arguments, the error line they give).
WORKER_OPTIONS = [
    (["--max-wait-ms", "-5"], "error: --max-wait-ms must be >= 1 (got -5)"),
    (["--max-wait-ms=0"], "error: --max-wait-ms must be >= 1 (got 0)"),
    (["--token-budget", "0"], "error: --token-budget must be > 0 (got 0)"),
    (["--torch-threads", "-1"], "error: --torch-threads must be >= 0 and at most 1024 (got -1)"),
    (["--device", "gpu"], "error: --device: expected auto, cpu or cuda:N"),
    (["--max-wait-ms", "0", "--gpus", "0,1"], "error: --max-wait-ms must be >= 1 (got 0)"),
    (["--metrics-port", "65535", "--gpus", "0,1"],
     "error: --metrics-port=65535: 2 workers serve metrics on consecutive ports from it, "
     "past 65535"),
]


@pytest.mark.parametrize(("args", "says"), WORKER_OPTIONS)
def test_a_worker_option_out_of_range_is_named_as_the_option(
        redis_url: str, sqlite_url: str, args: list[str], says: str) -> None:
    out = bertstream(broker_settings(redis_url, sqlite_url), "worker", *args)
    assert error_line(out) == says


def test_the_same_value_from_the_environment_names_the_variable(
        redis_url: str, sqlite_url: str) -> None:
    out = bertstream(broker_settings(redis_url, sqlite_url), "worker",
                     env={"BERTSTREAM_MAX_WAIT_MS": "-5"})
    assert error_line(out) == "error: BERTSTREAM_MAX_WAIT_MS must be >= 1 (got -5)"


def test_only_the_setting_given_as_an_option_is_renamed(redis_url: str, sqlite_url: str) -> None:
    """A bad variable next to a good option: the variable is the one to fix."""
    out = bertstream(broker_settings(redis_url, sqlite_url), "worker", "--max-wait-ms", "50",
                     env={"BERTSTREAM_TOKEN_BUDGET": "0"})
    assert error_line(out) == "error: BERTSTREAM_TOKEN_BUDGET must be > 0 (got 0)"


@pytest.fixture
def not_a_database(tmp_path: Path) -> Path:
    """A file that exists but holds no SQLite database."""
    path = tmp_path / "notes.db"
    path.write_text("these are notes, not an SQLite database\n" * 10, encoding="utf-8")
    return path


def test_results_on_a_file_that_is_no_database_is_a_setting_to_fix(
        redis_url: str, sqlite_url: str, not_a_database: Path) -> None:
    out = bertstream(broker_settings(redis_url, sqlite_url), "results",
                     "--database-url", f"sqlite:///{not_a_database}")
    line = error_line(out)
    assert f"{not_a_database} is not an SQLite database" in line, line
    assert "--database-url" in line and "BERTSTREAM_DATABASE_URL" not in line, line
    assert not_a_database.read_text(encoding="utf-8").startswith("these are notes")


def test_the_same_file_from_the_environment_names_the_variable(
        redis_url: str, not_a_database: Path) -> None:
    out = bertstream(broker_settings(redis_url, f"sqlite:///{not_a_database}"), "results")
    line = error_line(out)
    assert f"{not_a_database} is not an SQLite database" in line, line
    assert "BERTSTREAM_DATABASE_URL" in line, line


def test_a_worker_on_a_file_that_is_no_database_exits_2_at_start(
        redis_url: str, not_a_database: Path, tmp_path: Path) -> None:
    """Not 3, which a supervisor takes for an outage and restarts the worker on for ever."""
    settings = broker_settings(redis_url, f"sqlite:///{not_a_database}",
                               cache_dir=str(tmp_path / "cache"))
    line = error_line(bertstream(settings, "worker"))
    assert f"{not_a_database} is not an SQLite database" in line, line


def test_serve_on_a_file_that_is_no_database_exits_2(
        redis_url: str, not_a_database: Path) -> None:
    """As for a database that refuses the API's role: no wait mends it. The URL given
    as an option is named so."""
    settings = broker_settings(redis_url, "sqlite:///unused.db")
    try:
        out = bertstream(settings, "serve", "--port", str(free_port()),
                         "--database-url", f"sqlite:///{not_a_database}", timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"serve started on a file that is no database: {exc.stderr!r}")
    line = error_line(out)
    assert f"{not_a_database} is not an SQLite database" in line, line
    assert "--database-url" in line and "BERTSTREAM_DATABASE_URL" not in line, line


@pytest.mark.parametrize("args", [["--all", "--limit", "5"], ["--limit=5", "--all"]])
def test_results_all_with_a_limit_is_refused(
        redis_url: str, sqlite_url: str, args: list[str]) -> None:
    out = bertstream(broker_settings(redis_url, sqlite_url), "results", *args)
    line = error_line(out)
    assert "--all" in line and "--limit" in line, line


def test_results_aggregate_with_a_limit_is_refused(redis_url: str, sqlite_url: str) -> None:
    out = bertstream(broker_settings(redis_url, sqlite_url), "results", "--aggregate", "label",
                     "--limit", "1")
    line = error_line(out)
    assert "--aggregate" in line and "--limit" in line, line


@pytest.mark.parametrize("args", [["--all"], ["--limit", "100"], ["--aggregate", "label"],
                                  ["--aggregate", "label", "--all"]])
def test_results_without_a_contradiction_still_runs(
        redis_url: str, sqlite_url: str, args: list[str]) -> None:
    """--limit at its default value, given or not, and --all alone are fine."""
    out = bertstream(broker_settings(redis_url, sqlite_url), "results", *args)
    assert out.returncode == 0, out.stderr


def test_submit_with_two_ids_is_refused_and_sends_nothing(redis_url: str,
                                                          sqlite_url: str) -> None:
    """``submit x --id a --id b`` sent the text under ``b`` (click keeps the last of a
    repeated option): the idempotency key was a guess. Refused, nothing queued; one
    ``--id`` still goes."""
    settings = broker_settings(redis_url, sqlite_url)
    line = error_line(bertstream(settings, "submit", "fine text", "--id", "a", "--id", "b"))
    assert "--id given 2 times" in line, line
    assert lane_messages(redis_url, f"{settings.queue}.interactive") == []
    out = bertstream(settings, "submit", "fine text", "--id", "a")
    assert out.returncode == 0 and out.stdout.split() == ["a"], (out.stdout, out.stderr)
    [message] = lane_messages(redis_url, f"{settings.queue}.interactive")
    assert [item["id"] for item in message["items"]] == ["a"]
