"""infer_pipelined: one batch in flight, same results, failures still per item (on the CPU)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from contract.settings import Settings
from worker.app import build_runner
from worker.batching import plan_batches
from worker.inference import infer_isolating, infer_pipelined
from worker.runner import Encoded, PaddedBatch, Prediction, Runner

TEXTS = ["the hotel is good", "bad service", "这家酒店的服务很好", "i love this film",
         "terrible room", "not fun", "great", "房间也很干净", "boring movie", "happy",
         "the movie was boring and the room was dirty but the service was great"]


class LateFailure:
    """Wraps a runner with launch/fetch; errors surface at fetch, as CUDA's do.

    Any batch holding a row in ``bad_rows`` fails when its results are
    fetched (and in ``forward``, which infer_isolating uses for the rerun).
    """

    asynchronous = True  # pipelined like a CUDA runner, though it computes on the CPU

    def __init__(self, inner: Any, bad_rows: Sequence[int]) -> None:
        self.inner = inner
        self.bad_rows = set(bad_rows)
        self.launched: list[list[int]] = []

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        return self.inner.encode(texts)

    def collate(self, encoded: Sequence[Encoded], rows: list[int]) -> PaddedBatch:
        return self.inner.collate(encoded, rows)

    def launch(self, batch: PaddedBatch) -> Any:
        self.launched.append(list(batch.rows))
        return batch, self.inner.launch(batch)

    def fetch(self, handle: Any) -> torch.Tensor:
        batch, inner = handle
        if self.bad_rows & set(batch.rows):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return self.inner.fetch(inner)

    def forward(self, batch: PaddedBatch) -> torch.Tensor:
        return self.fetch(self.launch(batch))

    def decode(self, probs: torch.Tensor) -> list[Prediction]:
        return self.inner.decode(probs)


@pytest.fixture(scope="module")
def runner(tiny_model_dir: Path) -> Runner:
    return build_runner(Settings(model=str(tiny_model_dir), device="cpu"))


def plan(encoded: Sequence[Encoded]) -> list[list[int]]:
    return plan_batches([len(e.ids) for e in encoded], token_budget=64, max_batch_size=3)


def test_same_predictions_as_one_batch_at_a_time(runner: Runner) -> None:
    encoded = runner.encode(TEXTS)
    batches = plan(encoded)
    assert len(batches) > 2
    expected: dict[int, Prediction | str] = {}
    for rows in batches:
        expected.update(infer_isolating(runner, encoded, rows))
    got = infer_pipelined(runner, encoded, batches)
    assert sorted(got) == list(range(len(TEXTS)))
    for i, pred in expected.items():
        assert isinstance(pred, Prediction)
        other = got[i]
        assert isinstance(other, Prediction) and other.label == pred.label
        for label, p in pred.scores.items():
            assert other.scores[label] == pytest.approx(p, abs=1e-6)


def test_a_late_error_fails_only_its_item(runner: Runner) -> None:
    encoded = runner.encode(TEXTS)
    batches = plan(encoded)
    bad = batches[1][0]
    wrapped = LateFailure(runner, [bad])
    got = infer_pipelined(wrapped, encoded, batches)
    assert sorted(got) == list(range(len(TEXTS)))
    assert isinstance(got[bad], str) and "device-side assert" in got[bad]
    assert all(isinstance(got[i], Prediction) for i in got if i != bad)
    # batch 2 is queued before batch 1 is fetched; every planned batch is
    # launched once, and the failing one is then rerun in halves
    assert wrapped.launched[:2] == batches[:2]
    assert all(b in wrapped.launched for b in batches)
    assert len(wrapped.launched) > len(batches)
    assert [bad] in wrapped.launched


def test_runner_without_launch_runs_sequentially(runner: Runner) -> None:
    class Plain:
        encode, collate, forward, decode = (runner.encode, runner.collate, runner.forward,
                                            runner.decode)

    encoded = runner.encode(TEXTS)
    got = infer_pipelined(Plain(), encoded, plan(encoded))  # type: ignore[arg-type]
    assert all(isinstance(p, Prediction) for p in got.values()) and len(got) == len(TEXTS)


def test_int8_runner_on_cpu(tiny_model_dir: Path, runner: Runner) -> None:
    """BERTSTREAM_DTYPE=int8: Linear layers quantized, rows marked, predictions close to fp32."""
    int8 = build_runner(Settings(model=str(tiny_model_dir), device="cpu", dtype="int8"))
    assert isinstance(int8.model.bert.encoder.layer[0].intermediate.dense,  # type: ignore[attr-defined]
                      torch.ao.nn.quantized.dynamic.Linear)
    assert int8.revision.endswith("+int8") and not (runner.revision or "").endswith("+int8")
    encoded = runner.encode(TEXTS)
    rows = list(range(len(TEXTS)))
    fp32 = runner.decode(runner.forward(runner.collate(encoded, rows)))
    q = int8.decode(int8.forward(int8.collate(encoded, rows)))
    for a, b in zip(fp32, q, strict=True):
        assert abs(sum(b.scores.values()) - 1.0) < 1e-5
        for label, p in a.scores.items():
            assert b.scores[label] == pytest.approx(p, abs=0.05)
