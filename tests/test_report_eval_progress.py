"""``bertstream model eval`` says on stderr what it scores, how far it is and for how long.

With ``--more-data`` on a loaded machine it ran for minutes without a line; its
report (stdout) is left as it was. On a tiny random BERT and ten texts.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.tinybert import write_tiny_bert
from training import data, evaluate
from training.data import Example, SplitSpec
from training.evaluate import eval_main, format_report

TEXTS = ["good", "a much longer text about a hotel room and its staff", "bad one", "fine",
         "terrible service and cold food, never again", "ok", "这家酒店的服务很好", "房间很脏",
         "the movie was great fun", "boring film, i hate it"]
LABELS = [1, 1, 0, 1, 0, 1, 1, 0, 1, 0]


@pytest.fixture
def model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny model; the held-out texts are the ten above; a progress line every batch."""
    dev = [Example(t, y, "zh" if i in (6, 7) else "en", "s")
           for i, (t, y) in enumerate(zip(TEXTS, LABELS, strict=True))]

    def fake_load(sdist: object, spec: SplitSpec, more: object = None) -> dict[str, list]:
        return {"train": [], "dev": dev, "test": dev}

    monkeypatch.setattr(data, "load_examples", fake_load)
    monkeypatch.setattr(evaluate, "PROGRESS_EVERY_S", 0.0, raising=False)
    return write_tiny_bert(tmp_path / "m", layers=1, hidden=32, cjk=50)


def test_progress_goes_to_stderr_and_the_report_alone_to_stdout(
        model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = eval_main(model, split="dev", max_len=32, batch_size=4, threads=1, suite=False)
    out, err = capsys.readouterr()
    assert out == format_report(report, "dev") + "\n"
    lines = [line for line in err.splitlines() if line.startswith("eval:")]  # not transformers'
    assert lines[0] == "eval: held-out 'dev' split, 10 texts ..."
    assert re.fullmatch(r"eval: held-out 'dev' split: 4 of 10 texts, \d+ s", lines[1]), lines
    assert re.fullmatch(r"eval: held-out 'dev' split: 8 of 10 texts, \d+ s", lines[2]), lines
    assert re.fullmatch(r"eval: held-out 'dev' split: 10 texts in \d+ s", lines[-1]), lines
    assert len(lines) == 4


def test_the_command_keeps_its_stdout(model: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from producer.cli import main as cli

    monkeypatch.setattr("training.cli.TRAIN_DATA_PACKAGES", ())  # the data is faked above
    report = eval_main(model, split="test", max_len=32, batch_size=4, threads=1, suite=True,
                       neutral=False)
    expected = format_report(report, "test") + "\n"
    capsys.readouterr()
    result = CliRunner().invoke(cli, ["model", "eval", "--model", str(model), "--no-vader",
                                      "--threads", "1", "--max-len", "32", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected
    err = result.stderr
    assert "eval: held-out 'test' split, 10 texts ..." in err
    assert re.search(r"eval: behavioural suite, [\d,]+ texts \.\.\.", err), err
    assert re.search(r"eval: behavioural suite: [\d,]+ texts in \d+ s", err), err
    assert "eval:" not in result.stdout
