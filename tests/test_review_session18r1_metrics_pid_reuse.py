"""``serve``'s start removes a previous run's counts whose pid another process now has.

It keeps the ``*.db`` files of running processes, judging by the pid in the file's name
alone; once that run's server process had ended, the kernel gives its pid to any new
process (in a container restarted with the directory on a volume, to the same few pids).
The previous run's counts were then kept and added to every total of the new run. A
process that started after the file was last written did not write it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract.constants import MULTIPROC_ENV

#: The API's request counter, written as a server process writes it, 15 times.
WRITER = ("from prometheus_client import Counter\n"
          "c = Counter('bertstream_api_requests', 'x', ['route', 'status'])\n"
          "c.labels('/healthz', '200').inc(15)\n")


def test_a_previous_runs_counts_whose_pid_was_reused_are_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from api.metrics import multiprocess_dir, writer_pid

    shared = tmp_path / "counts"
    shared.mkdir()
    subprocess.run([sys.executable, "-c", WRITER], env={**os.environ, MULTIPROC_ENV: str(shared)},
                   check=True)
    [written] = shared.glob("counter_*.db")
    # That run ended an hour ago; its pid now belongs to another program.
    an_hour_ago = time.time() - 3600
    os.utime(written, (an_hour_ago, an_hour_ago))
    other = subprocess.Popen(["sleep", "60"])
    try:
        reused = written.rename(shared / f"counter_{other.pid}.db")
        assert writer_pid(reused) == other.pid
        monkeypatch.setenv(MULTIPROC_ENV, str(shared))
        with multiprocess_dir(2):
            assert not reused.exists(), "a previous run's counts were kept"
        # A file the running process may have written (newer than its start) is kept.
        fresh = shared / f"counter_{other.pid}.db"
        fresh.write_bytes(b"")
        with multiprocess_dir(2):
            assert fresh.exists()
    finally:
        other.kill()
        other.wait()
