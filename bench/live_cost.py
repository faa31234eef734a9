"""Time ``GET /v1/live`` (the dashboard's 5-second poll) against N rows finished in the last
half hour.

    python -m bench.live_cost --database-url sqlite:////tmp/live.db --rows 200000
    python -m bench.live_cost --database-url postgresql+psycopg://postgres@host/db

Writes ``--rows`` rows (ids ``livecost-*``) with :meth:`ResultStore.upsert`, in batches
of ``--batch``, oldest first, their ``finished_at`` spread evenly over the ``--minutes``
minutes up to the Redis server's now (the clock ``/v1/live`` ends its windows on), then
calls ``/v1/live`` through the real app (FastAPI's TestClient): the opening call (the
trend cache's whole read), the next one, then the median and max of ``--repeat`` calls
after that, ``--pause`` seconds apart. ``--uncached`` also times
:func:`api.dashboard.live` without a trend cache on the same rows (what every call cost
before the cache). Finally removes its rows (the table too when the script created it)
unless ``--keep``; ``--reuse`` times the rows a ``--keep`` run left.
Needs Redis on ``--redis-url`` (only its own queue's keys are read).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contract.results import ResultRecord, ResultStore, results, utc_from_timestamp  # noqa: E402
from contract.settings import Settings  # noqa: E402

PREFIX = "livecost-"


def fill(store: ResultStore, now: dt.datetime, rows: int, minutes: float, batch: int) -> float:
    """Upsert ``rows`` rows spread over the ``minutes`` up to ``now``; the seconds taken."""
    span = minutes * 60
    t0 = time.perf_counter()
    for start in range(0, rows, batch):
        records = []
        for i in range(start, min(start + batch, rows)):
            age = span * (rows - 1 - i) / max(rows - 1, 1)
            records.append(ResultRecord(
                id=f"{PREFIX}{i:08d}", text_sha256="a" * 64, text_chars=4, model="bench-model",
                status="done", label="positive" if i % 5 < 3 else "negative",
                score=0.5 + (i % 50) / 100, source=f"src-{i % 20}", text="fine",
                scores={"positive": 0.75}, finished_at=now - dt.timedelta(seconds=age)))
        store.upsert(records)
    return time.perf_counter() - t0


def timed(fn: Callable[[], Any], repeat: int, pause: float) -> tuple[float, float, float]:
    """Milliseconds of the first call, then the median and max of ``repeat`` more."""
    runs = []
    for n in range(repeat + 1):
        if n and pause:
            time.sleep(pause)
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1000)
    return runs[0], statistics.median(runs[1:]), max(runs[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/8")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="the rows' finished_at spread over this many minutes up to now")
    parser.add_argument("--batch", type=int, default=5000, help="rows per upsert")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between calls")
    parser.add_argument("--uncached", action="store_true",
                        help="also time live() without the trend cache")
    parser.add_argument("--keep", action="store_true", help="leave the rows in place")
    parser.add_argument("--reuse", action="store_true", help="time the rows already there")
    args = parser.parse_args()

    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.dashboard import live

    server = redis.Redis.from_url(args.redis_url)
    secs, micros = server.time()
    now = utc_from_timestamp(secs + micros / 1e6)
    store = ResultStore.from_url(args.database_url)
    created = not store.has_table()
    store.create_schema()
    try:
        if not args.reuse:
            took = fill(store, now, args.rows, args.minutes, args.batch)
            print(f"upserted {args.rows:,} rows in {took:.1f} s")
        if store.engine.dialect.name == "postgresql":
            with store.engine.begin() as conn:
                conn.execute(sa.text(f"ANALYZE {results.name}"))
        settings = Settings(broker_url=args.redis_url, database_url=args.database_url,
                            queue=f"livecost-{uuid.uuid4().hex[:8]}")
        app = create_app(settings)
        with TestClient(app) as http:
            def call() -> dict[str, Any]:
                answer = http.get("/v1/live", params={"window": 60})
                answer.raise_for_status()
                return dict(answer.json())

            t0 = time.perf_counter()
            body = call()
            opening = (time.perf_counter() - t0) * 1000
            in_window = sum(p["count"] for p in body["per_minute"])
            first, median, top = timed(call, args.repeat, args.pause)
            print(f"{store.engine.dialect.name}: {in_window:,} rows in the trend's window; "
                  f"GET /v1/live: opening call {opening:.1f} ms; then {first:.1f} ms, and "
                  f"median {median:.1f} ms, max {top:.1f} ms of {args.repeat} more")
            if args.uncached:
                services = app.state.services
                first, median, top = timed(lambda: live(services, 60), args.repeat, args.pause)
                print(f"{store.engine.dialect.name}: live() without the cache: first "
                      f"{first:.1f} ms, then median {median:.1f} ms, max {top:.1f} ms")
    finally:
        if not args.keep:
            with store.engine.begin() as conn:
                if created:
                    from contract import migrate
                    migrate.drop_all(conn)
                else:
                    conn.execute(results.delete().where(results.c.id.startswith(PREFIX)))
        store.close()


if __name__ == "__main__":
    main()
