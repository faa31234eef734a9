"""Profile one worker flush in-process with the null model (no Redis, no model).

Usage: python -m bench.profile_flush [--db URL] [--flushes N] [--top K] [--prefill ROWS]

Prints flushes/s and texts/s of FlushProcessor.process on bulk-sized
payloads (4 messages x 256 texts), then the cProfile top functions. This is
where the null pipeline's per-text cost lives once Celery is taken away
(bench/README.md, "Where the time goes"). ``--prefill`` first stores that
many rows through the same flushes, to show what a full results table costs
each flush (the done-ids lookup and the upsert search the table's indexes);
on PostgreSQL the table is then ANALYZEd, as autovacuum would.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time

from bench.workload import social_texts
from contract.constants import RESULTS_TABLE
from contract.results import ResultStore
from contract.settings import Settings
from worker.flush import FlushProcessor
from worker.runner import NullRunner


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", default=None)
    parser.add_argument("--flushes", type=int, default=10)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--prefill", type=int, default=0, metavar="ROWS")
    args = parser.parse_args()
    url = args.db or f"sqlite:///{tempfile.mkdtemp()}/profile.db"
    settings = Settings(database_url=url, model="null")
    store = ResultStore.from_url(url)
    store.create_schema()
    proc = FlushProcessor(NullRunner(), store, settings, "profile@local")
    texts = social_texts(1024)
    now = time.time()

    def payloads(k: int) -> list[tuple[str, object]]:
        return [(f"m{k}-{j}", [[{"id": f"p{now}-{k}-{j}-{i}", "text": texts[j * 256 + i],
                                 "source": None, "meta": None, "submitted_at": now}
                                for i in range(256)]]) for j in range(4)]

    t0 = time.perf_counter()
    for k in range(-(args.prefill // 1024) - 1, 0):
        proc.process(payloads(k))
    if store.engine.dialect.name == "postgresql":
        # What autovacuum does within a minute or so: without statistics the planner
        # guesses, and scans the table for a 500-id IN list.
        with store.engine.begin() as conn:
            conn.exec_driver_sql(f"ANALYZE {RESULTS_TABLE}")
    print(f"table: {store.count(model=proc.model_key):,} rows (prefilled in {time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    for k in range(args.flushes):
        proc.process(payloads(k))
    dt = time.perf_counter() - t0
    print(f"{args.flushes / dt:.1f} flushes/s, {args.flushes * 1024 / dt:,.0f} texts/s")
    prof = cProfile.Profile()
    prof.enable()
    for k in range(args.flushes, 2 * args.flushes):
        proc.process(payloads(k))
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    store.close()


if __name__ == "__main__":
    main()
