"""How many ``Client.submit`` calls a second one thread makes, with and without a caller id.

    python -m bench.submit_rate [--n 2000] [--broker redis://127.0.0.1:6379/8]

A caller id costs one read of the results table (is the id stored with
another text?) on top of the publish. Runs against a fresh SQLite file and
the given Redis database, which it empties afterwards (default: db 8, the
benchmarks' own). Run it on two checkouts to compare.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import redis

from contract.results import ResultStore
from contract.settings import Settings
from producer import Client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/8")
    args = parser.parse_args()
    url = f"sqlite:///{tempfile.mkdtemp()}/submit.db"
    store = ResultStore.from_url(url)
    store.create_schema()  # a worker would have: the id check reads the table
    store.close()
    settings = Settings(database_url=url, broker_url=args.broker)
    try:
        with Client(settings) as client:
            for i in range(50):
                client.submit("warm-up", id=f"warm-{i}")
            for label, with_id in (("with a caller id", True), ("without", False)):
                t0 = time.perf_counter()
                for i in range(args.n):
                    client.submit("the parcel came late again", id=f"s{i}" if with_id else None)
                print(f"submit {label}: {args.n / (time.perf_counter() - t0):,.0f}/s")
    finally:
        redis.Redis.from_url(args.broker).flushdb()


if __name__ == "__main__":
    main()
