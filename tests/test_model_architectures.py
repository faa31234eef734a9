"""Any Hugging Face sequence-classification directory the runner accepts is scored right.

For every architecture the tests can build tiny (encoders and decoders, each
with its usual kind of fast tokenizer, saved with ``save_pretrained``), a
padded batch of texts of very different lengths gives each text the
probabilities the plain transformers model gives it alone (XLNet, which reads
a text's last position, padded on the left). Heads whose outputs are no
distribution (regression), decoders that cannot batch (no padding token),
models no padding side suits and label sets the rows cannot hold are refused
at load, in one line; multi-label heads are served as per-label sigmoids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from contract.errors import ConfigError, ModelLoadError
from tests.tinybert import ARCHITECTURES, DECODERS, write_tiny_model
from worker.device import Placement
from worker.runner import NEUTRAL, HFRunner
from worker.sentiment.calibration import write_temperature

CPU = Placement(torch.device("cpu"), torch.float32)
#: Very different lengths (2 to about 30 tokens), all within the tiny models' positions.
TEXTS = [
    "ok",
    "the hotel room was clean but the service was very bad and the food was terrible "
    "again today so we hate it",
    "i love this movie",
    "bad",
    "the phone app update is so boring but the battery is great",
]


def _alone(model_dir: Path, texts: list[str]) -> torch.Tensor:
    """Each text alone through the plain transformers model: its logits, one row each."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.inference_mode():
        return torch.cat([model(**tokenizer(t, return_tensors="pt")).logits for t in texts])


def _batched(runner: HFRunner, texts: list[str]) -> torch.Tensor:
    """All ``texts`` in one padded batch through the runner: its probabilities."""
    encoded = runner.encode(texts)
    assert not any(e.truncated for e in encoded)
    return runner.forward(runner.collate(encoded, list(range(len(texts)))))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny model directory per architecture, written once for the module."""
    return {arch: write_tiny_model(tmp_path_factory.mktemp(arch), arch)
            for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_padded_batch_gives_each_text_its_probabilities_alone(models: dict[str, Path],
                                                                arch: str) -> None:
    runner = HFRunner(models[arch], CPU)
    # XLNet classifies from the last position: a short text must end where a long one does.
    assert runner.pad_left == (arch == "xlnet")
    lengths = [len(e.ids) for e in runner.encode(TEXTS)]
    assert max(lengths) >= 5 * min(lengths)  # real padding in the batch
    got = _batched(runner, TEXTS)
    want = torch.softmax(_alone(models[arch], TEXTS), dim=-1)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    preds = runner.decode(got)
    assert [p.label for p in preds] == [runner.labels[int(i)] for i in want.argmax(-1)]


def test_a_decoder_pads_with_the_pad_token_of_its_config(tmp_path: Path) -> None:
    """A Llama-style tokenizer often has no pad token while config.json names one: the
    model finds each text's last token by that id, so padding with any other id would
    make it read a short text's padding."""
    model_dir = write_tiny_model(tmp_path / "llama", "llama")
    tokenizer_config = model_dir / "tokenizer_config.json"
    data = json.loads(tokenizer_config.read_text())
    del data["pad_token"]
    tokenizer_config.write_text(json.dumps(data))
    runner = HFRunner(model_dir, CPU)
    want = torch.softmax(_alone(model_dir, TEXTS), dim=-1)
    assert torch.allclose(_batched(runner, TEXTS), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("tokenizer_pad", [False, True])
def test_a_decoder_without_a_pad_token_id_is_refused_at_load(tmp_path: Path, arch: str,
                                                             tokenizer_pad: bool) -> None:
    """Without ``pad_token_id`` in its config a decoder raises on every batch of two or
    more texts (whether or not its tokenizer has a pad token): refused at load, not
    failed batch after batch."""
    model_dir = write_tiny_model(tmp_path / arch, arch, pad=tokenizer_pad)
    config = json.loads((model_dir / "config.json").read_text())
    config["pad_token_id"] = None
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=(
            r"cannot score a batch of texts: its config\.json has no pad_token_id.*"
            r"\w+ForSequenceClassification.*set pad_token_id in config\.json")) as info:
        HFRunner(model_dir, CPU)
    assert "\n" not in str(info.value)


def test_a_model_that_reads_padding_on_either_side_is_refused_at_load(tmp_path: Path) -> None:
    """XLNet's ``summary_type='mean'`` averages every position, padding included: no
    padding gives a short text in a batch its result alone."""
    model_dir = write_tiny_model(tmp_path / "mean", "xlnet", summary_type="mean")
    with pytest.raises(ModelLoadError, match=(
            rf"{model_dir}: padding changes its results: a batch of two texts of different "
            r"lengths scores them differently from each alone \(by up to [0-9.e-]+ in a "
            r"probability, padded on either side\); XLNetForSequenceClassification cannot "
            r"be served in batches")):
        HFRunner(model_dir, CPU)


@pytest.mark.parametrize(("tokenizer_limit", "max_length"), [(None, 512), (48, 48)])
def test_a_model_without_a_position_table_takes_the_tokenizers_limit(
        tmp_path: Path, tokenizer_limit: int | None, max_length: int) -> None:
    """XLNet's config gives max_position_embeddings -1 (no limit): the tokenizer's limit
    applies, else 512; the limit is no longer -1, which refused every setting."""
    model_dir = write_tiny_model(tmp_path / "xlnet", "xlnet", max_length=tokenizer_limit)
    assert HFRunner(model_dir, CPU).max_length == max_length
    assert HFRunner(model_dir, CPU, max_length=20).max_length == 20


@pytest.mark.parametrize(("labels", "problem_type"), [
    (("score",), None),
    (("score",), "regression"),
    (("valence", "arousal"), "regression"),
])
def test_a_regression_head_is_refused_at_load(tmp_path: Path, labels: tuple[str, ...],
                                              problem_type: str | None) -> None:
    """A regression head gives numbers, not a distribution over labels: a softmax over
    one logit is 1.0 for every text, the same label for all of them."""
    model_dir = write_tiny_model(tmp_path / "reg", "bert", labels=labels,
                                 problem_type=problem_type)
    with pytest.raises(ModelLoadError, match=(
            rf"{model_dir} has a regression head \({len(labels)} output.*not a "
            r"classifier")):
        HFRunner(model_dir, CPU)


@pytest.fixture(scope="module")
def multi_label(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multi-label (sigmoid) head of three labels, as emotion models have."""
    return write_tiny_model(tmp_path_factory.mktemp("emotions"), "bert",
                            labels=("joy", "anger", "fear"),
                            problem_type="multi_label_classification")


def test_a_multi_label_head_is_scored_with_a_sigmoid_per_label(multi_label: Path) -> None:
    runner = HFRunner(multi_label, CPU)
    got = _batched(runner, TEXTS)
    want = torch.sigmoid(_alone(multi_label, TEXTS))
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    for pred, row in zip(runner.decode(got), want, strict=True):
        assert pred.label == runner.labels[int(row.argmax())]
        assert pred.score == pytest.approx(float(row.max()), abs=1e-5)
        want_scores = dict(zip(runner.labels, row.tolist(), strict=True))
        assert pred.scores == pytest.approx(want_scores, abs=1e-5)


def test_a_multi_label_temperature_divides_the_logits_before_the_sigmoid(
        multi_label: Path, tmp_path: Path) -> None:
    calibrated = tmp_path / "calibrated"
    shutil.copytree(multi_label, calibrated)
    write_temperature(calibrated, 2.0)
    got = _batched(HFRunner(calibrated, CPU), TEXTS)
    want = torch.sigmoid(_alone(multi_label, TEXTS) / 2.0)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_a_multi_label_neutral_band_applies_to_the_top_sigmoid(multi_label: Path,
                                                              tmp_path: Path) -> None:
    """The top of independent sigmoids has no floor: any band in (0, 1] can label a text
    neutral (a softmax over three labels refuses a band of 1/3 or less)."""
    runner = HFRunner(multi_label, CPU, neutral_below=0.3)
    preds = runner.decode(torch.tensor([[0.1, 0.25, 0.05], [0.9, 0.95, 0.2]]))
    assert [p.label for p in preds] == [NEUTRAL, "anger"]
    assert preds[0].score == pytest.approx(0.25)
    assert preds[0].scores == pytest.approx({"joy": 0.1, "anger": 0.25, "fear": 0.05})
    with pytest.raises(ConfigError, match="can never label a text neutral"):
        HFRunner(write_tiny_model(tmp_path / "softmax3", "bert",
                                  labels=("joy", "anger", "fear")), CPU, neutral_below=0.3)


def test_a_single_multi_label_output_is_a_probability(tmp_path: Path) -> None:
    """One sigmoid output (a toxicity detector) is a probability, unlike a regression."""
    model_dir = write_tiny_model(tmp_path / "toxic", "bert", labels=("toxic",),
                                 problem_type="multi_label_classification")
    runner = HFRunner(model_dir, CPU, neutral_below=0.5)
    want = torch.sigmoid(_alone(model_dir, TEXTS))
    got = _batched(runner, TEXTS)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert [p.label for p in runner.decode(got)] == [
        "toxic" if p >= 0.5 else NEUTRAL for p in want[:, 0].tolist()]


@pytest.mark.parametrize(("labels", "why"), [
    (("pos", "pos", "neg"), r"label 'pos' twice \(ids 0 and 1\)"),
    (("negative", ""), r"label 1 is empty"),
    (("negative", "x" * 65), r"label 1 \('x+.*\) is longer than 64 characters"),
])
def test_labels_the_rows_cannot_hold_are_refused_at_load(tmp_path: Path,
                                                         labels: tuple[str, ...],
                                                         why: str) -> None:
    """Rows keep scores by label (a duplicate would lose one) and the label column holds
    64 characters (PostgreSQL refuses every row of a longer one)."""
    model_dir = write_tiny_model(tmp_path / "labels", "bert", labels=labels)
    with pytest.raises(ModelLoadError, match=rf"{model_dir}: {why}"):
        HFRunner(model_dir, CPU)


@pytest.mark.parametrize(("arch", "problem_type", "said"), [
    ("bert", "multi_label_classification", "(sigmoid)"),
    ("xlnet", None, "(softmax, padded on the left)"),
])
def test_the_workers_model_line_says_how_it_scores_and_pads(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, arch: str, problem_type: str | None,
        said: str) -> None:
    """The start-up line names the scoring (softmax or sigmoid) and a left padding."""
    import logging

    from contract.settings import Settings
    from worker.app import build_runner

    path = write_tiny_model(tmp_path / arch, arch, labels=("joy", "anger"),
                            problem_type=problem_type)
    with caplog.at_level(logging.INFO, logger="worker.app"):
        build_runner(Settings(model=str(path), device="cpu"))
    assert any(f"2 labels {said}" in r.getMessage() for r in caplog.records), caplog.text


def test_a_models_own_neutral_label_and_the_neutral_band_stay_tellable_apart(
        tmp_path: Path) -> None:
    """A model whose labels include ``neutral``, with the band on: ``scores`` holds the
    model's labels once each (``neutral`` once, the model's probability), ``score`` is
    always the top probability, and a row is labelled by the band exactly when its score
    is below the band (its rows say the band in ``model_revision``); otherwise the label
    is the model's arg-max, ``neutral`` included. Long texts' windows combine alike."""
    from worker.runner import Encoded
    from worker.windows import Window, combine

    labels = ("negative", "neutral", "positive")
    runner = HFRunner(write_tiny_model(tmp_path / "three", "bert", labels=labels), CPU,
                      neutral_below=0.5)
    assert runner.revision is not None and runner.revision.endswith("+neutral0.5")
    rows = [[0.1, 0.8, 0.1],    # the model's neutral
            [0.2, 0.35, 0.45],  # the band's: the top (positive) is below 0.5
            [0.3, 0.45, 0.25],  # both: the model's top is neutral, below the band
            [0.1, 0.2, 0.7]]
    preds = runner.decode(torch.tensor(rows))
    assert [p.label for p in preds] == [NEUTRAL, NEUTRAL, NEUTRAL, "positive"]
    assert [p.score for p in preds] == pytest.approx([0.8, 0.45, 0.45, 0.7])
    for pred, row in zip(preds, rows, strict=True):
        assert pred.scores == pytest.approx(dict(zip(labels, row, strict=True)))
        assert pred.score == max(pred.scores.values())
        by_band = pred.score < runner.neutral_below
        assert pred.label == (NEUTRAL if by_band else max(pred.scores, key=pred.scores.get))
    # The band's neutral keeps the model's own neutral probability apart from its score.
    assert preds[1].scores["neutral"] == pytest.approx(0.35) != preds[1].score

    windows = [Window(n=i, start=0, end=1, encoded=Encoded([0] * 10, False), outcome=p)
               for i, p in enumerate(preds[1:3])]
    whole = combine(windows, runner.neutral_below)
    assert not isinstance(whole, str)
    assert whole.label == NEUTRAL and set(whole.scores) == set(labels)
    assert whole.score == max(whole.scores.values()) < runner.neutral_below
