"""Hop 3, infer: run planned batches, isolating the items a model cannot take.

An out-of-memory error halves the batch and retries, down to one item; any
other exception from the model bisects the batch the same way, so one bad
item fails alone while its batch-mates get their predictions. A text with a
token id the model's embedding table lacks fails before any forward pass (on
CUDA such an id is a device-side assert that breaks the whole process), with
the runner's reason and without bisecting its batch. A text whose scores come
out NaN or infinite (a float16 overflow, weights holding NaN) fails alone too:
such a score cannot be stored or sent as JSON, and a label picked among NaNs
means nothing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from worker.runner import Encoded, PaddedBatch, Prediction, Runner

log = logging.getLogger(__name__)


@dataclass
class InferTimings:
    """Host seconds of one :func:`infer_pipelined` call, by step (the flush log shows them).

    ``wait_s`` is time blocked until the device finished a batch: a GPU run
    whose host steps add up to more than its wait is limited by Python, not
    by the device. On the CPU (no overlap) ``launch_s`` is the whole forward.
    """

    collate_s: float = 0.0
    launch_s: float = 0.0
    wait_s: float = 0.0
    decode_s: float = 0.0


def is_oom(exc: BaseException) -> bool:
    """True for a device out-of-memory error (CUDA raises it as a RuntimeError)."""
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def screen_token_ids(
    runner: Runner, encoded: Sequence[Encoded], rows: list[int]
) -> tuple[list[int], dict[int, Prediction | str]]:
    """``rows`` split into those the model can take and the failed ones with their reason.

    A row fails here when it holds a token id beyond the model's embedding table
    (the runner's ``token_id_error``; a runner without one takes every row): it is
    never run, so it can neither raise in the model nor poison a CUDA process.
    """
    check: Callable[[Sequence[int]], str | None] | None = getattr(
        runner, "token_id_error", None)
    if check is None:
        return rows, {}
    failed: dict[int, Prediction | str] = {}
    for r in rows:
        why = check(encoded[r].ids)
        if why is not None:
            failed[r] = why
    if not failed:
        return rows, failed
    return [r for r in rows if r not in failed], failed


def non_finite_reason(runner: Runner, pred: Prediction, tokens: int) -> str | None:
    """Why ``pred`` cannot be served (a NaN or infinite probability), or None.

    The hint depends on the precision: in float16 an activation past 65504
    overflows (bfloat16 or float32 avoid it); otherwise the weights are suspect.
    """
    bad = [p for p in pred.scores.values() if not math.isfinite(p)]
    if not bad and math.isfinite(pred.score):
        return None
    kind = "NaN" if not bad or any(math.isnan(p) for p in bad) else "infinite"
    placement = getattr(runner, "placement", None)
    dtype = getattr(placement, "dtype", None)
    if dtype == torch.float16:
        hint = ("float16 overflows past 65504 on some inputs: BERTSTREAM_DTYPE=bfloat16 "
                "or float32 avoids it")
    else:
        hint = "the model's weights may hold NaN or infinite values"
    return f"the model gave {kind} scores for this text ({tokens} tokens): {hint}"


def _vetted(runner: Runner, encoded: Sequence[Encoded], rows: Sequence[int],
            preds: Sequence[Prediction]) -> dict[int, Prediction | str]:
    """``preds`` by row, a non-finite one replaced by its reason (the others are kept)."""
    out: dict[int, Prediction | str] = {}
    bad = 0
    for r, pred in zip(rows, preds, strict=True):
        why = non_finite_reason(runner, pred, len(encoded[r].ids))
        out[r] = pred if why is None else why
        bad += why is not None
    if bad:
        log.warning("%d of %d text(s) got NaN or infinite scores from the model; failed "
                    "alone", bad, len(rows))
    return out


def infer_isolating(
    runner: Runner, encoded: Sequence[Encoded], rows: list[int]
) -> dict[int, Prediction | str]:
    """Predictions for ``rows`` of ``encoded``; a failed row maps to its reason.

    Takes one planned batch. Gives every row exactly once: a
    :class:`Prediction`, or a readable error string when that row alone
    still fails, holds a token id the model lacks (failed unrun) or got
    NaN or infinite scores. Never raises for a model-side error.
    """
    rows, out = screen_token_ids(runner, encoded, rows)
    if rows:
        out.update(_isolate(runner, encoded, rows))
    return out


def _isolate(
    runner: Runner, encoded: Sequence[Encoded], rows: list[int]
) -> dict[int, Prediction | str]:
    """:func:`infer_isolating` on screened rows: bisects a failing batch down to one row."""
    try:
        batch = runner.collate(encoded, rows)
        preds = runner.decode(runner.forward(batch))
        return _vetted(runner, encoded, rows, preds)
    # Broad on purpose: whatever the model raises, it must not take the
    # batch-mates of the offending item down with it.
    except Exception as exc:  # noqa: BLE001
        oom = is_oom(exc)
        error = f"{type(exc).__name__}: {exc}"
    # Retried only here, after the except clause: the exception's traceback
    # holds the failed forward pass's frames and so its activations, and on a
    # real device OOM that memory must be free before the halves run.
    if oom and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(rows) == 1:
        n = len(encoded[rows[0]].ids)
        if oom:
            return {rows[0]: f"out of device memory on a single text of {n} tokens"}
        return {rows[0]: f"model error on this text ({n} tokens): {error}"}
    log.warning("%s on a batch of %d; retrying in halves",
                "out of memory" if oom else error.split(":", 1)[0], len(rows))
    half = len(rows) // 2
    out = _isolate(runner, encoded, rows[:half])
    out.update(_isolate(runner, encoded, rows[half:]))
    return out


def infer_pipelined(
    runner: Runner, encoded: Sequence[Encoded], batches: Sequence[list[int]],
    on_done: Callable[[int, dict[int, Prediction | str]], None] | None = None,
    timings: InferTimings | None = None,
) -> dict[int, Prediction | str]:
    """Every planned batch, with one batch in flight on the device.

    While the GPU runs batch i, the host pads batch i+1 (into pinned memory)
    and queues it, then turns batch i's probabilities into predictions: the
    device never waits for Python between batches (the pre/core/post overlap
    of docs/architecture.md). Runners that are not ``asynchronous`` (the CPU, which
    computes at launch) or lack ``launch``/``fetch`` run one batch after
    another. A batch that fails, at launch or when its results
    are fetched (CUDA reports some errors late), is rerun through
    :func:`infer_isolating`, so failures stay per item exactly as before.

    ``on_done(k, results)`` is called once batch ``k`` has its results (with
    everything finished so far); on CUDA it runs while batch ``k + 1`` is
    computing, so work done there (a partial commit) overlaps the device.
    ``timings``, when given, accumulates the host time of each step.
    """
    launch = getattr(runner, "launch", None)
    fetch = getattr(runner, "fetch", None)
    done = on_done or _ignore
    clock = timings if timings is not None else InferTimings()
    out: dict[int, Prediction | str] = {}
    if launch is None or fetch is None or not getattr(runner, "asynchronous", False):
        # Nothing to overlap (the CPU computes at launch): one batch at a
        # time, so each batch's results are reported as soon as they exist.
        for k, rows in enumerate(batches):
            t0 = time.perf_counter()
            out.update(infer_isolating(runner, encoded, rows))
            clock.launch_s += time.perf_counter() - t0
            done(k, out)
        return out

    def finish(k: int, rows: list[int], handle: Any) -> None:
        preds = None
        if handle is not None:
            try:
                t0 = time.perf_counter()
                probs = fetch(handle)
                t1 = time.perf_counter()
                preds = runner.decode(probs)
                clock.wait_s += t1 - t0
                clock.decode_s += time.perf_counter() - t1
            except Exception:  # noqa: BLE001 - rerun isolated (below), which keeps the reason
                preds = None
        if preds is not None:
            out.update(_vetted(runner, encoded, rows, preds))
        elif rows:  # none when every row of the batch failed screening: nothing was run
            # Outside the except clause, so the failed batch's memory is free first.
            out.update(_isolate(runner, encoded, rows))
        done(k, out)

    in_flight: tuple[int, list[int], Any] | None = None
    for k, planned in enumerate(batches):
        rows, failed = screen_token_ids(runner, encoded, planned)
        out.update(failed)
        handle = _start(runner, launch, encoded, rows, clock) if rows else None
        if in_flight is not None:
            finish(*in_flight)
        in_flight = (k, rows, handle)
    if in_flight is not None:
        finish(*in_flight)
    return out


def _start(runner: Runner, launch: Callable[[PaddedBatch], Any], encoded: Sequence[Encoded],
           rows: list[int], clock: InferTimings) -> Any:
    """Collate and launch ``rows``: the handle, or None when that fails (the caller
    reruns them isolated, after the batch in flight)."""
    try:
        t0 = time.perf_counter()
        batch = runner.collate(encoded, rows)
        t1 = time.perf_counter()
        handle = launch(batch)
        clock.collate_s += t1 - t0
        clock.launch_s += time.perf_counter() - t1
        return handle
    except Exception:  # noqa: BLE001 - isolated by the caller
        return None


def _ignore(_k: int, _out: dict[int, Prediction | str]) -> None:
    return None
