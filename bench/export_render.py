"""Time rendering result rows as an export does, with each row made a dict two ways.

    python -m bench.export_render [--rows 50000] [--repeat 5]

Builds ``--rows`` result records in memory (a text, ``scores``, ``meta`` and three
times each) and times ``producer.formatting.iter_results`` writing them as CSV, JSON and
JSON lines: with ``ResultRecord.to_json`` as it is (one-level copies of ``meta`` and
``scores``), and with the ``dataclasses.asdict`` deep copy it used before, patched in
for the comparison. The two run alternately, each repeat; the medians are printed.
No database: only the rendering, which a large ``results --all`` or API export spends
most of its time in.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import statistics
import time
from collections.abc import Callable
from typing import Any

from contract.results import ResultRecord
from producer.formatting import iter_results


def _deep_copied(record: ResultRecord) -> dict[str, Any]:
    """``ResultRecord.to_json`` as it was: ``dataclasses.asdict``, which deep-copies."""
    out = dataclasses.asdict(record)
    for key in ("submitted_at", "started_at", "finished_at"):
        value = out[key]
        out[key] = value.isoformat() if value is not None else None
    return out


def _records(count: int) -> list[ResultRecord]:
    now = dt.datetime(2026, 12, 5, tzinfo=dt.timezone.utc)
    return [ResultRecord(
        id=f"task-{i}", model="default", text_sha256="0" * 64, status="done",
        text=f"这家酒店的服务很好,房间也很干净。 review {i}", text_chars=24,
        label="positive", score=0.97, scores={"positive": 0.97, "negative": 0.03},
        source="bench", meta={"time": "2026-12-05T10:00:00", "n": i},
        submitted_at=now, started_at=now, finished_at=now) for i in range(count)]


def _render(records: list[ResultRecord], fmt: str) -> Callable[[], int]:
    def run() -> int:
        return sum(len(piece) for piece in iter_results(iter(records), fmt, terminal=False))
    return run


def _time(render: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    render()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    records = _records(args.rows)
    now_json = ResultRecord.to_json
    took: dict[tuple[str, str], list[float]] = {}
    methods: list[tuple[str, Any]] = [("to_json now", now_json),
                                      ("asdict before", _deep_copied)]
    for _ in range(args.repeat):
        for fmt in ("csv", "json", "jsonl"):
            for how, method in methods:
                setattr(ResultRecord, "to_json", method)  # noqa: B010 - the comparison's patch
                try:
                    took.setdefault((fmt, how), []).append(_time(_render(records, fmt)))
                finally:
                    setattr(ResultRecord, "to_json", now_json)  # noqa: B010
    print(f"{args.rows:,} rows, median of {args.repeat}")
    print("| format | to_json now (s) | asdict before (s) | ratio |")
    print("|---|---:|---:|---:|")
    for fmt in ("csv", "json", "jsonl"):
        now_s = statistics.median(took[fmt, "to_json now"])
        before_s = statistics.median(took[fmt, "asdict before"])
        print(f"| {fmt} | {now_s:.2f} | {before_s:.2f} | {before_s / now_s:.1f}x |")


if __name__ == "__main__":
    main()
