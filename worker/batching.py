"""Cutting a flush into model batches: sort by length, fill a token budget, cap the padding.

Padding is what batching wastes: every row of a batch is padded to its
longest row. Sorting the flush by token length first and cutting it where
``rows x longest`` would pass the budget, or the padding would pass a
fraction of the real tokens, keeps rows of similar length together, so padded
tokens stay a small fraction of real ones (``bertstream bench`` measures it
against fixed-count FIFO batches).
"""

from __future__ import annotations

from collections.abc import Sequence

#: Padded tokens a batch may always carry, whatever ``max_padding`` says.
#: A forward pass has a fixed cost: e5-small on 2 CPU cores takes ~15 ms for
#: one text plus ~0.3 ms per token, so one extra pass costs about as much as
#: 50 padded tokens. Letting small batches absorb up to 32 padded tokens
#: instead of running alone cut the modelled cost of 3- and 8-text flushes
#: of the social-media mix by 15% while 64- and 256-text flushes stay under
#: 10% padding (bench/README.md, "padding").
SLACK_TOKENS = 32


def plan_batches(
    lengths: Sequence[int], *, token_budget: int, max_batch_size: int,
    max_padding: float | None = 0.10, slack_tokens: int = SLACK_TOKENS,
) -> list[list[int]]:
    """Group item indices into batches, shortest first.

    Takes the token length of each item. Gives lists of indices into
    ``lengths``; every index appears exactly once. Guarantees each batch has
    at most ``max_batch_size`` rows, ``rows x longest <= token_budget`` and
    padded tokens ``<= max(max_padding x real tokens, slack_tokens)`` (None:
    no padding cap), except that an item longer than the budget forms a
    batch alone.

    One greedy walk over the length-sorted items: the next item (the longest
    so far) joins the batch unless that would break one of the three bounds.
    The padding cap matters on a long-tailed length mix: a flush of mostly
    short posts with a few long ones would otherwise pad every short post in
    the last batch to the longest one.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for idx in order:
        n = lengths[idx]  # sorted, so n is the batch's longest if it joins
        rows = len(current) + 1
        if current and (
            rows > max_batch_size
            or rows * n > token_budget
            or (max_padding is not None
                and rows * n - (real + n) > max(max_padding * (real + n), slack_tokens))
        ):
            batches.append(current)
            current, real = [], 0
        current.append(idx)
        real += n
    if current:
        batches.append(current)
    return batches


def padding_waste(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Padded tokens divided by real tokens for ``batches`` over ``lengths``."""
    real = sum(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return (padded - real) / real if real else 0.0


def fifo_batches(count: int, batch_size: int) -> list[list[int]]:
    """Fixed-count batches in arrival order (the naive baseline)."""
    return [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]
