"""The services one run uses, and their cleanup: a Redis DB, a results DB, worker processes.

Everything the benchmark starts is stopped on the way out, on success, on an
exception and on Ctrl-C (the caller holds them in an ``ExitStack``).
Completion is always observed by polling the results table, never assumed
after a sleep.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

from contract.broker import make_celery
from contract.constants import ENV_PREFIX
from contract.results import ResultStore, results
from contract.settings import Settings

#: The Redis database the benchmark uses and flushes (apart from 0 and the tests' 9).
BENCH_REDIS_DB = 8


def bench_broker_url(broker_url: str) -> str:
    """``broker_url`` pointed at :data:`BENCH_REDIS_DB`."""
    scheme, sep, rest = broker_url.partition("://")
    if not sep or not scheme.startswith("redis"):
        raise ValueError(f"the benchmark needs a redis:// broker, got {broker_url!r}")
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}/{BENCH_REDIS_DB}"


class ResultsProbe:
    """Counts and reads the rows of one id prefix in the results table."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store

    def count(self, prefix: str) -> int:
        """Rows whose id starts with ``prefix``."""
        query = sa.select(sa.func.count()).select_from(results).where(
            results.c.id.like(prefix + "%"))
        with self.store.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def wait_for(self, prefix: str, expected: int, *, timeout: float,
                 interval: float = 0.02, alive: Any = None) -> float:
        """Poll until ``expected`` rows of ``prefix`` exist; give the monotonic time seen.

        ``alive`` (a callable) is checked on every poll so a crashed worker
        fails the stage at once instead of after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            n = self.count(prefix)
            now = time.monotonic()
            if n >= expected:
                return now
            if alive is not None:
                alive()
            if now > deadline:
                raise TimeoutError(f"{n}/{expected} rows of {prefix!r} after {timeout:.0f}s")
            time.sleep(interval)  # a poll interval, not a measurement

    def rows(self, prefix: str) -> list[dict[str, Any]]:
        """Timing columns of the rows of ``prefix`` (datetimes as UNIX seconds)."""
        cols = [results.c.id, results.c.status, results.c.tokens, results.c.batch_size,
                results.c.submitted_at, results.c.started_at, results.c.finished_at]
        query = sa.select(*cols).where(results.c.id.like(prefix + "%"))
        out = []
        with self.store.engine.connect() as conn:
            for row in conn.execute(query).mappings():
                rec = dict(row)
                for key in ("submitted_at", "started_at", "finished_at"):
                    rec[key] = _seconds(rec[key])
                out.append(rec)
        return out

    def delete(self, prefix: str) -> None:
        """Remove the rows of ``prefix`` (the benchmark's own, on a shared database)."""
        with self.store.engine.begin() as conn:
            conn.execute(results.delete().where(results.c.id.like(prefix + "%")))


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite gives naive UTC datetimes back
        import datetime as dt

        value = value.replace(tzinfo=dt.timezone.utc)
    return float(value.timestamp())


def flush_redis(url: str) -> None:
    """Empty the benchmark's Redis database (fails loudly when Redis is down)."""
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


class WorkerProc:
    """A worker subprocess (``python -m <module>``) configured by ``settings``.

    ``module`` is ``worker`` for bertstream or the naive peer's module.
    Output goes to ``log_path``. :meth:`stop` is idempotent.
    """

    def __init__(self, settings: Settings, module: str, log_path: Path,
                 args: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.hostname = f"bench-{uuid.uuid4().hex[:6]}@localhost"
        self.log_path = log_path
        env = dict(os.environ)
        for key, value in dataclasses.asdict(settings).items():
            env[ENV_PREFIX + key.upper()] = str(value)
        env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--hostname", self.hostname, *args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def check_alive(self) -> None:
        """Raise when the process has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")

    def wait_ready(self, timeout: float = 180.0) -> WorkerProc:
        """Block until the worker answers a control ping (model loaded, consuming)."""
        app = make_celery(self.settings)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.check_alive()
                if app.control.ping(destination=[self.hostname], timeout=0.5):
                    return self
            raise TimeoutError(f"worker not ready after {timeout:.0f}s:\n{self.tail()}")
        finally:
            app.close()

    def log_size(self) -> int:
        """Bytes of output so far (mark a stage's start for :meth:`log_since`)."""
        self._log.flush()
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        """The worker's output after byte ``offset``."""
        self._log.flush()
        with open(self.log_path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")

    def tail(self) -> str:
        """The last lines of the worker's output."""
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (warm shutdown), SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> WorkerProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
