"""A ``BERTSTREAM_*`` variable that is no setting (a typo, or a name from another tool such
as ``BERTSTREAM_REDIS_URL`` for ``BERTSTREAM_BROKER_URL``) was ignored without a word: the
command then talked to the default Redis (database 0 on localhost), another team's queue.
It is named once per process, with the setting it most likely meant; the names the
deployment files and the tests read for themselves pass."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from contract import settings as settings_module
from contract.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh() -> None:
    settings_module._named_unknown.clear()


def test_an_unknown_variable_is_named_with_the_setting_it_meant(
        caplog: pytest.LogCaptureFixture) -> None:
    env = {"BERTSTREAM_REDIS_URL": "redis://10.0.0.9:6379/4", "BERTSTREAM_MAX_BATCH": "64"}
    with caplog.at_level(logging.WARNING, logger="contract.settings"):
        Settings.from_env(env)
        Settings.from_env(env)  # once per process, not per call
    said = sorted(r.getMessage() for r in caplog.records)
    assert said == [
        "BERTSTREAM_MAX_BATCH is no bertstream setting and is ignored "
        "(did you mean BERTSTREAM_MAX_BATCH_SIZE?)",
        "BERTSTREAM_REDIS_URL is no bertstream setting and is ignored "
        "(did you mean BERTSTREAM_BROKER_URL?)",
    ]


@pytest.mark.parametrize("name", ["BERTSTREAM_IMAGE", "BERTSTREAM_GPU_IMAGE", "BERTSTREAM_GPUS",
                                  "BERTSTREAM_PROCS_PER_GPU", "BERTSTREAM_API_WORKERS",
                                  "BERTSTREAM_TEST_REDIS_URL", "BERTSTREAM_TEST_PG_URL",
                                  "BERTSTREAM_BROKER_URL"])
def test_settings_and_the_deployment_variables_pass(
        caplog: pytest.LogCaptureFixture, name: str) -> None:
    with caplog.at_level(logging.WARNING, logger="contract.settings"):
        Settings.from_env({name: "redis://127.0.0.1:6379/3"})
    assert caplog.records == []


def test_a_name_nothing_reads_is_named(caplog: pytest.LogCaptureFixture) -> None:
    """``BERTSTREAM_NAME`` (meaning ``BERTSTREAM_MODEL_NAME``) passed without a word, as
    if a deployment file read it: nothing does."""
    with caplog.at_level(logging.WARNING, logger="contract.settings"):
        Settings.from_env({"BERTSTREAM_NAME": "sentiment-v2"})
    assert [r.getMessage() for r in caplog.records] == [
        "BERTSTREAM_NAME is no bertstream setting and is ignored "
        "(did you mean BERTSTREAM_MODEL_NAME?)"]


def test_a_name_like_no_setting_says_so_without_a_guess(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="contract.settings"):
        Settings.from_env({"BERTSTREAM_ZZZ": "1"})
    assert [r.getMessage() for r in caplog.records] == [
        "BERTSTREAM_ZZZ is no bertstream setting and is ignored"]


def test_the_command_line_prints_it_on_stderr(tmp_path: Path) -> None:
    """No logging is set up by the producer commands: the line still reaches stderr."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "BERTSTREAM_DATABASE_URL": f"sqlite:///{tmp_path}/r.db",
           "BERTSTREAM_REDIS_URL": "redis://127.0.0.1:6379/4"}
    out = subprocess.run([sys.executable, "-c", "from producer.cli import main; main()",
                          "results", "--limit", "1"], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        "BERTSTREAM_REDIS_URL is no bertstream setting and is ignored "
        "(did you mean BERTSTREAM_BROKER_URL?)"]
