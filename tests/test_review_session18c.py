"""Review of PROMETHEUS_MULTIPROC_DIR shared between ``serve`` and a worker (one environment
for both, as a compose file or a systemd drop-in gives): a real worker and a real
``bertstream serve`` over the test Redis and SQLite."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contract.constants import MULTIPROC_ENV
from contract.settings import Settings
from worker.process import free_port

#: A process writing a counter, a histogram and a gauge to PROMETHEUS_MULTIPROC_DIR as
#: prometheus_client names them, which says ``written`` and then waits for its stdin.
WRITER = ("from prometheus_client import Counter, Gauge, Histogram\n"
          "Counter('other_total', 'x').inc()\nHistogram('other_seconds', 'x').observe(1)\n"
          "Gauge('other_up', 'x').set(1)\nprint('written', flush=True)\n"
          "import sys\nsys.stdin.read()\n")


@pytest.fixture
def live_writer(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A running process that keeps its counts in a directory of its own (``counts``)."""
    shared = tmp_path / "counts"
    shared.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", WRITER], env={MULTIPROC_ENV: str(shared)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "written\n"
        yield proc, shared
    finally:
        proc.communicate(timeout=30)


def test_prometheus_client_names_its_files_by_the_writing_process(
        live_writer: tuple[subprocess.Popen[str], Path]) -> None:
    """The guard on prometheus_client's naming (``<type>_<pid>.db``, not a documented
    interface) that ``serve`` relies on to tell a running process's files from a
    finished one's: every file the writer made is read as the writer's."""
    from api.metrics import writer_pid

    proc, shared = live_writer
    files = sorted(shared.glob("*.db"))
    assert len(files) == 3, files
    assert {writer_pid(f) for f in files} == {proc.pid}
    assert writer_pid(shared / "notes.db") is None
    assert writer_pid(shared / "counter_0.db") is None


def test_serve_start_keeps_the_files_of_running_processes(
        bsettings: Settings, live_writer: tuple[subprocess.Popen[str], Path],
        api_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve --workers 2`` on a PROMETHEUS_MULTIPROC_DIR it shares with a running
    process (a worker of an earlier version, given the same environment) removed that
    process's live files at start; it removes only those of processes that have ended,
    a previous run's, whose counts would be added to its own."""
    proc, shared = live_writer
    ended = subprocess.run([sys.executable, "-c", WRITER], env={MULTIPROC_ENV: str(shared)},
                           input="", capture_output=True, text=True, timeout=60)
    assert ended.returncode == 0, ended.stderr
    live = {f.name for f in shared.glob(f"*_{proc.pid}.db")}
    stale = {f.name for f in shared.glob("*.db")} - live
    assert len(live) == 3 and len(stale) == 3
    monkeypatch.setenv(MULTIPROC_ENV, str(shared))
    api = api_factory(bsettings, "--workers", "2")
    left = {f.name for f in shared.glob("*.db")}
    assert live <= left, api.log()
    assert not stale & left
    assert f"(pids {proc.pid})" in api.log()


def test_a_worker_ignores_a_multiprocess_dir_meant_for_serve(
        bsettings: Settings, tiny_model_dir: Path, tmp_path: Path, worker_factory: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker with ``--metrics-port`` given PROMETHEUS_MULTIPROC_DIR (serve's, for
    ``--workers N``) naming a directory that does not exist failed at start with a
    traceback (prometheus_client opens its files there). A worker is one process per
    metrics port: it keeps its counts in memory, serves them, and says it ignored the
    variable."""
    missing = tmp_path / "no-such-dir"
    monkeypatch.setenv(MULTIPROC_ENV, str(missing))
    port = free_port()
    worker = worker_factory(bsettings.replace(model=str(tiny_model_dir), metrics_port=port))
    text = worker.metrics_text()
    assert "bertstream_worker_up 1.0" in text
    assert not missing.exists()
    assert f"{MULTIPROC_ENV}={missing} ignored" in worker.log()
    assert "Traceback" not in worker.log()
