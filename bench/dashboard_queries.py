"""Time every query the dashboard runs against a results table of N rows (PostgreSQL).

    python -m bench.dashboard_queries --database-url postgresql+psycopg://postgres@host/db

Inserts ``--rows`` rows (ids ``dashbench-*``) with one ``INSERT ... SELECT
generate_series``, spread over ``--days`` days up to now across 20 sources,
ANALYZEs, then times each query of the dashboard for every time range the page
offers (the label mix's first read of the whole range, and the read of each
later refresh, from the current bucket on) (median and max of ``--repeat`` runs, after one warm-up).
Finally deletes its rows (or drops the table when the script created it),
unless ``--keep``. Prints a Markdown table; ``--out`` also writes it as JSON.
``--revision 0003 --only "id "`` times the id searches before schema revision 0004
(run it on a database whose collation is not C to see what that index is for).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.dashboard import finished_since, search, trend  # noqa: E402
from contract import migrate  # noqa: E402
from contract.constants import RESULTS_TABLE  # noqa: E402
from contract.queries import Filters, distinct_sources, stats  # noqa: E402
from contract.results import ResultStore  # noqa: E402

PREFIX = "dashbench-"
# The page's ranges: name -> (seconds, stats bucket).
RANGES = {"15m": (900, "1m"), "1h": (3600, "1m"), "24h": (86400, "1h"),
          "7d": (604800, "1h"), "30d": (2592000, "1d")}
STEP = {"1m": 60, "1h": 3600, "1d": 86400}

FILL = f"""
INSERT INTO {RESULTS_TABLE} (id, source, text, text_sha256, text_chars, model, status, label,
                             score, attempts, truncated, finished_at)
SELECT '{PREFIX}' || lpad(g::text, 8, '0'),
       'src-' || (g % 20),
       CASE g % 3 WHEN 0 THEN '这家店的服务很好 #' || g WHEN 1 THEN 'the parcel came late #' || g
                  ELSE 'quiet day on the markets #' || g END,
       md5(g::text) || md5(g::text), 24, 'bench-model',
       CASE WHEN g % 97 = 0 THEN 'failed' ELSE 'done' END,
       CASE WHEN g % 97 = 0 THEN NULL WHEN g % 5 < 3 THEN 'positive' ELSE 'negative' END,
       0.5 + (g % 50) / 100.0, 1, false,
       now() - make_interval(secs => g * :spread)
FROM generate_series(1, :rows) AS g
"""


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """Median and max milliseconds of ``repeat`` runs after one warm-up; the last answer."""
    answer = fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        answer = fn()
        runs.append((time.perf_counter() - t0) * 1000)
    return statistics.median(runs), max(runs), answer


def _bucket_start(now: dt.datetime, bucket: str) -> dt.datetime:
    step = STEP[bucket]
    return dt.datetime.fromtimestamp(now.timestamp() // step * step, dt.timezone.utc)


def queries(store: ResultStore, now: dt.datetime) -> list[tuple[str, str, Callable[[], Any]]]:
    """(range, query, call) for one refresh of the page per range, plus the searches."""
    out: list[tuple[str, str, Callable[[], Any]]] = [
        ("-", "live: rows finished in the last 60 s", lambda: finished_since(
            store, now - dt.timedelta(seconds=60))),
        ("-", "live: rows per minute, last 30 min", lambda: trend(store, now)),
        ("-", "sources for the filter (index hops)", lambda: distinct_sources(store)),
    ]
    for name, (seconds, bucket) in RANGES.items():
        since = now - dt.timedelta(seconds=seconds)
        every = Filters(since=since)
        one = Filters(since=since, source="src-8")
        out += [
            (name, f"label mix, all sources (stats by=label bucket={bucket})",
             partial(stats, store, every, by="label", bucket=bucket)),
            (name, f"label mix, one source (bucket={bucket})",
             partial(stats, store, one, by="label", bucket=bucket)),
            (name, "label mix, each later refresh (from the current bucket)",
             partial(stats, store, Filters(since=_bucket_start(now, bucket)), by="label",
                     bucket=bucket)),
            (name, "latest 50, all sources", partial(search, store, every)),
            (name, "latest 50, one source + label",
             partial(search, store, Filters(since=since, source="src-8", label="negative"))),
            (name, "text search (newest 5,000 rows)",
             partial(search, store, every, q="PARCEL came late #1", scan=5000)),
        ]
    out += [
        ("30d", "id exact", lambda: search(store, Filters(), task_id=f"{PREFIX}00500000")),
        ("30d", "id prefix (1,000 matches, first 50)",
         lambda: search(store, Filters(), task_id=f"{PREFIX}00123")),
        ("30d", "text search, no match (reads all 20,000 scanned)",
         lambda: search(store, Filters(), q="no such text", scan=20_000)),
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=29.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="leave the rows in place")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", default="", help="time only the queries whose name "
                        "contains this (e.g. 'id ')")
    parser.add_argument("--revision", default="head", help="the schema revision to time "
                        "(e.g. 0003, before the id index of 0004): an existing table is "
                        "moved there and back to head afterwards")
    args = parser.parse_args()

    store = ResultStore.from_url(args.database_url)
    if store.engine.dialect.name != "postgresql":
        parser.error("this measures PostgreSQL")
    created = not store.has_table()
    store.create_schema()
    if args.revision != "head":
        migrate.downgrade(store, args.revision)
    try:
        t0 = time.perf_counter()
        if args.rows:
            with store.engine.begin() as conn:
                conn.execute(sa.text(FILL), {"rows": args.rows,
                                             "spread": args.days * 86400 / args.rows})
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f"ANALYZE {RESULTS_TABLE}"))
            total = conn.execute(sa.text(f"SELECT count(*) FROM {RESULTS_TABLE}")).scalar_one()
        print(f"inserted {args.rows:,} rows in {time.perf_counter() - t0:.1f} s "
              f"(table: {total:,} rows, schema {migrate.state(store).current})", file=sys.stderr)
        now = dt.datetime.now(dt.timezone.utc)
        rows = []
        for range_name, what, call in queries(store, now):
            if args.only not in what:
                continue
            median, worst, answer = timed(call, args.repeat)
            size = len(answer) if isinstance(answer, list) else answer
            rows.append({"range": range_name, "query": what, "median_ms": round(median, 1),
                         "max_ms": round(worst, 1), "answer": size})
        print("| range | query | median ms | max ms | rows/groups returned |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['range']} | {r['query']} | {r['median_ms']} | {r['max_ms']} | {r['answer']} |")
        if args.out:
            args.out.write_text(json.dumps({"rows": args.rows, "table_rows": total,
                                            "measured_at": now.isoformat(),
                                            "queries": rows}, indent=1) + "\n")
    finally:
        if args.revision != "head":
            t0 = time.perf_counter()
            migrate.upgrade(store)
            print(f"upgraded {args.revision} -> head in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)
        if not args.keep:
            with store.engine.begin() as conn:
                if created:
                    migrate.drop_all(conn)
                else:
                    conn.execute(sa.text(f"DELETE FROM {RESULTS_TABLE} WHERE id LIKE :p"),
                                 {"p": PREFIX + "%"})
        store.close()


if __name__ == "__main__":
    main()
