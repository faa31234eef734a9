"""Time reads that name ids and filter by another column, on a SQLite results table of N rows.

    python -m bench.ids_reads [--rows 200000] [--ids 100] [--repeat 10]

Fills a fresh SQLite file with ``--rows`` done rows (one ``executemany``,
all ``positive``), then times ``ResultStore.query(ids=...)`` for ``--ids``
ids spread over the table, alone and with ``status=`` or ``label=`` (median
of ``--repeat`` runs). Such a read should cost the same whatever the table's
size: it searches the ids' keys. Run it on two checkouts to compare.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sqlite3
import statistics
import tempfile
import time
from typing import Any

from contract.constants import RESULTS_TABLE
from contract.results import ResultStore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--ids", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    path = f"{tempfile.mkdtemp()}/ids.db"
    store = ResultStore.from_url(f"sqlite:///{path}")
    store.create_schema()
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    base = (  # only columns every schema revision has, so two checkouts compare
"id", "model", "text_sha256", "text_chars", "status", "label", "attempts",
            "truncated", "finished_at")
    with sqlite3.connect(path) as con:
        con.executemany(
            f"INSERT INTO {RESULTS_TABLE} ({', '.join(base)}) VALUES ({', '.join('?' * len(base))})",
            ((f"r{i}", "m", "0" * 64, 4, "done", "positive", 1, 0,
              (now - dt.timedelta(seconds=i)).isoformat(sep=" ")) for i in range(args.rows)))
    print(f"{args.rows:,} rows")
    step = max(1, args.rows // args.ids)
    ids = [f"r{i}" for i in range(0, args.rows, step)][:args.ids]
    filters: list[dict[str, Any]] = [{}, {"status": "done"}, {"label": "positive"}]
    for kw in filters:
        store.query(ids=ids, limit=None, **kw)  # warm-up
        runs = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            found = store.query(ids=ids, limit=None, **kw)
            runs.append((time.perf_counter() - t0) * 1000)
        print(f"query(ids={len(ids)}{''.join(f', {k}={v!r}' for k, v in kw.items())}): "
              f"{len(found)} rows, median {statistics.median(runs):.1f} ms")
    store.close()


if __name__ == "__main__":
    main()
