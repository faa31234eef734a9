"""Two-clause training texts (training/compose.py): clause choice, the label rule, the judge."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.tinybert import write_tiny_bert
from training.compose import (
    CONNECTIVES,
    clause_of,
    compose,
    model_judge,
    with_composed,
)
from training.data import Example, normalise
from worker.sentiment.calibration import write_temperature


def _train() -> list[Example]:
    """Clauses whose label can be read off the text: 好N/greatN positive, 差N/awfulN negative."""
    out = []
    for i in range(40):
        out.append(Example(f"这家店真的很好吃第{i}次", 1, "zh", "t"))
        out.append(Example(f"这家店真的很难吃第{i}次", 0, "zh", "t"))
        out.append(Example(f"The room was great number {i}", 1, "en", "t"))
        out.append(Example(f"The room was awful number {i}", 0, "en", "t"))
    return out


def _oracle(texts: list[str]) -> list[float]:
    return [0.99 if ("好" in t or "great" in t) else 0.01 for t in texts]


def _label_of_clause(clause: str) -> int:
    return int("好" in clause or "great" in clause)


@pytest.mark.parametrize(("text", "lang", "clause"), [
    ("（4）散热效果非常不错。", "zh", "散热效果非常不错"),
    ("5、阳台封了，不给进去。", "zh", "阳台封了，不给进去"),
    ("房间很旧，但是服务不错", "zh", None),           # has a connective of its own
    ("房间小。床不舒服", "zh", None),                 # two sentences
    ("好", "zh", None),                               # too short
    ("The staff were lovely!", "en", "The staff were lovely"),
    ("Fine, but slow.", "en", None),
    ("Too slow. Avoid it", "en", None),
    ("Bad", "en", None),
])
def test_clause_choice(text: str, lang: str, clause: str | None) -> None:
    assert clause_of(Example(text, 1, lang, "t")) == clause


def test_composed_labels_follow_the_main_clause() -> None:
    out = compose(_train(), 200, _oracle, seed=5)
    assert {e.lang for e in out} == {"zh", "en"}
    kinds = {e.source for e in out}
    assert kinds == {"composed_contrast", "composed_concessive", "composed_additive"}
    for lang in ("zh", "en"):
        mine = [e for e in out if e.lang == lang]
        assert len(mine) == 200
        assert abs(sum(e.label for e in mine) - 100) <= 2  # balanced
    for ex in out:
        parts = [p for p in re.split(r"[，,.。]\s*", ex.text) if p]
        labels = [_label_of_clause(p) for p in parts if re.search("好|难|great|awful", p)]
        assert len(labels) == 2, ex.text
        if ex.source == "composed_additive":
            assert labels[0] == labels[1] == ex.label, ex.text
        else:
            assert labels[0] != labels[1], ex.text
            # The main clause: last after a contrast word ("A，但是B", "Although a, b"),
            # first before a trailing concession ("B，虽然A").
            main = parts[0] if ex.source == "composed_concessive" else parts[-1]
            assert _label_of_clause(main) == ex.label, ex.text
    assert out == compose(_train(), 200, _oracle, seed=5)  # seeded
    assert out != compose(_train(), 200, _oracle, seed=6)


def test_every_connective_is_used_and_clauses_come_from_train_only() -> None:
    out = compose(_train(), 600, _oracle, seed=1)
    clauses = {clause_of(e) for e in _train()}
    clauses |= {c[:1].lower() + c[1:] for c in clauses if c}
    used = set()
    for ex in out:
        parses = []
        for kind, form in CONNECTIVES[ex.lang]:
            pattern = re.escape(form)
            for slot in ("A", "B", "a", "b"):
                pattern = pattern.replace(re.escape("{" + slot + "}"), "(.+)")
            m = re.fullmatch(pattern, ex.text)
            if m and all(g in clauses for g in m.groups()) and ex.source == f"composed_{kind}":
                parses.append(form)
        assert parses, ex.text  # made of two train clauses by one of the forms
        used.update(parses)
    assert used == {form for forms in CONNECTIVES.values() for _, form in forms}


def test_judge_vetoes_clauses_and_suite_texts_are_excluded() -> None:
    # A judge that disagrees with every "第1x次" clause keeps them all out.
    def judge(texts: list[str]) -> list[float]:
        return [1 - p if re.search(r"第1\d次|number 1\d\b", t) else p
                for t, p in zip(texts, _oracle(texts), strict=True)]

    out = compose(_train(), 300, judge, seed=2)
    assert not any(re.search(r"第1\d次|number 1\d\b", e.text) for e in out)
    blocked = {normalise(e.text) for e in out[:50]}
    again = compose(_train(), 300, judge, seed=2, exclude=blocked)
    assert not blocked & {normalise(e.text) for e in again}
    # One label entirely vetoed: nothing can be composed in that language.
    only_pos = compose(_train(), 50, lambda ts: [0.99] * len(ts), seed=2)
    assert only_pos == []


def test_model_judge_reads_a_model_directory_and_its_temperature(tmp_path: Path) -> None:
    model = write_tiny_bert(tmp_path / "m", layers=1, hidden=32)
    torch.manual_seed(0)
    texts = ["这家店真的很好吃", "The room was awful", "x"]
    raw = model_judge(model, threads=1)(texts)
    assert len(raw) == 3 and all(0.0 < p < 1.0 for p in raw)
    hot = tmp_path / "hot"
    shutil.copytree(model, hot)
    write_temperature(hot, 50.0)
    flat = model_judge(hot, threads=1)(texts)
    # A high temperature pulls every probability towards 0.5, the label side kept.
    for p, q in zip(raw, flat, strict=True):
        assert abs(q - 0.5) < abs(p - 0.5) or p == pytest.approx(0.5, abs=1e-3)
        assert (q - 0.5) * (p - 0.5) >= 0


def test_with_composed_adds_judged_texts_to_train(tmp_path: Path) -> None:
    # Through the real loader: a random tiny model's judgement lets every
    # clause through at min_agree 0, and none at 1.
    judge = write_tiny_bert(tmp_path / "m", layers=1, hidden=32)
    train = _train()
    splits = {"train": train, "dev": train[:4]}
    out = with_composed(splits, 20, 0, judge, seed=3, threads=1, min_agree=0.0)
    assert out["train"][: len(train)] == train and out["dev"] == splits["dev"]
    added = out["train"][len(train):]
    assert len(added) == 40 and all(e.source.startswith("composed_") for e in added)
    assert "dev_composed" not in out and splits["train"] == train  # the input is left as it was
    assert with_composed(splits, 20, 0, judge, seed=3, threads=1, min_agree=1.0)["train"] == train
    assert with_composed(splits, 0, 0, None) == splits  # off: no judge needed
    with pytest.raises(ValueError, match="judge"):
        with_composed(splits, 20, 0, None)
    with pytest.raises(ValueError, match="judge"):
        with_composed(splits, 0, 20, None)
    # The same texts from the dev split's clauses form "dev_composed" (--compose-dev),
    # vetted by the same judge; train is then left alone.
    dev_only = with_composed({"train": [], "dev": train}, 0, 20, judge, seed=3, threads=1,
                             min_agree=0.0)
    assert dev_only["dev_composed"] == added and dev_only["train"] == []
    both = with_composed({"train": train, "dev": train}, 20, 20, judge, seed=3, threads=1,
                         min_agree=0.0)
    assert both["train"][len(train):] == added == both["dev_composed"]


def test_judge_option_names_the_model_that_vets_clauses(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from producer.cli import main
    from training.cli import _judge

    # Nothing composed: no judge (nothing assembled); a named one is used as given.
    assert _judge(None, None, 0, 0) is None  # type: ignore[arg-type]
    assert _judge(None, str(tmp_path), 0, 5) == tmp_path  # type: ignore[arg-type]
    for command in (["train", "--out", str(tmp_path / "o")], ["device-pack"]):
        result = CliRunner().invoke(main, ["model", *command, "--compose", "10",
                                           "--judge", str(tmp_path / "missing")])
        assert result.exit_code == 2 and "--judge" in result.output, result.output
