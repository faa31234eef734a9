"""The services one run uses, and their cleanup: a Redis DB, a results DB, worker processes.

Everything the benchmark starts is stopped on the way out, on success, on an
exception and on Ctrl-C (the caller holds them in an ``ExitStack``).
Completion is always observed by polling the results table, never assumed
after a sleep.
"""

from __future__ import annotations

import time
from typing import Any

import redis
import sqlalchemy as sa

from bench.figures import metrics_totals
from contract.results import ResultStore, results, windows
from worker.process import WorkerProc, free_port

__all__ = ["BENCH_REDIS_DB", "ResultsProbe", "WorkerGroup", "WorkerProc", "bench_broker_url",
           "flush_redis", "free_port"]

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
                 interval: float = 0.25, alive: Any = None) -> float:
        """Poll until ``expected`` rows of ``prefix`` exist; give the monotonic time seen.

        ``alive`` (a callable) is checked on every poll so a crashed worker
        fails the stage at once instead of after ``timeout``. The interval is
        coarse on purpose: polling every 20 ms took enough CPU from a 2-core
        machine to slow the worker's 2-thread inference by 5-8% (measured).
        Stage times come from the rows' own timestamps, not from this poll.
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

    def last_finished(self, prefix: str) -> float:
        """UNIX time of the last row of ``prefix`` written (its ``finished_at``)."""
        ends = [r["finished_at"] for r in self.rows(prefix) if r["finished_at"] is not None]
        if not ends:
            raise RuntimeError(f"no finished rows of {prefix!r}")
        return max(ends)

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
            conn.execute(windows.delete().where(windows.c.id.like(prefix + "%")))
            conn.execute(results.delete().where(results.c.id.like(prefix + "%")))


class WorkerGroup:
    """Several worker processes on one queue and device, watched and stopped together.

    The same calls as one :class:`WorkerProc` where the stages need them:
    ``check_alive``, ``totals`` (the flush figures of every member's metrics, summed)
    and ``stop``.
    """

    def __init__(self, members: list[WorkerProc]) -> None:
        self.members = members

    def check_alive(self) -> None:
        """Raise RuntimeError when any member has exited."""
        for member in self.members:
            member.check_alive()

    def totals(self) -> dict[str, float]:
        """The members' cumulative flush figures (from their Prometheus metrics), summed."""
        out: dict[str, float] = {}
        for member in self.members:
            for key, value in metrics_totals(member.metrics_text()).items():
                out[key] = out.get(key, 0.0) + value
        return out

    def stop(self) -> None:
        """Stop every member (warm shutdown, SIGKILL after a timeout)."""
        for member in self.members:
            member.stop()


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
