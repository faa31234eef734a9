"""Held-out accuracy of a sequence classifier, per language and per source."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .data import Example


@torch.inference_mode()
def predict(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 32,
    max_len: int = 128,
) -> list[int]:
    """Give the arg-max label of each text, in input order.

    Texts are sorted by length before batching so padding stays small; the
    model is put in eval mode (and left there).
    """
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    preds = [0] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        )
        logits = model(**enc).logits
        for i, p in zip(idx, logits.argmax(-1).tolist(), strict=True):
            preds[i] = p
    return preds


def accuracy_table(
    examples: Sequence[Example], preds: Sequence[int]
) -> dict[str, dict[str, float]]:
    """Give ``{group: {"n": count, "acc": accuracy}}`` for each language ("zh", "en") and "lang/source"."""
    hits: dict[str, list[int]] = defaultdict(list)
    for ex, p in zip(examples, preds, strict=True):
        ok = int(ex.label == p)
        hits[ex.lang].append(ok)
        hits[f"{ex.lang}/{ex.source}"].append(ok)
    return {k: {"n": len(v), "acc": sum(v) / len(v)} for k, v in sorted(hits.items())}


def format_table(table: dict[str, dict[str, float]]) -> str:
    """Render :func:`accuracy_table` output as an aligned text table."""
    lines = [f"{'group':<22} {'n':>6} {'accuracy':>9}"]
    lines += [f"{k:<22} {int(v['n']):>6} {v['acc']:>9.4f}" for k, v in table.items()]
    return "\n".join(lines)


def eval_main(
    model_dir: Path | None = None,
    cache_dir: Path | None = None,
    vader_sdist: Path | None = None,
    split: str = "test",
    seed: int = 13,
    batch_size: int = 32,
    max_len: int = 128,
    threads: int = 2,
    record_in: Path | None = None,
) -> dict[str, dict[str, float]]:
    """``bertstream model eval``: print and return held-out accuracy per language and source.

    Evaluates ``model_dir`` (an HF directory) or, when None, the default model
    assembled into ``cache_dir``. ``split`` is "test" or "dev"; ``seed`` must
    be the training seed so the held-out texts are the ones training never saw.
    ``record_in``: an adapter directory whose meta.json gets the table under
    ``split`` (this changes the adapter hash, hence the model revision).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .assemble import ensure_default_model
    from .data import SplitSpec, load_examples

    if model_dir is None:
        if cache_dir is None:
            raise ValueError("give model_dir or cache_dir")
        model_dir = ensure_default_model(cache_dir)
    torch.set_num_threads(threads)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples(vader_sdist, SplitSpec(seed=seed))[split]
    preds = predict(model, tokenizer, [e.text for e in examples], batch_size, max_len)
    table = accuracy_table(examples, preds)
    print(format_table(table))
    if record_in is not None:
        meta_path = record_in / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta[split] = table
        meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return table
