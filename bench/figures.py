"""Figures from result rows: throughput, latency percentiles, flush durations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; nan when empty."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def latency_ms(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """p50/p95/p99/max of submit→row-written latency, in milliseconds."""
    lat = [1000.0 * (r["finished_at"] - r["submitted_at"]) for r in rows
           if r["finished_at"] is not None and r["submitted_at"] is not None]
    return {"p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95),
            "p99_ms": percentile(lat, 99), "max_ms": max(lat) if lat else math.nan}


def drain_rate(rows: Sequence[dict[str, Any]]) -> float:
    """Texts per second from the first flush's start to the last row written."""
    starts = [r["started_at"] for r in rows if r["started_at"] is not None]
    ends = [r["finished_at"] for r in rows if r["finished_at"] is not None]
    if not starts or not ends:
        return math.nan
    span = max(ends) - min(starts)
    return len(rows) / span if span > 0 else math.nan


def flush_durations_ms(rows: Sequence[dict[str, Any]]) -> list[float]:
    """Prepare+infer time of each flush: rows of one flush share started_at/finished_at."""
    flushes = {(r["started_at"], r["finished_at"]) for r in rows
               if r["started_at"] is not None and r["finished_at"] is not None}
    return [1000.0 * (end - start) for start, end in flushes]


def tokens(rows: Sequence[dict[str, Any]]) -> int:
    """Real tokens of the rows (as the worker counted them)."""
    return sum(int(r["tokens"] or 0) for r in rows)


def rate(count: float, seconds: float) -> float:
    """``count / seconds``, nan for a zero span."""
    return count / seconds if seconds > 0 else math.nan


STEPS = ("tokenize", "collate", "launch", "wait", "decode")


def metrics_totals(text: str) -> dict[str, float]:
    """A worker's flush figures from its Prometheus metrics (``/metrics`` text): flushes,
    messages, items, infer and commit seconds, and the seconds of each step inside infer."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {"flushes": 0.0, "messages": 0.0, "items": 0.0, "infer_s": 0.0, "commit_s": 0.0}
    totals.update({f"{name}_s": 0.0 for name in STEPS})
    wanted = {"bertstream_inference_seconds_count": "flushes",
              "bertstream_inference_seconds_sum": "infer_s",
              "bertstream_commit_seconds_sum": "commit_s",
              "bertstream_flush_messages_total": "messages", "bertstream_items_total": "items"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                totals[wanted[sample.name]] += sample.value
            elif sample.name == "bertstream_flush_step_seconds_total":
                totals[f"{sample.labels['step']}_s"] += sample.value
    return totals


def diff_totals(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """``after - before`` key by key: a stage's share of cumulative counters."""
    return {k: after[k] - before.get(k, 0.0) for k in after}
