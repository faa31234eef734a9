"""The runner's post-processing: the calibration temperature and the neutral band."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from contract.errors import ConfigError, ModelLoadError
from contract.settings import Settings
from producer.cli import main
from worker.device import resolve_placement
from worker.runner import NEUTRAL, HFRunner
from worker.sentiment.calibration import write_temperature

TEXTS = ["the room was spotless", "cold food, rude staff", "ok"]


def _probs(runner: HFRunner) -> torch.Tensor:
    enc = runner.encode(TEXTS)
    return runner.forward(runner.collate(enc, list(range(len(TEXTS)))))


def test_runner_divides_logits_by_the_stored_temperature(tiny_model_dir: Path,
                                                          tmp_path: Path) -> None:
    placement = resolve_placement("cpu", "auto")
    plain = HFRunner(tiny_model_dir, placement)
    assert plain.temperature == 1.0
    calibrated_dir = tmp_path / "calibrated"
    shutil.copytree(tiny_model_dir, calibrated_dir)
    write_temperature(calibrated_dir, 4.0)
    calibrated = HFRunner(calibrated_dir, placement)
    assert calibrated.temperature == 4.0
    assert calibrated.revision != plain.revision
    p, q = _probs(plain), _probs(calibrated)
    # log(p1/p0) is the logit gap; the temperature divides it.
    gap_p = torch.log(p[:, 1] / p[:, 0])
    gap_q = torch.log(q[:, 1] / q[:, 0])
    assert torch.allclose(gap_q, gap_p / 4.0, atol=1e-4)
    assert torch.equal(p.argmax(-1), q.argmax(-1))


def test_a_bad_calibration_file_fails_the_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    (bad / "calibration.json").write_text('{"temperature": 0}')
    with pytest.raises(ModelLoadError):
        HFRunner(bad, resolve_placement("cpu", "auto"))


def test_neutral_band_labels_low_confidence_texts(tiny_model_dir: Path) -> None:
    placement = resolve_placement("cpu", "auto")
    runner = HFRunner(tiny_model_dir, placement, neutral_below=0.6)
    assert runner.revision is not None and runner.revision.endswith("+neutral0.6")
    preds = runner.decode(torch.tensor([[0.55, 0.45], [0.05, 0.95], [0.6, 0.4]]))
    assert [p.label for p in preds] == [NEUTRAL, "positive", "negative"]
    assert preds[0].score == pytest.approx(0.55)
    assert preds[0].scores == pytest.approx({"negative": 0.55, "positive": 0.45})
    off = HFRunner(tiny_model_dir, placement)
    assert [p.label for p in off.decode(torch.tensor([[0.55, 0.45]]))] == ["negative"]
    # End to end: a band of 1.0 makes every text neutral.
    everything = HFRunner(tiny_model_dir, placement, neutral_below=1.0)
    assert {p.label for p in everything.decode(_probs(everything))} == {NEUTRAL}


@pytest.mark.parametrize("p", [0.5, 0.3, 1e-9])
def test_a_neutral_band_no_top_probability_can_fall_below_is_refused(tiny_model_dir: Path,
                                                                     p: float) -> None:
    """Two labels: the top probability is at least 0.5, so a band at or below it would
    label nothing neutral while every row said ``+neutral<p>``."""
    with pytest.raises(ConfigError, match=(
            rf"BERTSTREAM_NEUTRAL_BELOW={p:g} can never label a text neutral: the top "
            r"probability of 2 labels is at least 0\.5; use a value above 0\.5, or 0 to "
            r"turn the band off")):
        HFRunner(tiny_model_dir, resolve_placement("cpu", "auto"), neutral_below=p)


def test_the_neutral_band_floor_is_one_over_the_number_of_labels(tmp_path: Path) -> None:
    from tests.tinybert import write_tiny_bert

    three = write_tiny_bert(tmp_path / "three", labels=("negative", "neutral-ish", "positive"))
    placement = resolve_placement("cpu", "auto")
    with pytest.raises(ConfigError, match=r"of 3 labels is at least 0\.333"):
        HFRunner(three, placement, neutral_below=1 / 3)
    runner = HFRunner(three, placement, neutral_below=0.4)
    assert runner.revision is not None and runner.revision.endswith("+neutral0.4")
    preds = runner.decode(torch.tensor([[0.38, 0.3, 0.32], [0.1, 0.2, 0.7]]))
    assert [p.label for p in preds] == [NEUTRAL, "positive"]


def test_the_worker_exits_2_in_one_line_for_a_band_that_does_nothing(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """Refused at the model load, before the broker (unreachable here) is needed."""
    result = CliRunner().invoke(main, ["worker", "--device", "cpu"], env={
        "BERTSTREAM_MODEL": str(tiny_model_dir), "BERTSTREAM_NEUTRAL_BELOW": "0.5",
        "BERTSTREAM_DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}",
        "BERTSTREAM_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: BERTSTREAM_NEUTRAL_BELOW=0.5 can never label a text neutral: the top "
        "probability of 2 labels is at least 0.5; use a value above 0.5, or 0 to turn the "
        "band off")
    assert "Traceback" not in result.output and not isinstance(result.exception, Exception)


def test_neutral_below_setting() -> None:
    assert Settings.from_env({}).neutral_below == 0.0
    assert Settings.from_env({"BERTSTREAM_NEUTRAL_BELOW": "0.7"}).neutral_below == 0.7
    for bad in ("1.5", "-0.1", "nan", "high"):
        with pytest.raises(ConfigError):
            Settings.from_env({"BERTSTREAM_NEUTRAL_BELOW": bad})
