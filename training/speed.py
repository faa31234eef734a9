"""Inference throughput of an assembled model on CPU (texts/s), fp32 or dynamic int8."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from worker.runner import quantize_int8


@torch.inference_mode()
def texts_per_second(
    model: nn.Module,
    tokenizer,  # noqa: ANN001 - any HF tokenizer
    texts: Sequence[str],
    batch_size: int = 32,
    max_len: int = 128,
) -> float:
    """Give texts/s over ``texts`` in input order, batches padded to their longest text.

    Input order (not length-sorted) so the figure is what an unsorted stream
    gets; tokenisation is included in the time.
    """
    model.eval()
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        )
        model(**enc)
    return len(texts) / (time.perf_counter() - started)


def load(model_dir: Path):  # noqa: ANN201 - (model, tokenizer)
    """Load an assembled model directory with the Auto classes."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return (
        AutoModelForSequenceClassification.from_pretrained(model_dir),
        AutoTokenizer.from_pretrained(model_dir),
    )


def speed_main(
    model_dir: Path,
    vader_sdist: Path | None = None,
    more_data: Path | None = None,
    n_texts: int = 1024,
    batch_size: int = 32,
    seed: int = 13,
    threads: int = 2,
) -> dict[str, float]:
    """Measure fp32 and dynamic-int8 texts/s on test texts and int8's test accuracy.

    Texts: the first ``n_texts`` of the test split shuffled with ``seed`` (zh
    and en mixed). Prints and gives {"fp32_tps", "int8_tps", "fp32_acc_zh",
    "fp32_acc_en", "int8_acc_zh", "int8_acc_en"}; accuracy is on the whole test split.
    """
    import random

    from training.data import SplitSpec, load_examples
    from training.evaluate import accuracy_table, format_table, predict

    torch.set_num_threads(threads)
    model, tokenizer = load(model_dir)
    test = load_examples(vader_sdist, SplitSpec(seed=seed), more_data)["test"]
    sample = list(test)
    random.Random(seed).shuffle(sample)
    texts = [e.text for e in sample[:n_texts]]
    out = {"fp32_tps": texts_per_second(model, tokenizer, texts, batch_size)}
    int8 = quantize_int8(model)
    out["int8_tps"] = texts_per_second(int8, tokenizer, texts, batch_size)
    for name, m in (("fp32", model), ("int8", int8)):
        table = accuracy_table(test, predict(m, tokenizer, [e.text for e in test], batch_size))
        print(f"{name} test accuracy\n{format_table(table)}")
        out[f"{name}_acc_zh"] = table["zh"]["acc"]
        out[f"{name}_acc_en"] = table["en"]["acc"]
    print({k: round(v, 4) for k, v in out.items()})
    return out
