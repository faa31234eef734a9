"""A worker stopped by SIGTERM before Celery has its own handlers, as an operator reads it.

The model load already logged such a SIGTERM (test_operator_worker_startup.py); the
import of torch (seconds, as the worker command starts) and the wait for Redis (up to
``BERTSTREAM_BROKER_START_WAIT_S``, a minute by default) did not: the process died by
the signal without a word, and the logs of a restart loop said nothing of why. Each now
logs one line first, and the worker still dies by the signal (143 in a shell).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from contract.settings import Settings
from tests.test_cli_interrupt_startup import signal_while_importing
from worker.process import free_port, settings_env

ROOT = Path(__file__).resolve().parents[1]


def _line(doing: str) -> str:
    return f"stopped by SIGTERM while {doing}; nothing was taken from the queue"


def test_sigterm_while_waiting_for_redis_is_logged(sqlite_url: str, tmp_path: Path) -> None:
    """A worker whose Redis is not up yet (a port nobody listens on), stopped while it
    waits: one line, then death by the signal, and no traceback."""
    settings = Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0",
                        database_url=sqlite_url, model="null", broker_start_wait_s=120,
                        queue=f"bst-quiet-{uuid.uuid4().hex[:8]}",
                        cache_dir=str(tmp_path / "cache"))
    out_path = tmp_path / "worker.log"
    with open(out_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "worker", "--device", "cpu"],
                                env=settings_env(settings), stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while "cannot reach Redis" not in out_path.read_text():
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out_path.read_text()
    assert code == -signal.SIGTERM, text  # as before: killed by the signal
    assert text.count(_line("waiting for Redis")) == 1, text
    assert "Traceback" not in text, text


def test_sigterm_while_torch_is_imported_is_logged(redis_url: str, sqlite_url: str,
                                                   tmp_path: Path) -> None:
    """The worker command imports torch (the worker's app module) as it starts; a SIGTERM
    held to land inside that import is logged the same way."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url, model="null",
                        queue=f"bst-quiet-{uuid.uuid4().hex[:8]}",
                        cache_dir=str(tmp_path / "cache"))
    done = signal_while_importing(
        [sys.executable, "-m", "worker", "--device", "cpu"], settings_env(settings),
        "torch.nn", tmp_path, signal.SIGTERM, cwd=ROOT, merged=True)
    out = done.stdout
    assert done.returncode == -signal.SIGTERM, out
    assert out.count(_line("importing torch")) == 1, out
    assert "Traceback" not in out, out
