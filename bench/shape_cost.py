"""What a batch shape costs the first time and the times after, step by step.

The device run's end-to-end figures left one question open: does a worker
pay a one-off price for every batch shape it has not run before (kernels
chosen and loaded, allocator blocks created)? This measures it directly on
one runner: ``shapes`` random (rows, width) pairs, each run twice in a row,
timing collate, launch and wait (device synchronised) apart, first and
second pass side by side. Run on a GPU by ``bench/device.sh``; on the CPU by
its rehearsal.

``python -m bench.shape_cost MODEL_DIR --device cuda:0 --out FILE.json``
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def measure(model_dir: Path, device: str, shapes: int, max_rows: int, seed: int) -> dict[str, Any]:
    """First and second pass of ``shapes`` random batch shapes, median milliseconds per step."""
    import torch

    from worker.device import resolve_placement
    from worker.runner import Encoded, HFRunner

    placement = resolve_placement(device, "auto")
    runner = HFRunner(model_dir, placement)
    rng = random.Random(seed)
    fill = runner.pad_id + 1
    runner.forward(runner.collate([Encoded([fill] * 8, False)], [0]))  # context, first kernels
    passes: dict[str, list[dict[str, float]]] = {"first": [], "second": []}
    for _ in range(shapes):
        rows = rng.randint(1, max_rows)
        width = rng.randint(4, runner.max_length)
        encoded = [Encoded([fill] * rng.randint(max(1, width // 2), width), False)
                   for _ in range(rows)]
        for name in ("first", "second"):
            t0 = time.perf_counter()
            batch = runner.collate(encoded, list(range(rows)))
            t1 = time.perf_counter()
            handle = runner.launch(batch)
            t2 = time.perf_counter()
            runner.fetch(handle)
            if placement.is_cuda:
                torch.cuda.synchronize()
            t3 = time.perf_counter()
            passes[name].append({"collate": t1 - t0, "launch": t2 - t1, "wait": t3 - t2,
                                 "rows": rows, "width": batch.input_ids.shape[1]})
    out: dict[str, Any] = {"device": placement.describe(), "shapes": shapes,
                           "max_rows": max_rows}
    for name, runs in passes.items():
        out[name] = {step: 1000 * statistics.median(r[step] for r in runs)
                     for step in ("collate", "launch", "wait")}
        out[name]["total"] = sum(out[name].values())
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: print the medians and write them as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.shape_cost")
    parser.add_argument("model", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", type=int, default=40)
    parser.add_argument("--max-rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = measure(args.model, args.device, args.shapes, args.max_rows, args.seed)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for name in ("first", "second"):
        steps = result[name]
        print(f"{name:>6} pass (median ms): collate {steps['collate']:.2f}, launch "
              f"{steps['launch']:.2f}, wait {steps['wait']:.2f}, total {steps['total']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
