"""Load-time checks that a sequence-classification model can be served as labels.

A directory can load and still be unservable: a regression head gives
numbers, not a distribution over labels (a softmax over one output is 1.0
for every text); a decoder without a ``pad_token_id`` raises on every batch
of two or more texts; a duplicate, empty or over-long label cannot be kept
in a result row. Each is refused at load, in one line, instead of failing,
or silently mis-scoring, every text. :func:`output_kind` also says how the
logits become probabilities: a softmax, or one sigmoid per label for a
multi-label head.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa

from contract.errors import ModelLoadError
from contract.results import results

#: Logits to one distribution over the labels (single-label heads).
SOFTMAX = "softmax"
#: Logits to one independent probability per label (multi-label heads).
SIGMOID = "sigmoid"
#: The most characters a result row's label holds (the results and windows tables).
LABEL_CHARS = int(cast(sa.String, results.c.label.type).length or 0)


def output_kind(config: Any, model_dir: Path) -> str:
    """:data:`SOFTMAX` or :data:`SIGMOID` for the model's ``config``; raises
    :class:`ModelLoadError` for a regression head (``problem_type`` ``regression``,
    or one output that is not multi-label: transformers trains that as a regression)."""
    problem = getattr(config, "problem_type", None)
    outputs = int(config.num_labels)
    if problem == "multi_label_classification":
        return SIGMOID
    if problem == "regression" or outputs == 1:
        why = "problem_type 'regression'" if problem == "regression" else "num_labels 1"
        raise ModelLoadError(
            f"{model_dir} has a regression head ({outputs} output{'s' * (outputs != 1)}, "
            f"{why}): it gives numbers, not a distribution over labels, so it is not a "
            f"classifier a worker can label texts with (a single-label classifier has two "
            f"or more labels; a multi-label one says problem_type "
            f"'multi_label_classification')")
    return SOFTMAX


def check_labels(labels: Sequence[str], model_dir: Path) -> None:
    """Raise :class:`ModelLoadError` for a label a result row cannot hold: an empty one,
    one longer than :data:`LABEL_CHARS` (PostgreSQL would refuse every row), or one
    given twice (rows keep the scores by label: one of the two would be lost)."""
    first: dict[str, int] = {}
    for i, label in enumerate(labels):
        if not label.strip():
            raise ModelLoadError(f"{model_dir}: label {i} is empty in config.json's id2label; "
                                 f"a row could not say which label a text has")
        if len(label) > LABEL_CHARS:
            raise ModelLoadError(
                f"{model_dir}: label {i} ({label[:20]!r}...) is longer than {LABEL_CHARS} "
                f"characters, the most a result row's label holds; shorten it in "
                f"config.json's id2label")
        if label in first:
            raise ModelLoadError(
                f"{model_dir}: label {label!r} twice (ids {first[label]} and {i}) in "
                f"config.json's id2label; rows keep the scores by label, so one would be "
                f"lost: give every label its own name")
        first[label] = i


def batching_refusal(model: Any, model_dir: Path, exc: BaseException, reason: str) -> str:
    """Why a model that failed on a padded batch of two texts is refused (one line).

    Decoders (GPT-2, Llama, Qwen2, ...) classify from each text's last token
    that is not padding, found by ``config.pad_token_id``; without one,
    transformers refuses any batch of more than one text.
    """
    config = model.config
    if getattr(config, "pad_token_id", None) is None and "padding token" in str(exc):
        eos = getattr(config, "eos_token_id", None)
        hint = f", often its eos token id {eos}" if isinstance(eos, int) else ""
        return (f"{model_dir} cannot score a batch of texts: its config.json has no "
                f"pad_token_id, which {type(model).__name__} needs to find each text's last "
                f"token in a padded batch; set pad_token_id in config.json to the id it was "
                f"fine-tuned with{hint}")
    return f"{model_dir} fails on a padded batch of two texts: {reason}"
