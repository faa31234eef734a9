"""Merge a trained LoRA update into a state dict: W' = W + scale * B @ A.

The adapter is trained by the training package's LoRA (training/lora.py);
after merging, the model is a plain transformers model again, so the runtime
needs only this function.
"""

from __future__ import annotations

import torch


def merge_into(state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], scale: float) -> None:
    """Add ``scale * B @ A`` to ``state["<module>.weight"]`` in place, for each LoRA pair.

    Raises KeyError if an adapter names a module absent from ``state``.
    """
    for key in lora:
        if not key.endswith(".lora_a"):
            continue
        module = key[: -len(".lora_a")]
        a = lora[key].float()
        b = lora[f"{module}.lora_b"].float()
        weight = state[f"{module}.weight"]
        state[f"{module}.weight"] = weight + (b @ a).to(weight.dtype) * scale
