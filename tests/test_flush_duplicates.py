"""Two copies of one id in one flush: the rows, windows and counts follow the store's rule.

``ResultStore.upsert`` keeps, per (id, model), the first ``done`` record of a
batch, else the last one. The flush must pick a long text's window rows, and
count the rows it stored, by that same rule; and an id already ``done`` is
not run again, however many copies of it a flush holds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from contract.results import ResultStore
from contract.settings import Settings
from worker.app import build_runner
from worker.flush import FlushProcessor

LONG = " ".join(["the hotel is very good ."] * 30)  # several windows at max_length 32


class Recording:
    """The tiny model, remembering every text it was asked to tokenize."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.texts: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, texts: list[str]) -> Any:
        self.texts.extend(texts)
        return self.inner.encode(texts)


@pytest.fixture
def processor(tiny_model_dir: Path, store: ResultStore) -> FlushProcessor:
    s = Settings(model=str(tiny_model_dir), database_url="sqlite://", max_length=32)
    return FlushProcessor(Recording(build_runner(s)), store, s,  # type: ignore[arg-type]
                          worker_name="t@h")


def _copy(kind: str, now: float) -> dict[str, Any]:
    """A copy of id ``dup`` that ends ``kind``: expired, failed, or a long text scored done."""
    if kind == "expired":
        return {"id": "dup", "text": LONG, "submitted_at": now - 60, "expires_at": now - 1}
    if kind == "failed":
        return {"id": "dup", "text": "", "submitted_at": now}
    return {"id": "dup", "text": LONG, "submitted_at": now}


@pytest.mark.parametrize("order", [("expired", "done"), ("failed", "done"),
                                   ("done", "expired")])
def test_a_long_text_stored_done_keeps_its_windows_beside_another_copy(
        processor: FlushProcessor, store: ResultStore, order: tuple[str, str]) -> None:
    """The done copy's row is the one stored, so its windows are the ones written (they
    used to be taken from the first copy: an expired or failed first copy left the done
    row with ``windows`` = 8 and no window rows). One row counted, the done one."""
    now = time.time()
    stats = processor.process([(f"m{n}", [[_copy(kind, now)]]) for n, kind in enumerate(order)])
    row, windows = store.get_windows("dup")
    assert row is not None and row.status == "done"
    assert row.windows is not None and row.windows > 2
    assert [w.window for w in windows] == list(range(row.windows))
    assert windows[-1].end_char == len(LONG)
    assert [status for status, *_ in stats.rows] == ["done"]


def test_two_copies_count_one_row_the_last_when_none_is_done(
        processor: FlushProcessor, store: ResultStore) -> None:
    now = time.time()
    stats = processor.process([("m0", [[_copy("failed", now)]]),
                               ("m1", [[_copy("expired", now)]])])
    row = store.get("dup")
    assert row is not None and row.status == "expired"
    assert [status for status, *_ in stats.rows] == ["expired"]
    assert stats.unwritable == set()


def test_every_copy_of_an_id_already_done_skips_the_model(
        processor: FlushProcessor, store: ResultStore) -> None:
    """Two copies of a done id in one flush: neither runs (the first used to), none is
    counted as a stored row, and the done row is left as it was."""
    now = time.time()
    item = {"id": "k", "text": "the hotel is good", "submitted_at": now}
    processor.process([("m0", [[item]])])
    runner: Recording = processor.runner  # type: ignore[assignment]
    runner.texts.clear()
    stats = processor.process([("m1", [[item]]), ("m2", [[item]])])
    assert runner.texts == [] and stats.batches == 0
    assert stats.skipped == 2 and stats.rows == [] and stats.unwritable == set()
    row = store.get("k")
    assert row is not None and row.status == "done" and row.attempts == 1
