"""Measurement 6: latency under load, with arrivals that do not wait for answers.

The producer submits single texts (interactive lane) at Poisson
arrival times for a fixed rate, whatever the worker's backlog: an open
loop, so queueing shows up as latency instead of slowing the producer
down. Latency is submit→row written, taken from the rows. The bound it is
compared with is ``max_wait + 3 x one flush's prepare+infer time``, the
flush time measured from the same rows (rows of one flush share their
started_at/finished_at).
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection, Sequence
from typing import Any

from bench import figures
from bench.services import ResultsProbe, WorkerGroup
from contract.settings import Settings
from producer.client import Client


def poisson_schedule(rate: float, seconds: float, seed: int = 0) -> list[float]:
    """Arrival offsets (seconds from start) of a Poisson process of ``rate`` per second."""
    rng = random.Random(seed)
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        out.append(t)


def _produce(settings: Settings, texts: Sequence[str], schedule: Sequence[float],
             prefix: str, lag: list[float]) -> None:
    with Client(settings) as client:
        t0 = time.monotonic()
        for i, offset in enumerate(schedule):
            delay = t0 + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the arrivals, not measuring
            else:
                lag.append(-delay)
            client.submit(texts[i % len(texts)], id=f"{prefix}{i}")


def measure_load(settings: Settings, probe: ResultsProbe, workers: WorkerGroup,
                 texts: Sequence[str], prefix: str, *, rate: float, seconds: float,
                 seed: int = 0, long: Collection[int] | None = None) -> dict[str, Any]:
    """Run one open-loop load of ``rate`` texts/s for ``seconds``; give latency figures.

    ``long``, when given: the places in ``texts`` of long texts; the latency
    of the others is reported apart (``short``), and the long ones' (``long``).
    """
    schedule = poisson_schedule(rate, seconds, seed)
    lag: list[float] = []
    _produce(settings, texts, schedule, prefix, lag)
    probe.wait_for(prefix, len(schedule), timeout=120 + seconds, alive=workers.check_alive)
    rows = probe.rows(prefix)
    flush_ms = figures.flush_durations_ms(rows)
    batch_ms = figures.percentile(flush_ms, 50)
    bound = settings.max_wait_ms + 3 * batch_ms
    lat = figures.latency_ms(rows)
    split: dict[str, Any] = {}
    if long is not None:
        def is_long(row: dict[str, Any]) -> bool:
            return int(row["id"][len(prefix):]) % len(texts) in long

        split = {"short": {"texts": sum(not is_long(r) for r in rows),
                           **figures.latency_ms([r for r in rows if not is_long(r)])},
                 "long": {"texts": sum(is_long(r) for r in rows),
                          "tokens": sorted(int(r["tokens"] or 0) for r in rows if is_long(r)),
                          **figures.latency_ms([r for r in rows if is_long(r)])}}
    return {
        "rate": rate,
        "texts": len(schedule),
        "achieved_rate": len(schedule) / seconds,
        "producer_late_p99_ms": 1000.0 * figures.percentile(lag, 99) if lag else 0.0,
        **lat,
        "flushes": len(flush_ms),
        "mean_flush_size": len(rows) / max(len(flush_ms), 1),
        "flush_p50_ms": batch_ms,
        "flush_p99_ms": figures.percentile(flush_ms, 99),
        "bound_ms": bound,
        "p99_within_bound": lat["p99_ms"] <= bound,
        **split,
    }
