"""One flush in-process: validation, isolation and persistence with a tiny real BERT."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from contract.results import ResultStore
from contract.settings import Settings
from worker import flush
from worker.app import build_runner
from worker.flush import FlushProcessor, _EarlyCommits
from worker.tasks import estimate_tokens


@pytest.fixture
def processor(tiny_model_dir: Path, store: ResultStore) -> FlushProcessor:
    # long_texts=truncate: the cut-off behaviour (tests/test_long_texts.py covers chunking)
    s = Settings(model=str(tiny_model_dir), database_url="sqlite://", max_text_chars=1000,
                 token_budget=200, long_texts="truncate")
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
    assert rows["ok2"].tokens == 128 and rows["ok2"].windows is None
    assert "empty" in (rows["empty"].error or "")
    assert "unknown fields" in (rows["extra"].error or "")
    assert (rows["malformed-m1-4"].error or "").startswith("task item has no valid id")
    assert rows["malformed-m1-5"].status == "failed"
    assert "malformed message" in (rows["malformed-m2-0"].error or "")
    # token_budget 200 forces the 128-token text into a batch of its own
    assert stats.batches == 2 and rows["ok2"].batch_size == 1


def test_estimate_tokens_is_robust() -> None:
    assert estimate_tokens(([[{"text": "abcd"}, {"text": "xy"}]], {}, {})) == 10
    assert estimate_tokens(None) == 1
    assert estimate_tokens(([["nonsense"]], {}, {})) == 1


class Wrapped:
    """The tiny model's runner, every attribute passed through; subclasses change one step."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class SlowLongTexts(Wrapped):
    """The tiny model, but a batch wider than 40 tokens takes 0.6 s (like a long text on CPU)."""

    def forward(self, batch: object) -> object:
        if batch.input_ids.shape[1] > 40:  # type: ignore[attr-defined]
            time.sleep(0.6)
        return self.inner.forward(batch)  # type: ignore[attr-defined]

    def launch(self, batch: object) -> object:
        return self.forward(batch)

    def fetch(self, handle: object) -> object:
        return handle


def test_short_rows_commit_before_a_long_text_finishes(
    tiny_model_dir: Path, store: ResultStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tiny model is too fast for the cost estimate to expect a wait: the
    # slow long batch is injected, so the estimate's threshold is lowered.
    monkeypatch.setattr(flush, "EARLY_COMMIT_MIN_WAIT_S", 0.0)
    s = Settings(model=str(tiny_model_dir), database_url="sqlite://", token_budget=4096)
    proc = FlushProcessor(SlowLongTexts(build_runner(s)), store, s,  # type: ignore[arg-type]
                          worker_name="t@h")
    now = time.time()
    short = [{"id": f"s{i}", "text": "the hotel is good", "submitted_at": now} for i in range(5)]
    long = [{"id": "long", "text": "the movie was boring and the room was dirty " * 8,
             "submitted_at": now}]
    stats = proc.process([("m1", [short + long])])
    assert stats.items == 6 and stats.failed == 0 and stats.batches == 2
    assert stats.commits == 2  # the short batch's rows, then the long text's
    rows = {r.id: r for r in store.query(limit=None)}
    assert all(rows[f"s{i}"].status == "done" for i in range(5)) and rows["long"].status == "done"
    waited = (rows["long"].finished_at - rows["s0"].finished_at).total_seconds()
    assert waited >= 0.5, "the short rows must not wait for the long text"


def test_one_commit_when_the_flush_is_quick(processor: FlushProcessor, store: ResultStore,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiny model's batches take milliseconds; a threshold of 1 s (not 0.1 s) keeps a
    # GC pause or a loaded CI machine from making this flush look slow, while an estimate
    # gone wrong by orders of magnitude still trips it.
    monkeypatch.setattr(flush, "EARLY_COMMIT_MIN_WAIT_S", 1.0)
    now = time.time()
    items = [{"id": f"q{i}", "text": "good " * (1 + i * 5), "submitted_at": now} for i in range(6)]
    stats = processor.process([("m1", [items])])
    assert stats.commits == 1 and stats.items == 6


class SlowTokenizer(Wrapped):
    """The tiny model, but tokenizing a flush takes 0.3 s; the batches are quick."""

    def encode(self, texts: object) -> object:
        time.sleep(0.3)
        return self.inner.encode(texts)  # type: ignore[attr-defined]


def test_tokenizing_time_does_not_count_as_batch_time(
    tiny_model_dir: Path, store: ResultStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rest of a flush is estimated from the batches run so far, not from the time spent
    tokenizing the whole flush before them: slow tokenizing and quick batches, one commit."""
    # Counting the 0.3 s of tokenizing would estimate the rest at >= 0.6 s after the first
    # of three batches; quick batches estimate milliseconds. 0.3 s lies between, with room
    # for a loaded machine.
    monkeypatch.setattr(flush, "EARLY_COMMIT_MIN_WAIT_S", 0.3)
    s = Settings(model=str(tiny_model_dir), database_url="sqlite://", token_budget=64)
    proc = FlushProcessor(SlowTokenizer(build_runner(s)), store, s,  # type: ignore[arg-type]
                          worker_name="t@h")
    now = time.time()
    items = [{"id": f"t{i}", "text": "good " * (1 + i), "submitted_at": now} for i in range(12)]
    stats = proc.process([("m1", [items])])
    assert stats.items == 12 and stats.batches >= 3
    assert stats.commits == 1


def test_early_commit_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    """A partial commit when the rest of the flush should take >= 0.1 s, not too often."""
    monkeypatch.setattr(flush, "EARLY_COMMIT_EVERY_S", 60.0)  # no timing race in the test
    cost = [8 * 10, 500]  # padded tokens per batch: 80 tokens done, 500 to go
    t0 = time.perf_counter() - 0.03  # the first batch took >= 30 ms: >= 0.375 ms/token
    early = _EarlyCommits(cost, t0)
    assert early.due(0)  # >= 500 tokens x 0.375 ms = 190 ms still to run
    early.committed()
    assert not early.due(0)  # too soon after the last partial commit
    assert not early.due(1)  # nothing left: the final commit follows
    # 12 tokens left: under 100 ms even if this test stalls for half a second
    quick = _EarlyCommits([8 * 10, 12], time.perf_counter() - 0.005)
    assert not quick.due(0)


class RecordingRunner(Wrapped):
    """The tiny model, remembering every text it tokenized."""

    def __init__(self, inner: object) -> None:
        super().__init__(inner)
        self.texts: list[str] = []

    def encode(self, texts: list[str]) -> object:
        self.texts.extend(texts)
        return self.inner.encode(texts)  # type: ignore[attr-defined]


def test_ids_already_done_skip_the_model(tiny_model_dir: Path, store: ResultStore) -> None:
    s = Settings(model=str(tiny_model_dir), database_url="sqlite://")
    runner = RecordingRunner(build_runner(s))
    processor = FlushProcessor(runner, store, s, worker_name="t@h")  # type: ignore[arg-type]
    now = time.time()
    first = processor.process([("m1", [[{"id": "k", "text": "the first text", "submitted_at": now},
                                        {"id": "f", "text": "", "submitted_at": now}]])])
    assert first.skipped == 0 and runner.texts == ["the first text"]
    runner.texts.clear()
    # k again with another text, f (failed) again, and a new id: only f and new run
    again = processor.process([("m2", [[
        {"id": "k", "text": "a different text", "submitted_at": now},
        {"id": "f", "text": "now with a text", "submitted_at": now},
        {"id": "new", "text": "something new", "submitted_at": now}]])])
    assert again.skipped == 1 and again.unwritable == set()
    assert sorted(runner.texts) == ["now with a text", "something new"]
    rows = {r.id: r for r in store.query(limit=None)}
    assert rows["k"].text == "the first text" and rows["k"].attempts == 1  # the done row stays
    assert rows["f"].status == "done" and rows["new"].status == "done"
