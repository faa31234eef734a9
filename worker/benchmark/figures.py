"""Figures from result rows: throughput, latency percentiles, flush durations."""

from __future__ import annotations

import math
import re
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


_FLUSH_LINE = re.compile(
    r"flush: (\d+) msg, (\d+) items .*? pad ([\d.]+)%, infer ([\d.]+)s, commit ([\d.]+)s")


_STEPS = ("tokenize", "collate", "launch", "wait", "decode")
_STEP_LINE = re.compile(", ".join(rf"{name} ([\d.]+)s" for name in _STEPS))


def flush_log_totals(log_text: str) -> dict[str, float]:
    """Sum the worker's ``flush:`` log lines: flushes, messages, items, infer and commit
    seconds, and the steps inside infer (tokenize, collate, launch, wait, decode)."""
    totals = {"flushes": 0.0, "messages": 0.0, "items": 0.0, "infer_s": 0.0, "commit_s": 0.0}
    totals.update({f"{name}_s": 0.0 for name in _STEPS})
    for line in log_text.splitlines():
        m = _FLUSH_LINE.search(line)
        if not m:
            continue
        totals["flushes"] += 1
        totals["messages"] += int(m.group(1))
        totals["items"] += int(m.group(2))
        totals["infer_s"] += float(m.group(4))
        totals["commit_s"] += float(m.group(5))
        steps = _STEP_LINE.search(line)
        if steps:
            for name, value in zip(_STEPS, steps.groups(), strict=True):
                totals[f"{name}_s"] += float(value)
    return totals
