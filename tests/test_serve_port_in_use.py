"""``bertstream serve`` on a port another process listens on: one line naming it, exit 2.

It announced ``bertstream API on http://...``, then uvicorn's ``[Errno 98]``, and
exited 3, the code of an unreachable Redis or database. A real socket holds the
port; the server runs as a real process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.settings import Settings
from worker.process import ServeProc, settings_env


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port with a listening socket on it (as another server would hold it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def _serve(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from producer.cli import main; main()", "serve", *args],
        env=settings_env(settings), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_named_in_one_line_and_exits_2(
        held_port: int, redis_url: str, sqlite_url: str, workers: str) -> None:
    settings = Settings(broker_url=redis_url, database_url=sqlite_url)
    done = _serve(settings, "--port", str(held_port), "--workers", workers)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.strip().splitlines() == [
        f"error: cannot serve on 127.0.0.1:{held_port}: the port is in use (another process "
        f"listens on it); stop that process or pick another --port"], done.stderr
    assert "API" not in done.stderr and done.stdout == ""


def test_the_start_line_is_not_a_claim_that_it_listens(redis_url: str, sqlite_url: str,
                                                       tmp_path: Path) -> None:
    """The line comes before uvicorn listens; uvicorn's own line says when it does."""
    server = ServeProc(Settings(broker_url=redis_url, database_url=sqlite_url),
                       tmp_path / "serve.log")
    try:
        server.wait_ready()
        log = server.log()
    finally:
        server.stop()
    assert f"bertstream API starting on http://127.0.0.1:{server.port} (docs: /docs; " in log
    assert log.index("bertstream API starting") < log.index("Uvicorn running on")
