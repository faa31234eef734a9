"""A dev screen: does the clause after a contrast word say the label better than the whole text?

Rule-based sentiment tools weight what follows "but" more (VADER does).
This scores each dev text that has a contrast marker twice, whole and its
tail after the last marker, and prints dev accuracy for logits mixed as
``(1 - w) * whole + w * tail`` over a grid of ``w`` (``w = 0`` is the
model as served). Dev only: the suite and test are not read.

    python -m training.contrast_tail [--model DIR] [--split dev]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from contract.settings import Settings
from training.data import SplitSpec, download_more_data, download_vader_sdist, load_examples
from training.evaluate import _load, predict_logits

#: The last of these starts the tail (Chinese: longest first, so 但是 is not read as 但).
MARKERS = {"zh": re.compile(r"但是|可是|不过|然而|但"),
           "en": re.compile(r"\b(?:but|however)\b", re.IGNORECASE)}
WEIGHTS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 1.0)
_LEAD = " ,，、:：;；.。!！"


def tail(text: str, lang: str) -> str | None:
    """The text after the last contrast marker, or None (no marker, or under 2 characters)."""
    pattern = MARKERS.get(lang)
    found = list(pattern.finditer(text)) if pattern else []
    if not found:
        return None
    rest = text[found[-1].end():].lstrip(_LEAD)
    return rest if len(rest) >= 2 else None


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="an HF model directory (default: the bundled model)")
    parser.add_argument("--split", choices=("dev", "test"), default="dev")
    args = parser.parse_args(argv)
    from worker.sentiment.assemble import ensure_default_model

    cache = Path(Settings().cache_dir)
    model_dir = args.model or ensure_default_model(cache)
    data = cache / "data"
    examples = load_examples(download_vader_sdist(data), SplitSpec(seed=13),
                             download_more_data(data / "more"))[args.split]
    tails = [(i, t) for i, e in enumerate(examples) if (t := tail(e.text, e.lang))]
    model, tokenizer = _load(model_dir)
    whole = predict_logits(model, tokenizer, [e.text for e in examples])
    after = predict_logits(model, tokenizer, [t for _, t in tails])
    labels = torch.tensor([e.label for e in examples])
    rows: dict[str, dict[str, float]] = {}
    for w in WEIGHTS:
        mixed = whole.clone()
        for k, (i, _) in enumerate(tails):
            mixed[i] = (1 - w) * whole[i] + w * after[k]
        hit = (mixed.argmax(-1) == labels).float()
        row: dict[str, float] = {}
        for lang in ("zh", "en"):
            every = [i for i, e in enumerate(examples) if e.lang == lang]
            marked = [i for i, _ in tails if examples[i].lang == lang]
            row[lang] = round(float(hit[every].mean()), 4)
            row[f"{lang} marked (n={len(marked)})"] = round(float(hit[marked].mean()), 4)
        rows[f"w={w}"] = row
    print(json.dumps(rows, indent=1, ensure_ascii=False))
    return rows


if __name__ == "__main__":
    main()
