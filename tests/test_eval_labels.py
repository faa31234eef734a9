"""Evaluation reads a model's labels by name and refuses what it cannot measure.

A model listing its labels as ``{0: "positive", 1: "negative"}`` is measured
as the worker (which reads id2label) serves it; a topic model, a model with a
third "neutral" label and a folder saved without its classification head are
refused with one line. All on tiny random BERTs written here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from contract.errors import BertstreamError
from tests.tinybert import write_tiny_bert
from training.behaviour import SuiteItem
from training.data import Example
from training.evaluate import (
    UnusableModel,
    _load,
    evaluate_logits,
    label_columns,
    predict,
    predict_logits,
)

TEXTS = ["good", "a much longer text about a hotel room and its staff", "bad one",
         "fine", "terrible service and cold food, never again", "ok", "这家酒店的服务很好",
         "房间很脏", "the movie was great fun", "boring film, i hate it"]
LABELS = [1, 1, 0, 1, 0, 1, 1, 0, 1, 0]


def _tiny(path: Path, labels: tuple[str, ...] = ("negative", "positive")) -> Path:
    return write_tiny_bert(path, layers=1, hidden=32, labels=labels, cjk=50)


def _swapped(src: Path, dst: Path) -> Path:
    """``src`` with its labels listed the other way round, classifier rows swapped to match:
    the same classifier, written down in the other order."""
    from transformers import BertForSequenceClassification

    shutil.copytree(src, dst)
    model = BertForSequenceClassification.from_pretrained(src)
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight.flip(0))
        model.classifier.bias.copy_(model.classifier.bias.flip(0))
    model.config.id2label = {0: "Positive", 1: "NEGATIVE"}  # any case
    model.config.label2id = {"Positive": 0, "NEGATIVE": 1}
    model.save_pretrained(dst)
    return dst


def _report(model_dir: Path) -> dict[str, object]:
    model, tok = _load(model_dir)
    examples = [Example(t, y, "zh" if i in (6, 7) else "en", "src")
                for i, (t, y) in enumerate(zip(TEXTS, LABELS, strict=True))]
    items = [SuiteItem(t, ("negative", "positive")[y], "plain", e.lang)
             for t, y, e in zip(TEXTS, LABELS, examples, strict=True)]
    logits = predict_logits(model, tok, TEXTS, batch_size=4, max_len=64)
    report = evaluate_logits(examples, logits, 1.5, 64, items, logits, split="test", seed=13)
    return report.as_dict()


def test_a_model_with_its_labels_the_other_way_round_measures_the_same(tmp_path: Path) -> None:
    plain = _tiny(tmp_path / "plain")
    swapped = _swapped(plain, tmp_path / "swapped")
    model, tok = _load(plain)
    acc = sum(int(p == y) for p, y in zip(predict(model, tok, TEXTS), LABELS, strict=True))
    assert acc * 2 != len(TEXTS), "pick texts the random model does not read half right"
    a, b = _report(plain), _report(swapped)
    assert a == b
    # The raw logits of the swapped folder are the plain ones flipped; predict_logits unflips.
    swapped_model, _ = _load(swapped)
    enc = tok(TEXTS[:3], padding=True, return_tensors="pt")
    with torch.inference_mode():
        raw_plain, raw_swapped = model(**enc).logits, swapped_model(**enc).logits
    assert torch.allclose(raw_plain, raw_swapped.flip(-1), atol=1e-5)
    assert torch.allclose(predict_logits(swapped_model, tok, TEXTS[:3]),
                          predict_logits(model, tok, TEXTS[:3]), atol=1e-5)


def test_the_judge_of_composed_texts_reads_the_positive_column_by_name(tmp_path: Path) -> None:
    from training.compose import model_judge

    plain = _tiny(tmp_path / "plain")
    swapped = _swapped(plain, tmp_path / "swapped")
    assert model_judge(swapped, threads=1)(TEXTS) == pytest.approx(
        model_judge(plain, threads=1)(TEXTS), abs=1e-5)


@pytest.mark.parametrize("labels", [("sports", "politics"), ("negative", "neutral", "positive"),
                                    ("LABEL_0", "LABEL_1"), ("negative", "negative")])
def test_a_model_without_exactly_negative_and_positive_is_refused(
        tmp_path: Path, labels: tuple[str, ...]) -> None:
    from training.compose import model_judge

    folder = _tiny(tmp_path / "m", labels)
    with pytest.raises(UnusableModel, match="labels are"):
        _load(folder)
    with pytest.raises(UnusableModel):
        model_judge(folder, threads=1)
    assert issubclass(UnusableModel, BertstreamError)  # the CLI shows it as one line


def test_labels_by_name_and_a_config_that_disagrees_with_itself() -> None:
    from transformers import BertConfig

    def config(id2label: dict[int, str], label2id: dict[str, int] | None = None) -> BertConfig:
        return BertConfig(id2label=id2label,
                          label2id=label2id or {v: k for k, v in id2label.items()})

    assert label_columns(config({0: "negative", 1: "positive"})) == [0, 1]
    assert label_columns(config({0: " POSITIVE", 1: "Negative"})) == [1, 0]
    with pytest.raises(UnusableModel, match="disagrees"):
        label_columns(config({0: "positive", 1: "negative"}, {"positive": 1, "negative": 0}))


def test_model_eval_refuses_a_topic_model_in_one_line(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from producer.cli import main as cli

    # The model is refused as it loads, before any data: with or without the train extra.
    monkeypatch.setattr("training.cli.TRAIN_DATA_PACKAGES", ())

    folder = _tiny(tmp_path / "topic", ("sports", "politics"))
    result = CliRunner().invoke(cli, ["model", "eval", "--model", str(folder), "--no-vader",
                                      "--threads", "1"])
    assert result.exit_code != 0
    assert "error:" in result.output.lower() and "'sports', 'politics'" in result.output
    assert "Traceback" not in result.output and "held-out" not in result.output


def _headless(src: Path, dst: Path, keep_pooler: bool) -> Path:
    """``src`` saved as its encoder alone (as ``BertModel.save_pretrained`` writes it)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    state = load_file(str(src / "model.safetensors"))
    encoder = {k.removeprefix("bert."): v for k, v in state.items() if k.startswith("bert.")
               and (keep_pooler or not k.startswith("bert.pooler"))}
    save_file(encoder, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["architectures"] = ["BertModel"]  # its labels kept: only the head is missing
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("keep_pooler", [False, True])
def test_a_folder_without_its_classification_head_is_refused(
        tmp_path: Path, keep_pooler: bool) -> None:
    folder = _headless(_tiny(tmp_path / "whole"), tmp_path / "headless", keep_pooler)
    with pytest.raises(UnusableModel, match=r"no classification head \(classifier\.bias, "
                                            r"classifier\.weight"):
        _load(folder)


def test_the_encoder_missing_a_weight_is_refused_too(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _tiny(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    del state["bert.pooler.dense.bias"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnusableModel, match=r"lacks weights \(bert\.pooler\.dense\.bias\)"):
        _load(folder)


def test_models_load_from_local_files_only(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    seen: list[dict[str, object]] = []
    for cls in (transformers.AutoModelForSequenceClassification, transformers.AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args: object, _original: object = original, **kwargs: object) -> object:
            seen.append(kwargs)
            return _original(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(cls, "from_pretrained", spy)
    _load(_tiny(tmp_path / "m"))
    assert len(seen) == 2 and all(kw.get("local_files_only") is True for kw in seen)


def test_the_report_records_split_seed_and_sources() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.2]])
    examples = [Example("a", 0, "en", "x"), Example("b", 1, "en", "y"), Example("c", 0, "zh", "z")]
    report = evaluate_logits(examples, logits, 1.0, 64, split="dev", seed=7).as_dict()
    assert (report["split"], report["seed"], report["max_len"]) == ("dev", 7, 64)
    assert report["sources"] == {"en/x": 1, "en/y": 1, "zh/z": 1}


def test_eval_main_records_the_split_and_seed_it_measured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training import data
    from training.evaluate import eval_main
    from training.verdict import IncomparableReports, comparable

    dev = [Example(t, y, "en", "s") for t, y in zip(TEXTS, LABELS, strict=True)]
    specs: list[int] = []

    def fake_load(sdist: object, spec: data.SplitSpec, more: object = None) -> dict[str, list]:
        specs.append(spec.seed)
        return {"train": [], "dev": dev, "test": dev[:4]}

    monkeypatch.setattr(data, "load_examples", fake_load)
    folder = _tiny(tmp_path / "m")
    report = eval_main(folder, split="dev", seed=5, max_len=32, threads=1, suite=False).as_dict()
    assert specs == [5]
    assert (report["split"], report["seed"], report["max_len"]) == ("dev", 5, 32)
    assert report["sources"] == {"en/s": len(TEXTS)}
    test = eval_main(folder, split="test", seed=5, max_len=32, threads=1, suite=False).as_dict()
    assert test["split"] == "test" and test["sources"] == {"en/s": 4}
    with pytest.raises(IncomparableReports, match="'dev' split"):
        comparable(test, report)
