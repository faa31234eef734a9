"""A worker stopped by SIGTERM before Celery has its own handlers, as an operator reads it.

The model load already logged such a SIGTERM (test_operator_worker_startup.py); the
import of torch (seconds, as the worker command starts) and the wait for Redis (up to
``BERTSTREAM_BROKER_START_WAIT_S``, a minute by default) did not: the process died by
the signal without a word, and the logs of a restart loop said nothing of why. Each now
logs one line first, and the worker still dies by the signal (143 in a shell).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from contract.settings import Settings
from tests.tcpproxy import SilentListener
from tests.test_cli_interrupt_startup import signal_while_importing
from worker.process import free_port, settings_env

ROOT = Path(__file__).resolve().parents[1]


def _line(doing: str) -> str:
    return f"stopped by SIGTERM while {doing}; nothing was taken from the queue"


def _stopped_when(settings: Settings, tmp_path: Path, ready: Callable[[str], bool],
                  doing: str) -> None:
    """A worker started with ``settings``, sent SIGTERM once ``ready`` (given its output
    so far) holds: it logs one line saying it stopped while ``doing``, dies by the signal
    as before (143 in a shell) and prints no traceback."""
    out_path = tmp_path / "worker.log"
    with open(out_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "worker", "--device", "cpu"],
                                env=settings_env(settings), stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not ready(out_path.read_text()):
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
    assert code == -signal.SIGTERM, text
    assert text.count(_line(doing)) == 1, text
    assert "Traceback" not in text, text


def test_sigterm_while_waiting_for_redis_is_logged(sqlite_url: str, tmp_path: Path) -> None:
    """A worker whose Redis is not up yet (a port nobody listens on), stopped while it
    waits: one line, then death by the signal, and no traceback."""
    settings = Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0",
                        database_url=sqlite_url, model="null", broker_start_wait_s=120,
                        queue=f"bst-quiet-{uuid.uuid4().hex[:8]}",
                        cache_dir=str(tmp_path / "cache"))
    _stopped_when(settings, tmp_path, lambda out: "cannot reach Redis" in out,
                  "waiting for Redis")


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


class InfoStall:
    """A TCP proxy to a Redis that forwards every command but ``INFO``, which it holds
    unanswered: a Redis gone silent between the worker's probe and its read of the
    eviction policy (paused, busy), which the worker then waits for up to its socket
    timeout. ``seen_info`` is set once an ``INFO`` arrived."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.seen_info = threading.Event()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
                upstream = socket.create_connection(self._target)
            except OSError:
                return
            self._held += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False),
                             daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        try:
            while data := src.recv(65536):
                if watch and b"\r\nINFO\r\n" in data.upper():
                    self.seen_info.set()
                    return  # held: never forwarded, so never answered
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._sock.close()
        for sock in self._held:
            sock.close()


def test_sigterm_while_redis_is_silent_to_the_eviction_check_is_logged(
        redis_url: str, sqlite_url: str, tmp_path: Path) -> None:
    """Redis answered the wait's probe, then went silent as the worker reads its eviction
    policy (``INFO memory``, up to ``BERTSTREAM_REDIS_SOCKET_TIMEOUT_S``): the worker is
    still waiting for Redis at start, and a SIGTERM then is logged the same way (it died
    without a word)."""
    target = urlsplit(redis_url)
    proxy = InfoStall(target.hostname or "127.0.0.1", target.port or 6379)
    settings = Settings(broker_url=f"redis://127.0.0.1:{proxy.port}{target.path}",
                        database_url=sqlite_url, model="null", redis_socket_timeout_s=300,
                        queue=f"bst-quiet-{uuid.uuid4().hex[:8]}",
                        cache_dir=str(tmp_path / "cache"))
    try:
        _stopped_when(settings, tmp_path, lambda _: proxy.seen_info.is_set(),
                      "waiting for Redis")
    finally:
        proxy.close()


def test_sigterm_while_the_database_does_not_answer_is_logged(redis_url: str,
                                                             tmp_path: Path) -> None:
    """Between the torch import and the model load the worker checks the schema; a
    database that takes the connection and never answers holds it there until the
    connect timeout, and a SIGTERM then ended it without a word."""
    silent = SilentListener()
    settings = Settings(broker_url=redis_url, model="null", db_connect_timeout_s=120,
                        database_url=f"postgresql+psycopg://u@127.0.0.1:{silent.port}/db",
                        queue=f"bst-quiet-{uuid.uuid4().hex[:8]}",
                        cache_dir=str(tmp_path / "cache"))
    try:
        # Connected: the worker waits for the database's answer.
        _stopped_when(settings, tmp_path, lambda _: bool(silent._held),
                      "checking the database")
    finally:
        silent.close()
