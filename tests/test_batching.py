"""Cutting flushes into token-budget batches."""

from __future__ import annotations

import random

import pytest

from worker.batching import fifo_batches, padding_waste, plan_batches


def social_mix(n: int, seed: int = 0) -> list[int]:
    """Token lengths like social-media posts: many short, a long tail."""
    rng = random.Random(seed)
    return [min(512, int(rng.lognormvariate(3.0, 0.8)) + 3) for _ in range(n)]


def test_every_item_once_and_budget_respected() -> None:
    lengths = social_mix(2000)
    batches = plan_batches(lengths, token_budget=4096, max_batch_size=64)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 64
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 4096


def waste_of(lengths: list[int], batch: list[int]) -> float:
    real = sum(lengths[i] for i in batch)
    return (len(batch) * max(lengths[i] for i in batch) - real) / real


@pytest.mark.parametrize("cap", [0.0, 0.05, 0.10, 0.5])
def test_padding_cap_holds_for_every_batch(cap: float) -> None:
    lengths = social_mix(3000, seed=5)
    batches = plan_batches(lengths, token_budget=8192, max_batch_size=256, max_padding=cap,
                           slack_tokens=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(waste_of(lengths, b) <= cap + 1e-12 for b in batches)
    if cap == 0.0:  # no padding at all: every batch holds one length only
        assert all(len({lengths[i] for i in b}) == 1 for b in batches)


def test_slack_lets_small_batches_pad_a_little() -> None:
    """Three short texts run as one forward pass, not three, when padding them costs little."""
    assert len(plan_batches([7, 9, 12], token_budget=8192, max_batch_size=256)) == 1
    assert len(plan_batches([7, 9, 12], token_budget=8192, max_batch_size=256,
                            slack_tokens=0)) == 3
    lengths = social_mix(2000, seed=9)
    for b in plan_batches(lengths, token_budget=8192, max_batch_size=256, slack_tokens=32):
        padded = len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b)
        assert padded <= max(0.10 * sum(lengths[i] for i in b), 32)


def test_small_flush_with_a_long_tail() -> None:
    """60 short posts and 4 long ones: without the cap the short ones are padded to the longest."""
    lengths = [12] * 30 + [15] * 30 + [200, 210, 400, 480]
    uncapped = plan_batches(lengths, token_budget=8192, max_batch_size=256, max_padding=None)
    capped = plan_batches(lengths, token_budget=8192, max_batch_size=256, max_padding=0.10)
    assert padding_waste(lengths, uncapped) > 0.3  # the 200-token post padded to 480, ...
    assert padding_waste(lengths, capped) <= 0.10
    assert len(capped) <= 5


def test_oversized_item_runs_alone() -> None:
    batches = plan_batches([5, 9000, 7], token_budget=1000, max_batch_size=8)
    assert [1] in batches and sorted(i for b in batches for i in b) == [0, 1, 2]


def test_sorted_batches_waste_far_less_than_fifo() -> None:
    lengths = social_mix(5000, seed=3)
    planned = padding_waste(lengths, plan_batches(lengths, token_budget=8192, max_batch_size=128))
    fifo = padding_waste(lengths, fifo_batches(len(lengths), 32))
    assert planned < 0.10
    assert fifo > 3 * planned


def test_empty_flush() -> None:
    assert plan_batches([], token_budget=10, max_batch_size=2) == []
    assert padding_waste([], []) == 0.0
