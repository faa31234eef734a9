"""What finding live workers costs in a database full of other keys.

    python -m bench.liveness_scan [--other-keys 200000] [--families 10] [--repeat 7]
                                  [--broker redis://127.0.0.1:6379/8]

The API keeps a claim key per accepted item for ``api_id_ttl_s`` (7 days by default),
so the database grows with traffic. Stores that many claim-like keys and one worker's
heartbeat in each of ``--families`` model families of a fresh queue, then times the
readers of ``contract.liveness``: ``family_workers`` (the API's /metrics scrape, its
workers and health endpoints, the dashboard, the worker's health check) and
``live_workers`` (submitting for one family), counting their Redis round trips
(one write of a command or pipeline, then its replies) and commands. "index": the
readers on the heartbeats as a worker of this version writes them (key and index
members); "before": the readers as they were (a SCAN of the whole database, then
MGET), on the same keys; "no worker": the readers on a queue with no live worker at all
(no index: the case a fallback SCAN would have cost most in). They alternate,
each repeat. Runs against the given Redis database (default: db 8, the benchmarks' own),
which it empties before and after.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from bench.metrics_scrape import Tally, claims, counting_client
from contract import liveness
from contract.constants import MODEL_NAME_PATTERN, WORKER_KEY_PREFIX
from contract.liveness import (
    announce,
    family_workers,
    glob_literal,
    live_workers,
)


def family_workers_before(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """``family_workers`` before the index: the whole database SCANned for the keys."""
    prefix = f"{WORKER_KEY_PREFIX}{queue}"
    found = []
    for key in client.scan_iter(match=glob_literal(prefix) + "[-:]*", count=500):
        rest = key.decode()[len(prefix):]
        if rest.startswith(":"):
            found.append((queue, rest[1:], key))
            continue
        name, sep, host = rest[1:].partition(":")
        if sep and re.fullmatch(MODEL_NAME_PATTERN, name):
            found.append((f"{queue}-{name}", host, key))
    return liveness._read(client, found)


def live_workers_before(client: redis.Redis, family: str) -> list[dict[str, Any]]:
    """``live_workers`` before the index."""
    prefix = f"{WORKER_KEY_PREFIX}{family}:"
    keys = client.scan_iter(match=glob_literal(prefix) + "*", count=500)
    return liveness._read(client, [(family, key.decode()[len(prefix):], key) for key in keys])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--other-keys", type=int, default=200_000)
    parser.add_argument("--families", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/8")
    args = parser.parse_args()
    tally = Tally()
    client = counting_client(args.broker, tally)
    client.flushdb()
    queue = f"bench-live-{uuid.uuid4().hex[:8]}"
    families = [queue] + [f"{queue}-m{i}" for i in range(1, args.families)]
    reads: dict[tuple[str, str], Callable[[], list[dict[str, Any]]]] = {
        ("family_workers", "index"): lambda: family_workers(client, queue),
        ("family_workers", "before"): lambda: family_workers_before(client, queue),
        ("live_workers", "index"): lambda: live_workers(client, families[-1]),
        ("live_workers", "before"): lambda: live_workers_before(client, families[-1]),
        ("family_workers", "no worker"): lambda: family_workers(client, queue + "x"),
    }
    took: dict[tuple[str, str], list[float]] = {}
    counts: dict[tuple[str, str], tuple[int, int, int]] = {}
    try:
        claims(client, args.other_keys)
        for _ in range(args.repeat):
            for how in ("index", "before", "no worker"):
                for family in families:  # fresh heartbeats
                    announce(client, family, "celery@bench", "{}")
                for (name, mode), read in reads.items():
                    if mode != how:
                        continue
                    tally.reset()
                    t0 = time.perf_counter()
                    found = read()
                    took.setdefault((name, how), []).append(time.perf_counter() - t0)
                    counts[name, how] = (len(found), tally.trips, tally.commands)
    finally:
        client.flushdb()
        client.close()
    print(f"median of {args.repeat}; {args.other_keys:,} other keys, {args.families} families"
          " with one worker each")
    print("| reader | heartbeats | ms | round trips | commands | workers found |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, how), times in took.items():
        workers, trips, commands = counts[name, how]
        print(f"| {name} | {how} | {statistics.median(times) * 1000:.2f} | {trips} |"
              f" {commands:,} | {workers} |")


if __name__ == "__main__":
    main()
