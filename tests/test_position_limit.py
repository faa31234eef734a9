"""The token limit of a RoBERTa-family model whose tokenizer reports no limit.

RoBERTa, XLM-R, CamemBERT... number positions from ``padding_idx + 1``, so
``max_position_embeddings - padding_idx - 1`` tokens fit (roberta-base: 514,
512). A tokenizer saved without ``model_max_length`` reports HF's "no
limit"; the worker then took ``max_position_embeddings`` itself as the limit,
and every text at it, and every window of a long text, failed with an
IndexError in the position embedding.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from contract.constants import STATUS_DONE
from contract.results import ResultStore
from contract.settings import Settings
from tests.tinybert import write_tiny_xlmr
from worker.app import build_runner
from worker.flush import FlushProcessor
from worker.runner import HFRunner, _unused_positions

POSITIONS = 34  # pad_token_id 1: positions 2..33, 32 tokens


@pytest.fixture(scope="module")
def xlmr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_xlmr(tmp_path_factory.mktemp("tiny-xlmr"), max_positions=POSITIONS)


def words(n: int) -> str:
    """A text of ``n`` tokens without the special tokens (each word is one token)."""
    return " ".join(["good"] * n)


def test_the_limit_leaves_out_the_positions_roberta_skips(xlmr_dir: Path,
                                                          tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer, BertForSequenceClassification

    assert AutoTokenizer.from_pretrained(str(xlmr_dir)).model_max_length > 10**20  # "no limit"
    runner = build_runner(Settings(model=str(xlmr_dir), database_url="sqlite://"))
    assert isinstance(runner, HFRunner)
    assert runner.max_length == POSITIONS - 2
    bert = BertForSequenceClassification.from_pretrained(str(tiny_model_dir))
    assert _unused_positions(bert, bert.config.max_position_embeddings) == 0  # BERT: from 0


def test_texts_at_and_past_the_table_size_are_stored_done(xlmr_dir: Path,
                                                          tmp_path: Path) -> None:
    """The texts that were one pass past the usable positions (and so failed) are now
    scored in windows; the one at the real limit in one pass; a long text whole."""
    settings = Settings(model=str(xlmr_dir), database_url=f"sqlite:///{tmp_path / 'r.db'}")
    runner = build_runner(settings)
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    try:
        sizes = {"at-limit": POSITIONS - 2, "one-over": POSITIONS - 1, "table": POSITIONS}
        items = [{"id": key, "text": words(n - 2), "submitted_at": time.time()}
                 for key, n in sizes.items()]
        long_text = "the hotel is good. the room was dirty! " * 20
        items.append({"id": "long", "text": long_text, "submitted_at": time.time()})
        FlushProcessor(runner, store, settings, "t@h").process([("m1", [items])])
        rows = store.get_many([*sizes, "long"])
        assert {k: (r.status, r.error) for k, r in rows.items()} == {
            k: (STATUS_DONE, None) for k in [*sizes, "long"]}
        assert rows["at-limit"].tokens == POSITIONS - 2 and rows["at-limit"].windows is None
        assert rows["one-over"].windows == rows["table"].windows == 2
        assert rows["long"].windows is not None and rows["long"].windows > 3
        assert not any(r.truncated for r in rows.values())
    finally:
        store.close()
