"""Windows of long English texts are cut once, as planned: no window is re-cut into slivers.

With a SentencePiece tokenizer (XLM-R's Metaspace ``▁``) a word's token
starts at the space before it. A window's text kept the whitespace after its
last sentence, and encoded alone that space was one more token (a lone
``▁``) than the plan counted; a full window then overflowed and was planned
again into a full window and a sliver of a few tokens.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from contract.settings import Settings
from tests.tinybert import write_tiny_xlmr
from worker.app import build_runner
from worker.runner import HFRunner
from worker.tinybert import WORDS
from worker.windows import plan_windows, split_windows


@pytest.fixture(scope="module")
def xlmr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_xlmr(tmp_path_factory.mktemp("tiny-xlmr"))


def english(seed: int, sentences: int = 60) -> str:
    """Sentences of known words separated by single spaces."""
    rng = random.Random(seed)
    return " ".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) + rng.choice(".!?")
        for _ in range(sentences))


def runner_for(model: str, tiny_model_dir: Path, xlmr_dir: Path) -> HFRunner:
    model_dir = xlmr_dir if model == "xlmr" else tiny_model_dir
    runner = build_runner(Settings(model=str(model_dir), database_url="sqlite://",
                                   max_length=32))
    assert isinstance(runner, HFRunner)
    return runner


@pytest.mark.parametrize("model", ["xlmr", "bert"])
@pytest.mark.parametrize("seed", range(6))
def test_windows_are_cut_once_as_planned(model: str, seed: int, tiny_model_dir: Path,
                                         xlmr_dir: Path) -> None:
    runner = runner_for(model, tiny_model_dir, xlmr_dir)
    text = english(seed)
    offsets = runner.offsets(text)
    planned = plan_windows(text, offsets, runner.max_length - runner.special_tokens)
    windows = split_windows(runner, text, offsets)
    assert len(offsets) > 3 * runner.max_length
    for a, b in planned:
        alone = runner.encode([text[a:b]])[0]
        assert not alone.truncated, (text[a:b], len(alone.ids))
    assert [(w.start, w.end) for w in windows] == planned, [w.tokens for w in windows]
    for w in windows:
        assert not w.encoded.truncated and w.tokens <= runner.max_length
        assert w.encoded == runner.encode([text[w.start:w.end]])[0]


@pytest.mark.parametrize("model", ["xlmr", "bert"])
def test_windows_still_cover_every_word(model: str, tiny_model_dir: Path,
                                        xlmr_dir: Path) -> None:
    runner = runner_for(model, tiny_model_dir, xlmr_dir)
    text = "  " + english(7) + " \n"
    windows = split_windows(runner, text)
    covered = 0
    for w in windows:
        assert text[w.start:w.end] == text[w.start:w.end].strip()  # no edge whitespace
        assert not text[covered:w.start].strip(), (covered, w)  # gaps are whitespace only
        covered = max(covered, w.end)
    assert not text[covered:].strip()
