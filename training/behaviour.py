"""The behavioural test suite: short hand-written items with known labels, never trained on.

``suite/behaviour.jsonl`` holds one JSON object a line: ``text``, ``label``
(``positive``/``negative``), ``category`` (``plain``, ``negation``,
``intensifier``, ``hedge``, ``domain_word``, ``emoji_short``, ``contrast``),
``lang`` (``zh``/``en``) and, for plain items, ``domain``. The items were
written for bertstream (Apache-2.0, see ``suite/README.md``).
:func:`training.data.load_examples` drops any training text equal
to a suite item, so the suite stays a test.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: The class order everything here reads: column 0 negative, column 1 positive.
#: A model's own order (its config's id2label) is mapped to this one before any
#: figure is computed (``training.evaluate.predict_logits``).
LABELS = ("negative", "positive")
CATEGORIES = (
    "plain", "negation", "intensifier", "hedge", "domain_word", "emoji_short", "contrast",
)
#: A wrong prediction at or above this probability counts as a confident error.
CONFIDENT = 0.9


@dataclass(frozen=True)
class SuiteItem:
    """One check: a text and the label a reader gives it."""

    text: str
    label: str
    category: str
    lang: str
    domain: str | None = None

    @property
    def label_id(self) -> int:
        """The column of :attr:`label` in :data:`LABELS` order (0 negative, 1 positive).

        That is the order of ``training.evaluate.predict_logits``' columns,
        whatever order the model lists its labels in.
        """
        return LABELS.index(self.label)


def suite_path() -> Path:
    """The suite file shipped inside this package."""
    return Path(__file__).resolve().parent / "suite" / "behaviour.jsonl"


def load_suite(path: Path | None = None) -> list[SuiteItem]:
    """Read the suite (default: the packaged file); raises ValueError on a malformed line."""
    items = []
    source = path or suite_path()
    for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        item = SuiteItem(row["text"], row["label"], row["category"], row["lang"],
                         row.get("domain"))
        if item.label not in LABELS or item.category not in CATEGORIES:
            raise ValueError(f"{source}:{n}: unknown label or category in {row}")
        items.append(item)
    return items


def suite_table(items: Sequence[SuiteItem], probs: torch.Tensor) -> dict[str, dict[str, float]]:
    """Score the suite from per-item class probabilities ``(len(items), 2)``, columns in
    :data:`LABELS` order (as ``training.evaluate.predict_logits`` gives them).

    Gives ``{group: {"n", "acc", "confident_errors"}}`` for each language and
    each ``lang/category``; a confident error is a wrong label whose
    probability is at least :data:`CONFIDENT`.
    """
    groups: dict[str, list[tuple[int, int]]] = defaultdict(list)
    top, pred = probs.max(dim=-1)
    for item, p, conf in zip(items, pred.tolist(), top.tolist(), strict=True):
        ok = int(p == item.label_id)
        mark = (ok, int(not ok and conf >= CONFIDENT))
        groups[item.lang].append(mark)
        groups[f"{item.lang}/{item.category}"].append(mark)
    return {
        k: {"n": len(v), "acc": sum(o for o, _ in v) / len(v),
            "confident_errors": sum(c for _, c in v)}
        for k, v in sorted(groups.items())
    }


def confident_errors(items: Sequence[SuiteItem], probs: torch.Tensor) -> list[dict[str, Any]]:
    """The items read wrong at probability >= :data:`CONFIDENT`, surest first.

    Each is ``{"lang", "category", "text", "label", "score"}`` (``score``: the
    probability of the wrong label), so a report can name what it counts.
    """
    top, pred = probs.max(dim=-1)
    out = [{"lang": item.lang, "category": item.category, "text": item.text,
            "label": item.label, "score": round(conf, 4)}
           for item, p, conf in zip(items, pred.tolist(), top.tolist(), strict=True)
           if p != item.label_id and conf >= CONFIDENT]
    return sorted(out, key=lambda e: (e["lang"], -e["score"]))


def format_suite_table(table: dict[str, dict[str, float]]) -> str:
    """Render :func:`suite_table` output as an aligned text table."""
    lines = [f"{'suite group':<22} {'n':>6} {'accuracy':>9} {'errors>=0.9':>12}"]
    lines += [f"{k:<22} {int(v['n']):>6} {v['acc']:>9.4f} {int(v['confident_errors']):>12}"
              for k, v in table.items()]
    return "\n".join(lines)
