"""Windows at the smallest limits a SentencePiece model allows (BERTSTREAM_MAX_LENGTH 3 to 5).

Encoded alone, a piece of a word can gain a token: a lone "▁" that shares
its start with the word after it. A window that overflows so is planned
again with one token less per try; at these limits that went to 0 (ValueError
from ``range``, the whole flush failed) and a piece between two tokens that
share a start came out as an empty window.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from contract.constants import STATUS_DONE
from contract.results import ResultStore
from contract.settings import Settings
from tests.tinybert import XLMR_DIGIT_RUNS, write_tiny_xlmr
from worker.app import build_runner
from worker.flush import FlushProcessor
from worker.runner import HFRunner
from worker.windows import split_windows

PIECES = ["the hotel is good", "1234567890", "567", "890 567", "这家酒店的服务很好", "。",
          "! ", ". ", "\n", "  ", "very", "terrible", "xyz", *XLMR_DIGIT_RUNS]


@pytest.fixture(scope="module")
def xlmr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_xlmr(tmp_path_factory.mktemp("tiny-xlmr"))


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) + rng.choice(["", " "])
                    for _ in range(rng.randint(5, 60))) for _ in range(n)]


@pytest.mark.parametrize("max_length", [3, 4, 5])
def test_windows_are_never_empty_and_cover_the_text(xlmr_dir: Path, max_length: int) -> None:
    runner = build_runner(Settings(model=str(xlmr_dir), database_url="sqlite://",
                                   max_length=max_length))
    assert isinstance(runner, HFRunner) and runner.special_tokens == 2
    for text in texts(60):
        windows = split_windows(runner, text)
        covered = 0
        for w in windows:
            assert w.start < w.end, (text, w)
            assert not text[covered:w.start].strip(), (text, w)  # no gap but whitespace
            covered = max(covered, w.end)
            assert w.tokens <= max_length
            assert runner.encode([text[w.start:w.end]])[0] == w.encoded
        assert not text[covered:].strip()


def test_a_flush_at_the_smallest_limit_stores_long_texts(xlmr_dir: Path, tmp_path: Path) -> None:
    settings = Settings(model=str(xlmr_dir), database_url=f"sqlite:///{tmp_path / 'r.db'}",
                        max_length=3)
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    try:
        items = [{"id": f"t{i}", "text": t, "submitted_at": time.time()}
                 for i, t in enumerate(texts(10, seed=1))]
        FlushProcessor(build_runner(settings), store, settings, "t@h").process(
            [("m1", [items])])
        rows = store.get_many([it["id"] for it in items])
        assert {r.status for r in rows.values()} == {STATUS_DONE}, [
            r.error for r in rows.values()]
        assert all(r.windows and r.windows > 1 for r in rows.values())
    finally:
        store.close()
