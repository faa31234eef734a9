"""Cutting flushes into token-budget batches."""

from __future__ import annotations

import random

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
