"""A minimal LoRA for ``nn.Linear``: train a low-rank update, then merge it away.

W' = W + (alpha / rank) * B @ A, with A (rank x in) and B (out x rank). B starts
at zero so an untouched adapter is the identity. After merging, the model is a
plain transformers model again: the runtime never needs this module's classes
(only ``worker.sentiment.lora.merge_into``, which works on a state dict).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


class LoRALinear(nn.Module):
    """Wrap a frozen ``nn.Linear`` and add a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        # A gets nn.Linear's default init, B zeros: the LoRA paper's choice.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scale


def inject(
    model: nn.Module,
    targets: tuple[str, ...],
    rank: int,
    alpha: float,
    dropout: float,
    include: Callable[[str], bool] = lambda name: True,
) -> list[str]:
    """Replace every ``nn.Linear`` whose qualified name ends with one of ``targets``
    (and passes ``include``) by a :class:`LoRALinear`.

    Returns the qualified names wrapped (the keys an adapter file will use).
    """
    wrapped: list[str] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.endswith(targets) and include(name):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, rank, alpha, dropout))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no nn.Linear matched {targets}")
    return wrapped


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Give ``{"<module>.lora_a": A, "<module>.lora_b": B}`` for every wrapped module (detached)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{name}.lora_a"] = module.lora_a.detach().clone()
            out[f"{name}.lora_b"] = module.lora_b.detach().clone()
    return out
