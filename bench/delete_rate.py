"""Time ``bertstream db delete`` (``ResultStore.delete``) against one plain SQL DELETE.

    python -m bench.delete_rate --database-url postgresql+psycopg://postgres@host/db [--rows 200000]
    python -m bench.delete_rate --database-url sqlite:////tmp/delete.db

Fills the results table with ``--rows`` done rows (ids ``delbench-*``, spread
over 100 days, 1 in 10 tasks with a second model's row), then times, on a
fresh fill each, a retention delete of the older half: ``store.delete(until=...)``
(500 tasks a transaction, flags settled) and the single statement ``DELETE
... WHERE finished_at < ...`` a hand-written cron job would run (one long
transaction, flags not settled); then ``store.delete(ids=...)`` of ``--ids``
ids spread over the table. Prints a Markdown table. Deletes its rows at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contract.constants import RESULTS_TABLE  # noqa: E402
from contract.results import ResultStore, results  # noqa: E402

PREFIX = "delbench-"
DAYS = 100


def fill(store: ResultStore, rows: int, now: dt.datetime) -> None:
    """``rows`` rows: task i finished (i / rows) * DAYS days ago; every tenth task also
    has a row of a second model, a minute later (that one is the task's latest)."""
    spread = DAYS * 86400 / rows
    params = []
    for i in range(rows):
        at = now - dt.timedelta(seconds=i * spread)
        row = {"id": f"{PREFIX}{i:08d}", "text_sha256": f"{i:064d}", "text_chars": 24,
               "model": "m1", "status": "done", "score": 0.9, "attempts": 1, "truncated": False,
               "finished_at": at, "label": "positive" if i % 5 < 3 else "negative",
               "latest": i % 10 != 0}
        params.append(row)
        if i % 10 == 0:
            params.append(row | {"model": "m2", "finished_at": at + dt.timedelta(minutes=1),
                                 "latest": True})
    insert = results.insert()
    with store.engine.begin() as conn:
        for start in range(0, len(params), 50_000):
            conn.execute(insert, params[start:start + 50_000])
    if store.engine.dialect.name == "postgresql":
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f"ANALYZE {RESULTS_TABLE}"))


def clear(store: ResultStore) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"DELETE FROM {RESULTS_TABLE} WHERE id LIKE :p"), {"p": PREFIX + "%"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--ids", type=int, default=10_000)
    args = parser.parse_args()
    store = ResultStore.from_url(args.database_url)
    store.create_schema()
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    cut = now - dt.timedelta(days=DAYS / 2)
    table = []
    try:
        clear(store)
        fill(store, args.rows, now)
        t0 = time.perf_counter()
        gone = store.delete(until=cut)
        table.append(("store.delete(until=...), 500 tasks a transaction", gone.rows,
                      time.perf_counter() - t0))
        clear(store)
        fill(store, args.rows, now)
        t0 = time.perf_counter()
        with store.engine.begin() as conn:
            plain = conn.execute(results.delete().where(results.c.finished_at < cut)).rowcount
        table.append(("one DELETE ... WHERE finished_at < ... (no settling)", plain,
                      time.perf_counter() - t0))
        ids = [f"{PREFIX}{i:08d}" for i in random.Random(7).sample(range(args.rows // 2),
                                                                    min(args.ids, args.rows // 2))]
        t0 = time.perf_counter()
        gone = store.delete(ids=ids)
        table.append((f"store.delete(ids=...), {len(ids):,} ids", gone.rows,
                      time.perf_counter() - t0))
    finally:
        clear(store)
        store.close()
    print(f"{store.engine.dialect.name}, {args.rows:,} tasks "
          f"({args.rows + (args.rows + 9) // 10:,} rows)\n")
    print("| delete | rows | seconds | rows/s |\n|---|---:|---:|---:|")
    for what, rows, secs in table:
        print(f"| {what} | {rows:,} | {secs:.2f} | {rows / secs:,.0f} |")


if __name__ == "__main__":
    main()
