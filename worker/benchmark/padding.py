"""Measurement 5: padding waste of length-sorted token-budget batches vs fixed-count FIFO.

Pure computation on the real tokenizer's lengths: padded tokens (rows x
longest row, summed over batches) over real tokens, minus one. Planned over
the whole workload and, closer to a worker, over flush-sized windows in
arrival order (a flush only sorts what it holds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.batching import fifo_batches, padding_waste, plan_batches


def plan_capped(lengths: Sequence[int], *, token_budget: int, max_batch_size: int,
                max_waste: float = 0.10) -> list[list[int]]:
    """A proposal for worker/batching.py: plan_batches plus a padding cap.

    Same greedy walk over length-sorted items, but a batch is also cut when
    adding the next (longest so far) item would pad the batch by more than
    ``max_waste`` of its real tokens. Every batch then wastes at most
    ``max_waste`` (one long item alone wastes nothing).
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for idx in order:
        n = lengths[idx]
        rows = len(current) + 1
        if current and (rows > max_batch_size or rows * n > token_budget
                        or rows * n - (real + n) > max_waste * (real + n)):
            batches.append(current)
            current, real = [], 0
        current.append(idx)
        real += n
    if current:
        batches.append(current)
    return batches


def windowed_plan_waste(lengths: Sequence[int], window: int, *, token_budget: int,
                        max_batch_size: int, planner: Any = plan_batches) -> float:
    """Waste of ``planner`` applied to consecutive ``window``-sized flushes."""
    real = padded = 0
    for start in range(0, len(lengths), window):
        chunk = list(lengths[start : start + window])
        for rows in planner(chunk, token_budget=token_budget, max_batch_size=max_batch_size):
            real += sum(chunk[r] for r in rows)
            padded += len(rows) * max(chunk[r] for r in rows)
    return (padded - real) / real if real else 0.0


def measure_padding(lengths: Sequence[int], *, token_budget: int, max_batch_size: int,
                    fifo_size: int, flush_windows: Sequence[int] = (64, 256)) -> dict[str, Any]:
    """Waste ratios (0.05 = 5% padding over real tokens) for each batching policy."""
    planned = plan_batches(lengths, token_budget=token_budget, max_batch_size=max_batch_size)
    out: dict[str, Any] = {
        "texts": len(lengths),
        "real_tokens": sum(lengths),
        "token_budget": token_budget,
        "plan_waste": padding_waste(lengths, planned),
        "fifo_size": fifo_size,
        "fifo_waste": padding_waste(lengths, fifo_batches(len(lengths), fifo_size)),
    }
    capped = plan_capped(lengths, token_budget=token_budget, max_batch_size=max_batch_size)
    out["capped_waste"] = padding_waste(lengths, capped)
    out["plan_batches"] = len(planned)
    out["capped_batches"] = len(capped)
    for window in flush_windows:
        out[f"plan_waste_flush{window}"] = windowed_plan_waste(
            lengths, window, token_budget=token_budget, max_batch_size=max_batch_size)
        out[f"capped_waste_flush{window}"] = windowed_plan_waste(
            lengths, window, token_budget=token_budget, max_batch_size=max_batch_size,
            planner=plan_capped)
    return out
