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


def windowed_plan(lengths: Sequence[int], window: int, *, token_budget: int,
                  max_batch_size: int, max_padding: float | None) -> tuple[float, int]:
    """Waste and batch count of ``plan_batches`` on consecutive ``window``-sized flushes."""
    real = padded = count = 0
    for start in range(0, len(lengths), window):
        chunk = list(lengths[start : start + window])
        for rows in plan_batches(chunk, token_budget=token_budget, max_batch_size=max_batch_size,
                                 max_padding=max_padding):
            real += sum(chunk[r] for r in rows)
            padded += len(rows) * max(chunk[r] for r in rows)
            count += 1
    return ((padded - real) / real if real else 0.0), count


def measure_padding(lengths: Sequence[int], *, token_budget: int, max_batch_size: int,
                    max_padding: float, fifo_size: int,
                    flush_windows: Sequence[int] = (64, 256)) -> dict[str, Any]:
    """Waste ratios (0.05 = 5% padding over real tokens) for each batching policy.

    ``plan``: the worker's policy (sorted, token budget, padding cap
    ``max_padding``); ``uncapped``: the same without the padding cap; ``fifo``:
    fixed-count batches in arrival order.
    """
    out: dict[str, Any] = {
        "texts": len(lengths),
        "real_tokens": sum(lengths),
        "token_budget": token_budget,
        "max_padding": max_padding,
        "fifo_size": fifo_size,
        "fifo_waste": padding_waste(lengths, fifo_batches(len(lengths), fifo_size)),
    }
    for name, cap in (("plan", max_padding), ("uncapped", None)):
        planned = plan_batches(lengths, token_budget=token_budget,
                               max_batch_size=max_batch_size, max_padding=cap)
        out[f"{name}_waste"] = padding_waste(lengths, planned)
        out[f"{name}_batches"] = len(planned)
        for window in flush_windows:
            waste, count = windowed_plan(lengths, window, token_budget=token_budget,
                                         max_batch_size=max_batch_size, max_padding=cap)
            out[f"{name}_waste_flush{window}"] = waste
            out[f"{name}_batches_flush{window}"] = count
    return out

