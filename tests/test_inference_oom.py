"""OOM isolation on the CPU: a runner that raises torch.OutOfMemoryError past k rows.

infer_isolating must halve the batch until it fits, give every item its
prediction (the same as an unconstrained run), and fail a single item that
still does not fit alone, with a readable reason, without taking others down.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from contract.results import ResultStore
from contract.settings import Settings
from worker.app import build_runner
from worker.flush import FlushProcessor
from worker.inference import infer_isolating
from worker.runner import Encoded, PaddedBatch, Prediction, Runner

TEXTS = ["the hotel is good", "bad service", "这家酒店的服务很好", "i love this film",
         "terrible room", "not fun", "great", "房间也很干净", "boring movie", "happy"]


class OOMAbove:
    """Wraps a runner; ``forward`` raises a device OOM for batches over ``max_rows``
    rows, or for any batch holding a row listed in ``bad_rows``."""

    def __init__(self, inner: Runner, max_rows: int, bad_rows: Sequence[int] = ()) -> None:
        self.inner = inner
        self.name, self.revision, self.max_length = inner.name, inner.revision, inner.max_length
        self.max_rows = max_rows
        self.bad_rows = set(bad_rows)
        self.batch_sizes: list[int] = []

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        return self.inner.encode(texts)

    def collate(self, encoded: Sequence[Encoded], rows: list[int]) -> PaddedBatch:
        return self.inner.collate(encoded, rows)

    def forward(self, batch: PaddedBatch) -> torch.Tensor:
        self.batch_sizes.append(len(batch.rows))
        if len(batch.rows) > self.max_rows or self.bad_rows & set(batch.rows):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.forward(batch)

    def decode(self, probs: torch.Tensor) -> list[Prediction]:
        return self.inner.decode(probs)


@pytest.fixture(scope="module")
def runner(tiny_model_dir: Path) -> Runner:
    return build_runner(Settings(model=str(tiny_model_dir), device="cpu"))


def test_oom_halves_until_it_fits(runner: Runner) -> None:
    encoded = runner.encode(TEXTS)
    rows = list(range(len(TEXTS)))
    expected = infer_isolating(runner, encoded, rows)
    oom = OOMAbove(runner, max_rows=3)
    got = infer_isolating(oom, encoded, rows)
    assert sorted(got) == rows
    for r in rows:
        pred, ref = got[r], expected[r]
        assert isinstance(pred, Prediction) and isinstance(ref, Prediction)
        assert pred.label == ref.label
        assert pred.score == pytest.approx(ref.score, abs=1e-4)
    # 10 → 5 → 2/3: the first two levels raised, then every batch fitted.
    assert oom.batch_sizes[:3] == [10, 5, 2]
    assert max(s for s in oom.batch_sizes[1:] if s <= 3) <= 3


def test_single_item_oom_fails_alone(runner: Runner) -> None:
    encoded = runner.encode(TEXTS)
    rows = list(range(len(TEXTS)))
    got = infer_isolating(OOMAbove(runner, max_rows=100, bad_rows=[7]), encoded, rows)
    assert isinstance(got[7], str)
    assert got[7] == f"out of device memory on a single text of {len(encoded[7].ids)} tokens"
    assert all(isinstance(got[r], Prediction) for r in rows if r != 7)


def test_flush_stores_oom_failure_and_batch_mates(runner: Runner, sqlite_url: str) -> None:
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    settings = Settings(database_url=sqlite_url, token_budget=100_000)
    proc = FlushProcessor(OOMAbove(runner, max_rows=2, bad_rows=[4]), store, settings, "t@h")
    now = time.time()
    items = [{"id": f"t{i}", "text": t, "submitted_at": now} for i, t in enumerate(TEXTS)]
    stats = proc.process([("m1", [items])])
    rows = {r.id: r for r in store.query(limit=None)}
    store.close()
    assert stats.items == len(TEXTS) and stats.failed == 1
    # plan_batches sorts by length, so "terrible room" (t4) is wherever it sorts;
    # only it fails, with the reason stored.
    assert rows["t4"].status == "failed" and "out of device memory" in (rows["t4"].error or "")
    assert all(rows[f"t{i}"].status == "done" for i in range(len(TEXTS)) if i != 4)
