"""Inference throughput of an assembled model on CPU (texts/s), fp32 or dynamic int8."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


def quantize_int8(model: nn.Module) -> nn.Module:
    """Give a copy-free dynamic-int8 version of ``model`` (nn.Linear weights only)."""
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


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
