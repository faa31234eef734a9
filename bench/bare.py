"""Measurement 1, the limit: the model alone, in-process, no queue and no database.

Texts are tokenized, sorted by length and cut into token-budget batches
(the worker's own ``plan_batches``), then run through the same
:class:`HFRunner` the worker uses. Tokenizing is included: the worker pays
it too. A sweep over token budgets on a sample picks the best; the best then
runs on every text of the workload.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from worker.batching import plan_batches
from worker.runner import Runner


def run_once(runner: Runner, texts: Sequence[str], *, token_budget: int,
             max_batch_size: int = 256, max_padding: float | None = 0.10) -> dict[str, Any]:
    """Encode, plan, collate, forward and decode ``texts`` once; give the figures."""
    t0 = time.perf_counter()
    encoded = runner.encode(list(texts))
    steps = {"encode_s": time.perf_counter() - t0, "collate_s": 0.0, "launch_s": 0.0,
             "wait_s": 0.0, "decode_s": 0.0}
    lengths = [len(e.ids) for e in encoded]
    batches = plan_batches(lengths, token_budget=token_budget, max_batch_size=max_batch_size,
                           max_padding=max_padding)
    # The worker's steps, one batch at a time: collate, launch (the CPU computes
    # here), wait for the device, decode; timed apart so they compare with its log.
    launch = getattr(runner, "launch", runner.forward)
    fetch = getattr(runner, "fetch", lambda handle: handle)
    batch_s = []
    for rows in batches:
        b0 = time.perf_counter()
        batch = runner.collate(encoded, rows)
        b1 = time.perf_counter()
        handle = launch(batch)
        b2 = time.perf_counter()
        probs = fetch(handle)
        b3 = time.perf_counter()
        runner.decode(probs)
        b4 = time.perf_counter()
        for key, span in (("collate_s", b1 - b0), ("launch_s", b2 - b1), ("wait_s", b3 - b2),
                          ("decode_s", b4 - b3)):
            steps[key] += span
        batch_s.append(b4 - b0)
    elapsed = time.perf_counter() - t0
    real = sum(lengths)
    return {
        "token_budget": token_budget,
        "texts": len(texts),
        "tokens": real,
        "seconds": elapsed,
        "texts_per_s": len(texts) / elapsed,
        "tokens_per_s": real / elapsed,
        "batches": len(batches),
        "mean_batch_ms": 1000.0 * sum(batch_s) / max(len(batch_s), 1),
        "steps": steps,
    }


def measure_bare(runner: Runner, texts: Sequence[str], *, budgets: Sequence[int],
                 sweep_texts: int, max_padding: float | None = 0.10) -> dict[str, Any]:
    """Sweep ``budgets`` on a stride sample of ``sweep_texts``; run the best on all ``texts``."""
    step = max(len(texts) // max(sweep_texts, 1), 1)
    sample = list(texts[::step])[:sweep_texts]
    # warm-up: first-call allocations
    run_once(runner, sample[:16], token_budget=budgets[0], max_padding=max_padding)
    sweep = [run_once(runner, sample, token_budget=b, max_padding=max_padding) for b in budgets]
    best = max(sweep, key=lambda r: r["texts_per_s"])
    full = run_once(runner, texts, token_budget=best["token_budget"], max_padding=max_padding)
    return {"sweep": sweep, "best_budget": best["token_budget"], **full}
