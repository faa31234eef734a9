"""One flush in-process: validation, isolation and persistence with a tiny real BERT."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from contract.results import ResultStore
from contract.settings import Settings
from worker.app import build_runner
from worker.flush import FlushProcessor
from worker.tasks import estimate_tokens


@pytest.fixture
def processor(tiny_model_dir: Path, store: ResultStore) -> FlushProcessor:
    s = Settings(model=str(tiny_model_dir), database_url="sqlite://", max_text_chars=1000,
                 token_budget=200)
    return FlushProcessor(build_runner(s), store, s, worker_name="t@h")


def test_flush_mixes_good_and_bad(processor: FlushProcessor, store: ResultStore) -> None:
    now = time.time()
    items = [
        {"id": "ok1", "text": "the hotel is good", "submitted_at": now, "source": "x"},
        {"id": "ok2", "text": "这家酒店的服务很好" * 40, "submitted_at": now},
        {"id": "empty", "text": "", "submitted_at": now},
        {"id": "extra", "text": "hi", "submitted_at": now, "evil": 1},
        {"text": "no id"},
        "not an object",
    ]
    stats = processor.process([("m1", [items]), ("m2", {"args": "wrong"})])
    assert stats.items == 7 and stats.failed == 5
    rows = {r.id: r for r in store.query(limit=None)}
    assert rows["ok1"].status == "done" and rows["ok1"].source == "x"
    assert rows["ok2"].status == "done" and rows["ok2"].truncated  # cut at 128 tokens
    assert rows["ok2"].tokens == 128
    assert "empty" in (rows["empty"].error or "")
    assert "unknown fields" in (rows["extra"].error or "")
    assert rows["malformed-m1-4"].error == "task item has no valid id"
    assert rows["malformed-m1-5"].status == "failed"
    assert "malformed message" in (rows["malformed-m2-0"].error or "")
    # token_budget 200 forces the 128-token text into a batch of its own
    assert stats.batches == 2 and rows["ok2"].batch_size == 1


def test_estimate_tokens_is_robust() -> None:
    assert estimate_tokens(([[{"text": "abcd"}, {"text": "xy"}]], {}, {})) == 10
    assert estimate_tokens(None) == 1
    assert estimate_tokens(([["nonsense"]], {}, {})) == 1
