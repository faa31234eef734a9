"""A worker in a child process: start, wait until it answers, stop or kill -9.

One implementation for everything that runs ``python -m worker`` (or another
worker module) as a subprocess: the demo, the benchmark and the tests. The
child gets its settings through ``BERTSTREAM_*`` variables, exactly as an
operator's worker would. And :func:`close_store`, how a stopping worker (and
the demo, after its workers) leaves an SQLite database whole in its file, and
:func:`prepare_ready_file`, the ``--ready-file`` check that a single worker and the
launcher both make at start.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from contract.broker import make_celery
from contract.constants import ENV_PREFIX
from contract.errors import ConfigError
from contract.settings import Settings

if TYPE_CHECKING:
    from contract.results import ResultStore

log = logging.getLogger(__name__)

#: How long closing an SQLite store waits for a busy database before it gives up folding
#: the write-ahead log in (a shutdown must not hang on a reader's long transaction).
CHECKPOINT_BUSY_MS = 2_000


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn``: the child gets ``sig`` when this process dies (Linux; elsewhere None).

    A test run or benchmark that is itself killed would otherwise leave its
    workers running: they keep consuming the queues and hold database
    connections (and locks) that the next run's fixtures wait on. The kernel
    sends the signal when the forking *thread* ends, so a child started from
    any other thread than the main one (a timer restarting a server, say)
    gets none (None: it would die with that thread).
    """
    parent = os.getpid()
    if threading.current_thread() is not threading.main_thread() \
            or not sys.platform.startswith("linux"):
        return None
    import ctypes

    # Looked up here, before the fork: the child only calls it (no dlopen after fork).
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def preexec() -> None:
        if prctl(pr_set_pdeathsig, sig, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def close_store(store: ResultStore) -> None:
    """Close ``store``; on SQLite, first fold the write-ahead log into the database file.

    A worker stopped while another process (the API, a reader) holds the database open
    leaves its rows in ``<db>-wal``: readers see them, but a copy of the database file
    alone (a backup, the file handed on) holds none. A busy database is no reason to fail
    a shutdown: the rows then stay in the log for a later checkpoint.
    """
    if store.engine.dialect.name == "sqlite":
        import sqlalchemy as sa

        try:
            with store.engine.connect() as conn:
                conn.exec_driver_sql(f"PRAGMA busy_timeout = {CHECKPOINT_BUSY_MS}")
                # (busy, frames in the log, frames copied into the database file)
                done = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").first()
            if done is not None and done[2] < done[1]:
                log.warning("the database is busy: %d of %d pages stay in its write-ahead "
                            "log until a later checkpoint", done[1] - done[2], done[1])
        except sa.exc.SQLAlchemyError as exc:
            log.warning("cannot fold the write-ahead log into the database file: %s", exc)
    store.close()  # the last connection closed: SQLite removes the -wal and -shm files


def prepare_ready_file(path: str) -> None:
    """Create the directories ``--ready-file`` ``path`` lies in, or raise
    :class:`ConfigError` naming it when they cannot be made or written.

    The file is written once the worker consumes; in a missing directory (``/run`` is
    emptied at every boot) that write failed in a signal handler, logged once, and the
    worker ran on with no ready file: a health check waiting for it never passed.
    """
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--ready-file {path}: cannot create its directory {folder}: "
                          f"{exc.strerror or exc}") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--ready-file {path}: cannot write in {folder} (permission denied)")


def settings_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) plus ``settings`` as BERTSTREAM_* vars."""
    env = dict(os.environ if base is None else base)
    for key, value in dataclasses.asdict(settings).items():
        env[ENV_PREFIX + key.upper()] = str(value)
    return env


class WorkerProc:
    """A ``python -m <module>`` child configured by ``settings``; output to ``log_path``.

    ``module`` is ``worker`` for bertstream (or the benchmark's naive peer).
    A bertstream worker reports readiness through a ready file (its remote
    control is off by default); other modules are pinged.
    :meth:`stop` and :meth:`kill` are idempotent; the object is a context manager.
    """

    def __init__(self, settings: Settings, log_path: Path, *, module: str = "worker",
                 args: tuple[str, ...] = (), name: str = "worker", truncate_log: bool = False,
                 ) -> None:
        self.settings = settings
        self.hostname = f"{name}-{uuid.uuid4().hex[:6]}@localhost"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.ready_path: Path | None = None
        if module == "worker":
            self.ready_path = self.log_path.with_name(f"{self.log_path.name}.{self.hostname}.ready")
            self.ready_path.unlink(missing_ok=True)
            args = (*args, "--ready-file", str(self.ready_path))
        env = settings_env(settings)
        env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
        # One tokenizer thread unless the caller chose (a GPU host has cores to spare).
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._log = open(self.log_path, "wb" if truncate_log else "ab")  # noqa: SIM115 - stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--hostname", self.hostname, *args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent(),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        """Raise RuntimeError (with the log's tail) when the process has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with code {self.proc.returncode}:\n{self.tail()}")

    def wait_ready(self, timeout: float = 180.0) -> WorkerProc:
        """Block until the worker is consuming (model loaded, database reached)."""
        deadline = time.monotonic() + timeout
        if self.ready_path is not None:
            while time.monotonic() < deadline:
                self.check_alive()
                if self.ready_path.exists():
                    return self
                time.sleep(0.05)  # polling a condition, not waiting for time to pass
            raise TimeoutError(f"worker not ready after {timeout:.0f}s:\n{self.tail()}")
        app = make_celery(self.settings)
        try:
            while time.monotonic() < deadline:
                self.check_alive()
                if app.control.ping(destination=[self.hostname], timeout=0.5):
                    return self
            raise TimeoutError(f"worker not ready after {timeout:.0f}s:\n{self.tail()}")
        finally:
            app.close()

    def metrics_text(self, timeout: float = 10.0) -> str:
        """The worker's Prometheus metrics (it must run with ``metrics_port`` set)."""
        import urllib.request

        if not self.settings.metrics_port:
            raise RuntimeError("this worker serves no metrics (metrics_port is 0)")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(  # noqa: S104 - a wildcard's loopback
            self.settings.metrics_host, self.settings.metrics_host)
        host = f"[{host}]" if ":" in host else host
        url = f"http://{host}:{self.settings.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - its own
            return str(response.read().decode("utf-8"))

    def log_size(self) -> int:
        """Bytes of output so far (mark a stage's start for :meth:`log_since`)."""
        self._flush()
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        """The worker's output after byte ``offset``."""
        self._flush()
        with open(self.log_path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")

    def tail(self, chars: int = 6000) -> str:
        """The last ``chars`` characters of the worker's output."""
        self._flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    def _flush(self) -> None:
        if not self._log.closed:
            self._log.flush()

    def kill(self) -> None:
        """SIGKILL: the worker gets no chance to ack or clean up."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._close()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (warm shutdown), SIGKILL after ``timeout``; give the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._close()
        return int(self.proc.returncode)

    def _close(self) -> None:
        # The ready file is named after this object's random node name, so no later
        # worker reuses it: left behind, each run (the demo's, in the cache dir) added one.
        if self.ready_path is not None:
            self.ready_path.unlink(missing_ok=True)
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> WorkerProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProc:
    """``bertstream serve`` in a child process on a free loopback port, output to ``log_path``.

    For the benchmark's HTTP stage and the API tests; ``args`` are extra
    ``serve`` options. :meth:`stop` is idempotent.
    """

    def __init__(self, settings: Settings, log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from producer.cli import main; main()", "serve",
             "--port", str(self.port), *args],
            env=settings_env(settings), stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent())

    def wait_ready(self, timeout: float = 60.0) -> ServeProc:
        """Block until ``/healthz`` answers 200."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)  # a poll interval while the server starts
        raise TimeoutError(f"serve not up after {timeout:.0f}s: {self.log()}")

    def log(self) -> str:
        """The end of the server's output so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; give the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if not self._log.closed:
            self._log.close()
        return int(self.proc.returncode)
