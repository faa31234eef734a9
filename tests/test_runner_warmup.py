"""The worker's start-up warm-up: every power-of-two batch shape within the token budget."""

from __future__ import annotations

from pathlib import Path

import torch

from worker.device import resolve_placement
from worker.runner import HFRunner, PaddedBatch


def test_warm_up_covers_each_width_and_row_count_within_the_budget(tiny_model_dir: Path) -> None:
    runner = HFRunner(tiny_model_dir, resolve_placement("cpu", "auto"))
    shapes: list[tuple[int, int]] = []
    forward = runner.forward

    def recording(batch: PaddedBatch) -> torch.Tensor:
        shapes.append(tuple(batch.input_ids.shape))  # type: ignore[arg-type]
        return forward(batch)

    runner.forward = recording  # type: ignore[method-assign]
    count = runner.warm_up(token_budget=1024, max_batch_size=64)
    assert count == len(shapes)
    widths = sorted({w for _, w in shapes})
    assert widths == [8, 16, 32, 64, runner.max_length]  # 128 for the tiny model
    for width in widths:
        rows = sorted(r for r, w in shapes if w == width)
        # 1, 2, 4, ... up to the batch cap or the budget, whichever binds first
        assert rows[0] == 1 and all(b == 2 * a for a, b in zip(rows, rows[1:], strict=False))
        assert rows[-1] == min(64, 1024 // width)
