"""Measurements 3 and 4: bertstream end to end, and its ceiling with a null model.

3. Producer (``Client.submit_many``) → Redis → ``python -m worker`` → commit,
   with the worker warm and the producer publishing while it consumes:
   texts/s from the first publish to the last row seen, and submit→row
   latency percentiles from the rows themselves.
4. The same worker with ``BERTSTREAM_MODEL=null``: what queueing, batching
   and persisting cost per text. Messages are published first, then a worker
   starts and drains them; the rate is taken from the rows (first flush
   start to last row), so the producer's own speed is reported apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from bench import figures
from bench.services import ResultsProbe, WorkerGroup, WorkerProc
from contract.settings import Settings
from producer.client import Client


def measure_bertstream(settings: Settings, probe: ResultsProbe, workers: WorkerGroup,
                       texts: Sequence[str], prefix: str, timeout: float) -> dict[str, Any]:
    """Bulk submit ``texts`` to running workers; wait for every row; give the figures.

    A small warm-up batch goes first: the first forward passes of a fresh
    process pay one-off allocations the bare model's warm-up also excludes.
    """
    warm = [{"id": f"{prefix}warm-{i}", "text": t} for i, t in enumerate(texts[:32])]
    with Client(settings) as client:
        client.submit_many(warm)
    probe.wait_for(f"{prefix}warm-", len(warm), timeout=timeout, alive=workers.check_alive)
    prefix = f"{prefix}run-"
    items = [{"id": f"{prefix}{i}", "text": t} for i, t in enumerate(texts)]
    mark = workers.totals()
    with Client(settings) as client:
        t0 = time.time()
        report = client.submit_many(items)
        publish_s = time.time() - t0
    if report.rejected:
        raise RuntimeError(f"producer refused {report.rejected} benchmark texts: {report.errors[:3]}")
    probe.wait_for(prefix, len(items), timeout=timeout, alive=workers.check_alive)
    rows = probe.rows(prefix)
    wall = probe.last_finished(prefix) - t0  # first publish to last row written
    return {
        "texts": len(items),
        "messages": report.messages,
        "tokens": figures.tokens(rows),
        "seconds": wall,
        "texts_per_s": figures.rate(len(items), wall),
        "tokens_per_s": figures.rate(figures.tokens(rows), wall),
        "drain_texts_per_s": figures.drain_rate(rows),
        "publish_s": publish_s,
        "failed": sum(1 for r in rows if r["status"] != "done"),
        **figures.latency_ms(rows),
        "worker": _settled(workers, mark, len(items)),
    }


def _settled(workers: WorkerGroup, mark: dict[str, float], items: int,
             timeout: float = 10.0) -> dict[str, float]:
    """The workers' flush figures since ``mark``, once they count ``items`` items.

    A worker updates its metrics just after the commit that makes rows
    visible, so the last flush may be missing from a scrape taken at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        totals = figures.diff_totals(workers.totals(), mark)
        if totals["items"] >= items or time.monotonic() > deadline:
            return totals
        time.sleep(0.05)  # a poll interval: the last flush's metrics are moments away


def publish_single(settings: Settings, texts: Sequence[str], prefix: str) -> float:
    """``Client.submit`` in a loop (one message per text); give the seconds it took."""
    with Client(settings) as client:
        t0 = time.monotonic()
        for i, text in enumerate(texts):
            client.submit(text, id=f"{prefix}{i}")
        return time.monotonic() - t0


def publish_bulk(settings: Settings, texts: Sequence[str], prefix: str) -> float:
    """``Client.submit_many`` (chunks of ``bulk_chunk_size``); give the seconds it took."""
    with Client(settings) as client:
        t0 = time.monotonic()
        client.submit_many([{"id": f"{prefix}{i}", "text": t} for i, t in enumerate(texts)])
        return time.monotonic() - t0


def measure_null(settings: Settings, probe: ResultsProbe,
                 start_worker: Callable[[Settings], WorkerProc], texts: Sequence[str],
                 prefix: str, *, bulk: bool, timeout: float) -> dict[str, Any]:
    """Pre-publish ``texts`` (single or bulk messages), start a null worker, time its drain."""
    publish = publish_bulk if bulk else publish_single
    publish_s = publish(settings, texts, prefix)
    worker = start_worker(settings)
    try:
        probe.wait_for(prefix, len(texts), timeout=timeout, alive=worker.check_alive)
        totals = _settled(WorkerGroup([worker]), {}, len(texts))
    finally:
        worker.stop()
    rows = probe.rows(prefix)
    return {
        "mode": "bulk" if bulk else "single",
        "texts": len(texts),
        "texts_per_s": figures.drain_rate(rows),
        "publish_texts_per_s": figures.rate(len(texts), publish_s),
        "flushes": len(figures.flush_durations_ms(rows)),
        "worker": totals,
    }
