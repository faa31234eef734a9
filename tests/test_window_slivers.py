"""Windows of long English texts are cut once, as planned: no window is re-cut into slivers.

With a SentencePiece tokenizer (XLM-R's Metaspace ``▁``) a word's token
starts at the space before it. A window's text kept the whitespace after its
last sentence, and encoded alone that space was one more token (a lone
``▁``) than the plan counted; a full window then overflowed and was planned
again into a full window and a sliver of a few tokens.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from contract.settings import Settings
from tests.tinybert import XLMR_DIGIT_RUNS, write_tiny_xlmr
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


#: Characters the tiny XLM-R holds (tests/tinybert.py), none with a word-start "▁".
HANZI = "这家酒店的服务很好房间也干净"


def chinese(seed: int, sentences: int = 40) -> str:
    """Sentences of known characters ending in ``。！？``, without spaces: every
    sentence but the first starts inside a SentencePiece word."""
    rng = random.Random(seed)
    return "".join("".join(rng.choice(HANZI) for _ in range(rng.randint(3, 20)))
                   + rng.choice("。。。！？") for _ in range(sentences))


def glued(seed: int, words: int = 120) -> str:
    """Words with digit runs glued to them (``good1234``), one long sentence and
    sentences after ``。``: a window cut inside such a word starts at the digits."""
    rng = random.Random(seed)
    out = []
    for _ in range(words):
        out.append(rng.choice(WORDS) + rng.choice(XLMR_DIGIT_RUNS) * rng.randint(0, 2))
        if rng.random() < 0.05:
            out[-1] += "。" + rng.choice(XLMR_DIGIT_RUNS)
    return " ".join(out) + "."


def assert_cut_once_as_planned(runner: HFRunner, text: str,
                               caplog: pytest.LogCaptureFixture) -> None:
    offsets = runner.offsets(text)
    with caplog.at_level(logging.WARNING, logger="worker.windows"):
        windows = split_windows(runner, text, offsets)
    assert len(offsets) > 3 * runner.max_length
    # no window was re-cut: _fit warns on every re-cut
    assert not caplog.records, ([r.getMessage() for r in caplog.records],
                                [w.tokens for w in windows])
    budget = runner.max_length - runner.special_tokens
    planned = plan_windows(text, offsets, budget, lambda span: len(runner.offsets(span)))
    for a, b in planned:
        alone = runner.encode([text[a:b]])[0]
        assert not alone.truncated, (text[a:b], len(alone.ids))
    assert [(w.start, w.end) for w in windows] == planned, [w.tokens for w in windows]
    covered = 0
    for w in windows:
        assert not w.encoded.truncated and w.tokens <= runner.max_length
        assert w.encoded == runner.encode([text[w.start:w.end]])[0]
        assert text[w.start:w.end] == text[w.start:w.end].strip()
        assert not text[covered:w.start].strip(), (covered, w)  # only whitespace left out
        covered = max(covered, w.end)
    assert not text[covered:].strip()


@pytest.mark.parametrize("seed", range(8))
def test_chinese_windows_are_cut_once_as_planned(seed: int, tiny_model_dir: Path,
                                                 xlmr_dir: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    runner = runner_for("xlmr", tiny_model_dir, xlmr_dir)
    text = chinese(seed)
    # one token a character and the text's leading "▁": none where a sentence starts
    # after "。", though a window starting there has one encoded alone
    assert len(runner.offsets(text)) == len(text) + 1
    assert_cut_once_as_planned(runner, text, caplog)


@pytest.mark.parametrize("seed", range(4))
def test_a_long_chinese_sentence_is_cut_once_as_planned(
        seed: int, tiny_model_dir: Path, xlmr_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    runner = runner_for("xlmr", tiny_model_dir, xlmr_dir)
    rng = random.Random(seed)
    # sentences longer than a window, after "。": every piece starts inside a word
    text = "".join("".join(rng.choice(HANZI) for _ in range(rng.randint(20, 80))) + "。"
                   for _ in range(6))
    assert_cut_once_as_planned(runner, text, caplog)


@pytest.mark.parametrize("seed", range(6))
def test_digit_glued_windows_are_cut_once_as_planned(
        seed: int, tiny_model_dir: Path, xlmr_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    runner = runner_for("xlmr", tiny_model_dir, xlmr_dir)
    assert_cut_once_as_planned(runner, glued(seed), caplog)


@pytest.mark.parametrize("seed", range(3))
def test_mixed_texts_on_bert_are_unchanged_by_measuring(seed: int, tiny_model_dir: Path,
                                                        xlmr_dir: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    # WordPiece counts a window alone as in the whole text: measuring changes no plan
    runner = runner_for("bert", tiny_model_dir, xlmr_dir)
    text = english(seed, 20) + " " + chinese(seed, 20) + " " + english(seed + 1, 20)
    offsets = runner.offsets(text)
    budget = runner.max_length - runner.special_tokens
    assert plan_windows(text, offsets, budget) == plan_windows(
        text, offsets, budget, lambda span: len(runner.offsets(span)))
    assert_cut_once_as_planned(runner, text, caplog)


#: Common characters of hotel reviews, for Chinese texts the bundled model tokenizes.
REVIEW_HANZI = ("这家酒店的服务很好房间也干净我们非常喜欢早餐不错但是价格有点贵位置方便交通还可以"
                "下次会再来前台态度一般晚上有些吵空调坏了")


@pytest.mark.slow
def test_chinese_windows_of_the_bundled_model_are_cut_once_as_planned(
        tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture) -> None:
    # The bundled model's SentencePiece vocabulary merges characters into pieces:
    # a window after "。" starts inside a word and alone has a "▁" the plan lacked.
    from worker.sentiment.assemble import ensure_default_model

    model_dir = ensure_default_model(tmp_path_factory.mktemp("model-cache"), progress=False)
    runner = build_runner(Settings(model=str(model_dir), database_url="sqlite://"))
    assert isinstance(runner, HFRunner)
    for seed in range(3):
        rng = random.Random(seed)
        text = "".join("".join(rng.choice(REVIEW_HANZI) for _ in range(rng.randint(5, 30)))
                       + rng.choice("。！？") for _ in range(400))
        caplog.clear()
        assert_cut_once_as_planned(runner, text, caplog)
