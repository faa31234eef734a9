"""What the API's id claims cost per bulk POST: the default model's, a named model's.

    python -m bench.claim_cost [--rounds 200] [--broker redis://127.0.0.1:6379/8]

Runs the claim script of :mod:`api.submit` on 256 fresh ids a round, the two
cases alternated, against the given Redis database (default: db 8, the
benchmarks' own), which it empties afterwards. A named model's claims also
record the model under a second key (so a status asked without a model finds
the task); the default model's do not.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

import redis

from api.submit import _CLAIM
from contract.constants import ACCEPTED_ANY_KEY_PREFIX, ACCEPTED_KEY_PREFIX

ITEMS = 256


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/8")
    args = parser.parse_args()
    r = redis.Redis.from_url(args.broker)
    claim = r.register_script(_CLAIM)
    hashes = "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(ITEMS))
    cases = {"default model": "", "named model": "bench-beta"}
    took: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for rnd in range(args.rounds):
            for name, family in sorted(cases.items(), reverse=rnd % 2 == 1):
                ids = "\0".join(f"{family or 'default'}-{rnd}-{i}" for i in range(ITEMS))
                t0 = time.perf_counter()
                claim(args=[3600, f"{ACCEPTED_KEY_PREFIX}bench:", hashes, ids,
                            f"{ACCEPTED_ANY_KEY_PREFIX}bench:", family])
                took[name].append(time.perf_counter() - t0)
    finally:
        r.flushdb()
        r.close()
    median = {name: statistics.median(v) * 1000 for name, v in took.items()}
    for name, ms in median.items():
        print(f"{name}: {ms:.2f} ms per {ITEMS} ids (median of {args.rounds})")
    print(f"named / default: {median['named model'] / median['default model']:.2f}")


if __name__ == "__main__":
    main()
