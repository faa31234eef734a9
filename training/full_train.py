"""Train the sentiment adapter from a device pack: every layer, several seeds, picked on dev.

Made for a lent GPU (``training/device_train.sh``), and runs on the CPU too
(``--rehearse``). Two kinds of run, neither freezing a layer:

- ``full``: every weight but the word embeddings is trained. The change of
  each attention and feed-forward matrix is then stored as a truncated SVD in
  the adapter's LoRA slots (``W + B @ A``, rank picked on dev), the other
  trained tensors in full, so the runtime assembles it unchanged.
- ``lora``: the CPU recipe (LoRA + LayerNorms + head) on all 12 layers.

Each run keeps its best dev checkpoint; the ``full`` runs are also averaged
(a uniform weight soup, all having started from the same encoder). Every
candidate is scored on dev *as exported*: fp16 tensors merged onto the base
the way the runtime assembles them. The best one gets a temperature fitted on
dev, and only it is evaluated on test, the behavioural suite and the neutral
items. Writes ``adapter/`` (the runtime's adapter format), ``report.json`` and
``reliability.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from training.behaviour import CONFIDENT, SuiteItem
from training.data import Example, group_counts
from training.device_pack import BASELINE, PACK_FORMAT, WORD_EMBEDDINGS
from training.evaluate import (
    EvalReport,
    accuracy_table,
    calibration_record,
    evaluate_logits,
    format_report,
    format_table,
    neutral_report,
    write_reliability,
)
from training.interpolate import ALPHAS, _rank, dev_scores, interpolate, pick_alpha
from training.parts import DEFAULT_LIMIT, split_large
from training.train import GUARD, Recipe, _prepare, dev_mean, length_batches
from training.verdict import format_verdict, judge
from worker.sentiment.adapter_file import Adapter, load_adapter, save_adapter
from worker.sentiment.lora import merge_into

MODES = ("full", "lora")
SELECTIONS = ("accuracy", "nll")


@dataclass(frozen=True)
class Split:
    """One split of the pack: compact token ids per text, labels, group name per text."""

    ids: list[torch.Tensor]
    labels: torch.Tensor
    groups: list[str]

    def examples(self) -> list[Example]:
        """Text-less examples (lang and source from the group) for the accuracy tables."""
        out = []
        for label, group in zip(self.labels.tolist(), self.groups, strict=True):
            lang, _, source = group.partition("/")
            out.append(Example("", int(label), lang, source))
        return out


@dataclass
class Pack:
    """A loaded device pack (see training/device_pack.py)."""

    meta: dict[str, Any]
    config: BertConfig
    base: dict[str, torch.Tensor]  # "bert.*" fp32, word embedding rows of the compact vocabulary
    splits: dict[str, Split]
    #: The adapter the run is held against (the pack's ``baseline/``), if it has one.
    baseline: Adapter | None = None

    @property
    def base_meta(self) -> dict[str, Any]:
        """The base model as an adapter's meta.json names it (the pack's, less its vocabulary size)."""
        return {k: v for k, v in self.meta["base"].items() if k != "vocab"}

    @property
    def pad_id(self) -> int:
        pad = self.config.pad_token_id
        if pad is None:
            raise ValueError("the pack's config has no pad_token_id")
        return int(pad)

    @property
    def suite(self) -> list[SuiteItem]:
        return [SuiteItem(**row) for row in self.meta["suite"]]


def dequantize_q4(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0 blocks ``(n, 18)`` uint8 -> ``32 n`` float32 values, the runtime's arithmetic."""
    scales = blocks[:, :2].contiguous().view(torch.float16).float()
    nibbles = blocks[:, 2:]
    low = (nibbles & 0x0F).to(torch.int8) - 8
    high = (nibbles >> 4).to(torch.int8) - 8
    return (torch.cat([low, high], dim=1).float() * scales).reshape(-1)


def load_pack(directory: Path) -> Pack:
    """Read a pack written by :func:`training.device_pack.build_pack`."""
    meta = json.loads((directory / "pack.json").read_text(encoding="utf-8"))
    if meta.get("format") != PACK_FORMAT:
        raise ValueError(f"{directory}: pack format {meta.get('format')}, this trainer reads {PACK_FORMAT}")
    enc = load_file(str(directory / "encoder.safetensors"))
    base = {}
    for name, shape in meta["shapes"].items():
        flat = dequantize_q4(enc[f"q4.{name}"]) if f"q4.{name}" in enc else enc[f"f32.{name}"]
        if name == WORD_EMBEDDINGS:
            shape = [meta["vocab_rows"], shape[1]]
        base[f"bert.{name}"] = flat.reshape(shape)
    data = load_file(str(directory / "data.safetensors"))
    splits = {}
    for name, names in meta["groups"].items():
        ids = data[f"{name}.ids"].long()
        offsets = data[f"{name}.offsets"].tolist()
        splits[name] = Split(
            [ids[a:b] for a, b in zip(offsets, offsets[1:], strict=False)],
            data[f"{name}.labels"].long(),
            [names[g] for g in data[f"{name}.groups"].tolist()],
        )
    baseline = load_adapter(directory / BASELINE) if (directory / BASELINE).is_dir() else None
    return Pack(meta, BertConfig.from_dict(meta["config"]), base, splits, baseline)


@dataclass(frozen=True)
class RunSpec:
    """One training run's settings (recorded in the report and the adapter's meta)."""

    mode: str
    seed: int
    steps: int
    lr: float
    batch_size: int = 32
    max_len: int = 128
    warmup_steps: int = 150
    weight_decay: float = 0.01
    rank: int = 16  # lora mode
    alpha: float = 32.0
    lora_dropout: float = 0.05
    eval_every: int = 250
    #: Seed of the fresh pooler and classifier (None: ``seed``). Full runs that
    #: share it start from one initialisation; heads drawn apart average towards
    #: zero in a soup, whose logits then shrink (its fitted temperature undoes it).
    head_seed: int | None = None

    @property
    def name(self) -> str:
        return f"{self.mode}-seed{self.seed}-lr{self.lr:g}"


@dataclass
class RunResult:
    """The best dev checkpoint of a run (trainable tensors on the CPU) and how it went."""

    spec: RunSpec
    state: dict[str, torch.Tensor]
    dev: dict[str, dict[str, float]]
    score: float
    step: int
    seconds: float
    steps_done: int
    curve: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Candidate:
    """An adapter as it would be written: LoRA pairs, full tensors, scale; its dev score."""

    name: str
    lora: dict[str, torch.Tensor]
    full: dict[str, torch.Tensor]
    rank: int
    alpha: float
    source: RunResult | None = None
    dev: dict[str, dict[str, float]] = field(default_factory=dict)
    score: float = -1.0
    #: Accuracy table on the pack's "dev_composed" split, when it has one.
    composed: dict[str, dict[str, float]] | None = None
    #: Dev at the temperature fitted there (:func:`calibrated_dev`): NLL, confident errors.
    calibrated: dict[str, float] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(t.numel() for t in (*self.lora.values(), *self.full.values()))


def _cut(seq: torch.Tensor, max_len: int) -> torch.Tensor:
    """Truncate like the tokenizer does: the first ``max_len - 1`` tokens, then ``</s>``."""
    return seq if len(seq) <= max_len else torch.cat([seq[: max_len - 1], seq[-1:]])


def collate(seqs: Sequence[torch.Tensor], pad_id: int, max_len: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    cut = [_cut(s, max_len) for s in seqs]
    width = max(len(s) for s in cut)
    ids = torch.full((len(cut), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(cut), width), dtype=torch.long)
    for i, s in enumerate(cut):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


@torch.inference_mode()
def split_logits(model: nn.Module, split: Split, pad_id: int, device: torch.device,
                 max_len: int = 512, batch_size: int = 128) -> torch.Tensor:
    """fp32 logits of every text of ``split`` (input order), truncated at ``max_len``."""
    model.eval()
    order = sorted(range(len(split.ids)), key=lambda i: len(split.ids[i]))
    out = torch.zeros((len(order), 2))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = collate([split.ids[i] for i in idx], pad_id, max_len, device)
        out[torch.tensor(idx)] = model(input_ids=ids, attention_mask=mask).logits.float().cpu()
    return out


def build_model(pack: Pack, seed: int, head_seed: int | None = None) -> BertForSequenceClassification:
    """The base encoder with a fresh pooler and classifier drawn from ``head_seed``
    (default ``seed``); the global generator is left seeded with ``seed`` (dropout)."""
    torch.manual_seed(seed if head_seed is None else head_seed)
    model = BertForSequenceClassification(pack.config)
    if head_seed is not None and head_seed != seed:
        torch.manual_seed(seed)
    missing, unexpected = model.load_state_dict(pack.base, strict=False)
    if unexpected or {k for k in missing if not k.startswith(("bert.pooler.", "classifier."))}:
        raise ValueError(f"pack does not fit the model: missing={missing} unexpected={unexpected}")
    return model


def _trainable(model: BertForSequenceClassification, spec: RunSpec) -> dict[str, nn.Parameter]:
    """Set up ``model`` for ``spec`` and give the parameters a checkpoint keeps, by state name."""
    if spec.mode == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(name != f"bert.{WORD_EMBEDDINGS}")
    else:
        _prepare(model, Recipe(rank=spec.rank, alpha=spec.alpha, lora_dropout=spec.lora_dropout,
                               frozen_layers=0, seed=spec.seed))
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def train_run(pack: Pack, spec: RunSpec, device: torch.device, deadline: float,
              log: Callable[[str], None]) -> RunResult:
    """Train one run; stop at ``spec.steps`` or ``deadline`` (time.time()), keep the best dev."""
    model = build_model(pack, spec.seed, spec.head_seed)
    _trainable(model, spec)
    nn.Module.to(model, device)  # transformers types .to() for itself only
    # Collected after the move, whatever .to() did to the parameter objects.
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    decay = [p for n, p in params.items() if p.ndim >= 2]
    no_decay = [p for n, p in params.items() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr)

    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        return max(0.0, (spec.steps - step) / max(1, spec.steps - spec.warmup_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    train, dev = pack.splits["train"], pack.splits["dev"]
    pad = pack.pad_id
    batches = length_batches([len(x) for x in train.ids], spec.batch_size, random.Random(spec.seed))
    dev_examples = dev.examples()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    started = time.time()
    result = RunResult(spec, {}, {}, -1.0, 0, 0.0, 0)
    loss_ema: float | None = None

    def evaluate(step: int) -> None:
        table = accuracy_table(dev_examples, split_logits(model, dev, pad, device).argmax(-1).tolist())
        score = dev_mean(table)
        result.curve.append({"step": step, "loss": loss_ema, "dev": score,
                             **{k: v["acc"] for k, v in table.items() if "/" not in k}})
        langs = " ".join(f"{k} {v['acc']:.4f}" for k, v in table.items() if "/" not in k)
        log(f"  {spec.name} step {step} loss {loss_ema or 0:.4f} dev {langs} "
            f"({time.time() - started:.0f}s)")
        if score > result.score:
            result.score, result.dev, result.step = score, table, step
            result.state = {k: p.detach().float().cpu().clone() for k, p in params.items()}

    step = 0
    for step in range(1, spec.steps + 1):
        model.train()
        idx = next(batches)
        ids, mask = collate([train.ids[i] for i in idx], pad, spec.max_len, device)
        labels = train.labels[idx].to(device)
        with amp if amp is not None else torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        loss_ema = value if loss_ema is None else 0.98 * loss_ema + 0.02 * value
        if not math.isfinite(value):
            log(f"  {spec.name}: loss is {value} at step {step}; run abandoned")
            break
        out_of_time = time.time() > deadline
        if step % spec.eval_every == 0 or step == spec.steps or out_of_time:
            evaluate(step)
        if out_of_time:
            log(f"  {spec.name}: stopped at step {step} of {spec.steps} (time budget)")
            break
    result.steps_done = step
    result.seconds = time.time() - started
    return result


def svd_pairs(delta: torch.Tensor, ranks: Sequence[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{r: (A, B)}`` with ``B @ A`` the best rank-``r`` approximation of ``delta`` (scale 1).

    One SVD serves every rank; a rank above the matrix's is capped (exact).
    """
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    out = {}
    for rank in ranks:
        r = min(rank, len(s))
        root = s[:r].sqrt()
        out[rank] = ((root[:, None] * vh[:r]).cpu(), (u[:, :r] * root).cpu())
    return out


def export_full(run: RunResult | None, state: dict[str, torch.Tensor],
                base: dict[str, torch.Tensor], ranks: Sequence[int], name: str) -> list[Candidate]:
    """A ``full`` checkpoint as adapters, one per rank: matrix changes as low-rank pairs, the rest whole."""
    pairs: dict[int, dict[str, torch.Tensor]] = {r: {} for r in ranks}
    whole: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module is not None and ".encoder.layer." in key and module.endswith(Recipe.targets):
            delta = tensor.to(base[key].device) - base[key]
            for rank, (a, b) in svd_pairs(delta, ranks).items():
                pairs[rank][f"{module}.lora_a"], pairs[rank][f"{module}.lora_b"] = a, b
        else:
            whole[key] = tensor
    return [Candidate(f"{name}-rank{r}", pairs[r], whole, r, float(r), run) for r in ranks]


def export_lora(run: RunResult) -> Candidate:
    """A ``lora`` checkpoint as an adapter (exactly what was trained)."""
    pairs = {k: v for k, v in run.state.items() if k.endswith((".lora_a", ".lora_b"))}
    whole = {k: v for k, v in run.state.items() if k not in pairs}
    return Candidate(run.spec.name, pairs, whole, run.spec.rank, run.spec.alpha, run)


def exported_model(pack: Pack, cand: Candidate) -> BertForSequenceClassification:
    """The model the runtime would assemble from ``cand`` (fp16 tensors merged onto the base)."""
    state = {k: v.clone() for k, v in pack.base.items()}
    merge_into(state, {k: v.half().float() for k, v in cand.lora.items()}, cand.alpha / cand.rank)
    for key, tensor in cand.full.items():
        state[key] = tensor.half().float()
    model = BertForSequenceClassification(pack.config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise ValueError(f"exported state does not fit: missing={missing} unexpected={unexpected}")
    return model


def calibrated_dev(examples: Sequence[Example], logits: torch.Tensor) -> dict[str, float]:
    """Dev at its own fitted temperature: :func:`dev_scores` (accuracy, NLL per language and
    their mean) and per language the errors at a calibrated score >= CONFIDENT."""
    out = dev_scores(examples, logits)
    probs = torch.softmax(logits / out["temperature"], -1)
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    wrong_and_sure = (probs.argmax(-1) != labels) & (probs.max(-1).values >= CONFIDENT)
    for lang in sorted({e.lang for e in examples}):
        mask = torch.tensor([e.lang == lang for e in examples])
        out[f"confident_{lang}"] = int((wrong_and_sure & mask).sum())
    return out


def score_candidate(pack: Pack, cand: Candidate, device: torch.device,
                    log: Callable[[str], None]) -> None:
    model = nn.Module.to(exported_model(pack, cand), device)
    dev = pack.splits["dev"]
    logits = split_logits(model, dev, pack.pad_id, device)
    cand.dev = accuracy_table(dev.examples(), logits.argmax(-1).tolist())
    cand.score = dev_mean(cand.dev)
    cand.calibrated = calibrated_dev(dev.examples(), logits)
    langs = " ".join(f"{k} {v['acc']:.4f}" for k, v in cand.dev.items() if "/" not in k)
    langs += (f"; calibrated NLL {cand.calibrated['nll_mean']:.4f}, errors >= {CONFIDENT} "
              + "/".join(str(v) for k, v in cand.calibrated.items() if k.startswith("confident_")))
    if "dev_composed" in pack.splits:
        composed = pack.splits["dev_composed"]
        cand.composed = accuracy_table(
            composed.examples(),
            split_logits(model, composed, pack.pad_id, device).argmax(-1).tolist())
        langs += f"; composed dev mean {dev_mean(cand.composed):.4f}"
    log(f"candidate {cand.name}: dev {langs} mean {cand.score:.4f} ({cand.params / 1e6:.2f} M params)")


def pick(candidates: Sequence[Candidate], select: str = "accuracy") -> Candidate:
    """The adapter to keep: the best dev mean, or, when the pack has composed dev
    texts, the best of those among the candidates within GUARD of the best dev
    mean (ties: the higher dev mean, then the smaller adapter).

    ``select="nll"``: the lowest calibrated dev NLL (mean of the languages), a
    proper score that charges a sure wrong answer more than a hesitant one, as
    ``model interpolate`` picks α (ties: the higher dev mean, then the smaller adapter).
    """
    if select == "nll":
        return min(candidates, key=lambda c: (round(c.calibrated["nll_mean"], 6),
                                              -round(c.score, 6), c.params))
    if select != "accuracy":
        raise ValueError(f"unknown selection {select!r}: accuracy or nll")
    top = max(round(c.score, 6) for c in candidates)
    near = [c for c in candidates if c.composed is None or round(c.score, 6) >= top - GUARD]
    return max(near, key=lambda c: (round(dev_mean(c.composed), 6) if c.composed else 0.0,
                                    round(c.score, 6), -c.params))


def default_plan(n_train: int, epochs: float = 3.0) -> list[RunSpec]:
    """The GPU plan: eight full runs (two learning rates; ``--parallel 8`` trains them
    at once) interleaved with all-layer LoRA runs."""
    steps = max(1, math.ceil(epochs * n_train / 32))
    full = [RunSpec("full", seed, steps, lr, warmup_steps=steps // 16)
            for seed, lr in zip(range(13, 21), (5e-5, 1e-4) * 4, strict=True)]
    lora_runs = [RunSpec("lora", seed, 3000, 6e-4) for seed in (13, 14, 15)]
    plan = []
    for i in range(max(len(full), len(lora_runs))):
        plan += full[i : i + 1] + lora_runs[i : i + 1]
    return plan


def rehearsal_plan() -> list[RunSpec]:
    """The same steps at toy sizes, for the CPU rehearsal and the tests."""
    return [RunSpec("full", 13, 4, 1e-4, batch_size=8, max_len=32, warmup_steps=1, eval_every=2),
            RunSpec("lora", 13, 4, 6e-4, batch_size=8, max_len=32, warmup_steps=1, eval_every=2),
            RunSpec("full", 14, 4, 1e-4, batch_size=8, max_len=32, warmup_steps=1, eval_every=2)]


def _runs_json(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    return [{"spec": asdict(r.spec), "best_step": r.step, "steps_done": r.steps_done,
             "seconds": round(r.seconds, 1), "dev": r.dev, "curve": r.curve} for r in runs]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()}, {os.cpu_count()} CPUs"


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.full_train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="wall time for the whole job; runs that would not fit are skipped")
    ap.add_argument("--reserve-s", type=float, default=150.0,
                    help="part of the budget kept for scoring, calibration and the evaluation")
    ap.add_argument("--modes", default="full,lora", help="run kinds to include (full, lora)")
    ap.add_argument("--ranks", default="16,32,64,128",
                    help="ranks a full run's matrix changes are stored at (each scored on dev)")
    ap.add_argument("--split-mib", type=float, default=DEFAULT_LIMIT / 2**20,
                    help="a written file larger than this comes back in parts "
                         "(`bertstream model join` puts them together)")
    ap.add_argument("--max-runs", type=int, default=None)
    ap.add_argument("--select", choices=SELECTIONS, default="accuracy",
                    help="what picks the candidate on dev: accuracy (with the composed dev "
                         "texts' guard) or the calibrated NLL")
    ap.add_argument("--head-seed", type=int, default=None,
                    help="draw every full run's pooler and classifier from this seed "
                         "(default: each run's own seed)")
    ap.add_argument("--rehearse", action="store_true", help="toy sizes: the CPU rehearsal")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parallel", type=int, default=1,
                    help="train the plan's first N runs at once, one process each (N > 1)")
    # A --parallel child: one named run of the plan, its checkpoint to a file, by a deadline.
    ap.add_argument("--child-run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.modes) - set(MODES):
        ap.error(f"unknown mode in {args.modes}: use {MODES}")
    args.ranks = sorted({int(r) for r in args.ranks.split(",") if r})
    if args.child_run is not None and args.child_out is None:
        ap.error("--child-run needs --child-out")
    return args


def run_plan(pack: Pack, plan: Sequence[RunSpec], device: torch.device, deadline: float,
             log: Callable[[str], None]) -> tuple[list[RunResult], list[str]]:
    """Run ``plan`` in order; skip a run that would not end before ``deadline`` (the longest so far)."""
    runs: list[RunResult] = []
    skipped: list[str] = []
    for spec in plan:
        longest = max((r.seconds for r in runs), default=0.0)
        if runs and time.time() + longest > deadline:
            skipped.append(spec.name)
            continue
        log(f"run {spec.name}: {json.dumps(asdict(spec))}")
        run = train_run(pack, spec, device, deadline, log)
        if run.state:
            runs.append(run)
        log(f"run {spec.name} done: best dev {run.score:.4f} at step {run.step} "
            f"of {run.steps_done}, {run.seconds:.0f}s")
    if skipped:
        log(f"not run (time budget): {', '.join(skipped)}")
    return runs, skipped


def save_run(run: RunResult, path: Path) -> None:
    """Write a run's best checkpoint and record (a ``--parallel`` child hands it to its parent)."""
    torch.save({"spec": asdict(run.spec), "state": run.state, "dev": run.dev, "score": run.score,
                "step": run.step, "seconds": run.seconds, "steps_done": run.steps_done,
                "curve": run.curve}, path)


def load_run(path: Path) -> RunResult:
    """Read what :func:`save_run` wrote (tensors and plain values only)."""
    raw = torch.load(path, weights_only=True)
    return RunResult(RunSpec(**raw["spec"]), raw["state"], raw["dev"], raw["score"], raw["step"],
                     raw["seconds"], raw["steps_done"], raw["curve"])


def run_parallel(args: argparse.Namespace, plan: Sequence[RunSpec], deadline: float,
                 log: Callable[[str], None]) -> tuple[list[RunResult], list[str]]:
    """The first ``args.parallel`` runs of ``plan`` at once, one process each, on the same device.

    A small model leaves a large GPU mostly idle (each step waits on the
    Python side), so several processes train side by side in about the time
    of one. Each child stops at ``deadline`` like a sequential run and hands
    back its best checkpoint through a file; a child that fails is logged and
    left out.
    """
    chosen = list(plan[: args.parallel])
    skipped = [s.name for s in plan[args.parallel:]]
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, len(chosen)))
    runs: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="full-train-") as tmp:
        procs: list[tuple[RunSpec, Path, subprocess.Popen[bytes]]] = []
        for spec in chosen:
            path = Path(tmp) / f"{spec.name}.pt"
            cmd = [sys.executable, "-m", "training.full_train", "--pack", str(args.pack),
                   "--out", tmp, "--device", args.device, "--threads", str(threads),
                   "--child-run", spec.name, "--child-out", str(path), "--deadline", repr(deadline)]
            if args.rehearse:
                cmd.append("--rehearse")
            if args.head_seed is not None:
                cmd += ["--head-seed", str(args.head_seed)]
            log(f"run {spec.name} (process {len(procs) + 1} of {len(chosen)}): {json.dumps(asdict(spec))}")
            procs.append((spec, path, subprocess.Popen(cmd)))
        for spec, path, proc in procs:
            try:  # a child past its deadline by a minute is hung, not slow
                code = proc.wait(timeout=max(1.0, deadline + 60 - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if code != 0 or not path.exists():
                log(f"run {spec.name}: process exited {code}; left out")
                continue
            run = load_run(path)
            if run.state:
                runs.append(run)
            log(f"run {spec.name} done: best dev {run.score:.4f} at step {run.step} "
                f"of {run.steps_done}, {run.seconds:.0f}s")
    if skipped:
        log(f"not run (beyond --parallel): {', '.join(skipped)}")
    return runs, skipped


def candidates_of(pack: Pack, runs: Sequence[RunResult], ranks: Sequence[int],
                  device: torch.device, log: Callable[[str], None]) -> list[Candidate]:
    """Every run as exported (a full run at each rank), the soup of the full runs; dev-scored."""
    base = {k: v.to(device) for k, v in pack.base.items()}
    out: list[Candidate] = []
    fulls = [r for r in runs if r.spec.mode == "full"]
    for run in runs:
        if run.spec.mode == "lora":
            out.append(export_lora(run))
        else:
            out += export_full(run, run.state, base, ranks, run.spec.name)
    if len(fulls) > 1:
        soup = {k: torch.stack([r.state[k] for r in fulls]).mean(0) for k in fulls[0].state}
        out += export_full(None, soup, base, ranks, f"soup{len(fulls)}")
    for cand in out:
        score_candidate(pack, cand, device, log)
    return out


def evaluate_pick(pack: Pack, model: nn.Module, device: torch.device,
                  temperature: float | None = None,
                  ) -> tuple[EvalReport, dict[str, Any], torch.Tensor]:
    """Calibrate on dev, then the one look at test, the suite and the neutral items.

    ``temperature``: use this one (e.g. the one an adapter serves with) instead
    of fitting; the calibration record is then empty.
    """
    pad = pack.pad_id
    calibration: dict[str, Any] = {}
    if temperature is None:
        dev = pack.splits["dev"]
        calibration = calibration_record(split_logits(model, dev, pad, device), dev.labels,
                                         pack.meta["max_len"])
        temperature = float(calibration["temperature"])
    test = pack.splits["test"]
    examples = test.examples()
    test_logits = split_logits(model, test, pad, device)
    suite_logits = split_logits(model, pack.splits["suite"], pad, device)
    report = evaluate_logits(examples, test_logits, temperature, pack.meta["max_len"],
                             pack.suite, suite_logits, split="test",
                             seed=pack.meta.get("split_seed"))
    if len(pack.splits["neutral"].ids):
        report.neutral = neutral_report(examples, test_logits,
                                        split_logits(model, pack.splits["neutral"], pad, device),
                                        temperature)
    return report, calibration, test_logits


def baseline_report(pack: Pack, device: torch.device) -> EvalReport:
    """The baseline adapter on test and the suite, at the temperature it serves with
    (its stored one; fitted on dev when it has none), as ``model eval`` measures it."""
    assert pack.baseline is not None
    adapter = pack.baseline
    cand = Candidate("baseline", adapter.lora, adapter.full, int(adapter.meta["lora"]["rank"]),
                     float(adapter.meta["lora"]["alpha"]))
    model = nn.Module.to(exported_model(pack, cand), device)
    stored = (adapter.meta.get("calibration") or {}).get("temperature")
    return evaluate_pick(pack, model, device, None if stored is None else float(stored))[0]


def as_adapter(pack: Pack, cand: Candidate) -> Adapter:
    """``cand`` as the runtime would load it (fp16-rounded), for :func:`interpolate`."""
    return Adapter({k: v.half().float() for k, v in cand.lora.items()},
                   {k: v.half().float() for k, v in cand.full.items()},
                   {"base": pack.base_meta, "labels": {"0": "negative", "1": "positive"},
                    "lora": {"rank": cand.rank, "alpha": cand.alpha}})


def second_chance(pack: Pack, best: Candidate, device: torch.device,
                  log: Callable[[str], None], alphas: Sequence[float] = ALPHAS,
                  ) -> tuple[float, dict[str, dict[str, float]], Candidate | None]:
    """The interpolation from the baseline towards ``best`` (``model interpolate``'s rule).

    Each α of ``alphas`` is scored on dev (calibrated NLL, mean of the
    languages; the lowest wins, ties to the smaller α). Gives α, the grid and
    the interpolated candidate (None at α 0, the baseline itself).
    """
    assert pack.baseline is not None
    target = as_adapter(pack, best)
    dev = pack.splits["dev"]
    rank = max(_rank(pack.baseline) + _rank(target), 1)  # scale 1, as write_interpolated
    grid: dict[float, dict[str, float]] = {}
    mixes: dict[float, Candidate] = {}
    for alpha in alphas:
        lora, full = interpolate(pack.baseline, target, alpha, pack.base)
        mixes[alpha] = Candidate(f"baseline→{best.name} α={alpha:g}", lora, full, rank, float(rank))
        model = nn.Module.to(exported_model(pack, mixes[alpha]), device)
        grid[alpha] = dev_scores(dev.examples(), split_logits(model, dev, pack.pad_id, device))
        log(f"interpolation α {alpha:g}: dev " + json.dumps(grid[alpha]))
    alpha = pick_alpha(grid)
    return alpha, {f"{a:g}": v for a, v in grid.items()}, (mixes[alpha] if alpha > 0 else None)


def apply_rule(pack: Pack, best: Candidate, report: EvalReport, device: torch.device,
               log: Callable[[str], None], alphas: Sequence[float] = ALPHAS) -> dict[str, Any]:
    """The adoption rule on the device: the pick, then (if it fails) its one second chance.

    The baseline is evaluated as it serves; the pick is judged against it
    (training.verdict); a pick that fails gets the interpolation towards it,
    evaluated once and judged the same way. What is adopted is still decided
    on the CPU, where ``bertstream model verdict`` repeats the evaluation.
    """
    assert pack.baseline is not None
    if pack.baseline.meta.get("base") != pack.base_meta:
        log(f"rule not applied: the baseline adapter is for {pack.baseline.meta.get('base')}")
        return {"applied": False, "reason": "the baseline adapter is for another base model"}
    baseline = baseline_report(pack, device).as_dict()
    out: dict[str, Any] = {"applied": True, "baseline": baseline,
                           "baseline_sha256": pack.meta.get("baseline", {}).get("adapter_sha256")}
    try:
        verdict = judge(baseline, report.as_dict())
    except ValueError as exc:  # e.g. a rehearsal pack without the original English sources
        log(f"rule not applied: {exc}")
        return {**out, "applied": False, "reason": str(exc)}
    out["pick"] = verdict.as_dict()
    log(f"the rule, {best.name} against the baseline:\n"
        + format_verdict(verdict, "baseline", "pick"))
    if verdict.adopt:
        return out
    alpha, grid, mix = second_chance(pack, best, device, log, alphas)
    chance: dict[str, Any] = {"alpha": alpha, "dev": grid,
                              "select": "lowest calibrated dev NLL, mean of the languages; "
                                        "ties: the smaller alpha"}
    if mix is None:
        log("second chance: α 0 (the baseline itself); nothing to judge")
    elif alpha == 1.0:
        chance["verdict"] = verdict.as_dict()
        log("second chance: α 1 (the pick itself), judged above")
    else:
        model = nn.Module.to(exported_model(pack, mix), device)
        mixed, calibration, _ = evaluate_pick(pack, model, device)
        origin = pack.meta.get("baseline", {}).get("from", "BASELINE")
        second = judge(baseline, mixed.as_dict())
        chance.update(verdict=second.as_dict(), eval=mixed.as_dict(), calibration=calibration,
                      rebuild=f"bertstream model interpolate --from {origin} --to OUT/adapter "
                              f"--alpha {alpha:g} --out MIX --more-data")
        log(f"second chance, α {alpha:g}, against the baseline:\n"
            + format_verdict(second, "baseline", f"α {alpha:g}"))
    out["second_chance"] = chance
    return out


def adapter_meta(pack: Pack, best: Candidate, runs: Sequence[RunResult], report: EvalReport,
                 calibration: dict[str, Any], select: str = "accuracy") -> dict[str, Any]:
    """The picked adapter's meta.json: recipe, data, dev, calibration and the test figures."""
    src = best.source
    return {
        "name": "bertstream-sentiment-e5small",
        "base": pack.base_meta,
        "recipe": {
            "trainer": "training/full_train.py",
            "candidate": best.name,
            "run": (asdict(src.spec) if src is not None
                    else [asdict(r.spec) for r in runs if r.spec.mode == "full"]),
            "frozen_layers": 0,
            "word_embeddings": "frozen",
            "stored_rank": best.rank,
            "selection": ("lowest calibrated dev NLL (mean of zh, en) over every candidate, "
                          "as exported" if select == "nll" else
                          "best mean accuracy on the composed dev texts among the candidates "
                          f"within {GUARD} of the best dev mean (zh, en), as exported"
                          if best.composed is not None else
                          "best dev mean accuracy (zh, en) over every candidate, as exported"),
        },
        "lora": {"rank": best.rank, "alpha": best.alpha, "modules": len(best.lora) // 2},
        "data": {name: group_counts(pack.splits[name].examples()) for name in ("train", "dev")},
        "data_sha256": pack.meta["data_sha256"],
        "labels": {"0": "negative", "1": "positive"},
        "steps": src.step if src is not None else None,
        "train_seconds": round(sum(r.seconds for r in runs)),
        "dev": best.dev,
        **({"dev_composed": best.composed} if best.composed is not None else {}),
        "dev_calibrated": best.calibrated,
        "calibration": calibration,
        "test": report.heldout,
        "eval_max_len": pack.meta["max_len"],
        "suite": report.suite,
        "ece_test": report.ece,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, pick on dev, calibrate, evaluate once on test and the suite; write ``--out``."""
    args = _args(argv)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {line}", flush=True)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    pack = load_pack(args.pack)
    log(f"pack {args.pack}: {pack.meta['counts']}, {pack.meta['vocab_rows']} vocabulary rows; "
        f"device {device} ({_device_name(device)})")
    plan = rehearsal_plan() if args.rehearse else default_plan(len(pack.splits["train"].ids))
    if args.head_seed is not None:
        plan = [replace(s, head_seed=args.head_seed) if s.mode == "full" else s for s in plan]
    plan = [s for s in plan if s.mode in args.modes][: args.max_runs]
    deadline = t0 + args.budget_s - args.reserve_s
    if args.child_run is not None:
        spec = next(s for s in plan if s.name == args.child_run)
        run = train_run(pack, spec, device, args.deadline or deadline, log)
        save_run(run, args.child_out)
        return {}
    if args.parallel > 1:
        runs, skipped = run_parallel(args, plan, deadline, log)
    else:
        runs, skipped = run_plan(pack, plan, device, deadline, log)
    if not runs:
        raise SystemExit("no run finished a dev evaluation")
    # Written now and replaced at the end: a call cut short still brings back the runs' curves.
    (args.out / "report.json").write_text(json.dumps(
        {"partial": True, "runs": _runs_json(runs), "skipped": skipped}, indent=1) + "\n")
    candidates = candidates_of(pack, runs, args.ranks, device, log)
    best = pick(candidates, args.select)
    log(f"picked on dev ({args.select}): {best.name} (mean {best.score:.4f}, "
        f"calibrated NLL {best.calibrated['nll_mean']:.4f})")

    model = nn.Module.to(exported_model(pack, best), device)
    report, calibration, test_logits = evaluate_pick(pack, model, device)
    log("the picked adapter, evaluated once on test\n" + format_report(report, "test"))
    test = pack.splits["test"]
    try:
        write_reliability(test.examples(), test_logits, report.temperature,
                          args.out / "reliability.png",
                          f"{best.name}, split test ({len(test.ids)} texts), "
                          f"max_len {pack.meta['max_len']}")
    except ImportError as exc:  # matplotlib is optional
        log(f"no reliability diagram: {exc}")
    save_adapter(args.out / "adapter", best.lora, best.full,
                 adapter_meta(pack, best, runs, report, calibration, args.select))
    suite = pack.splits["suite"]
    probe = split_logits(model, Split(suite.ids[:8], suite.labels[:8], suite.groups[:8]),
                         pack.pad_id, device)
    out: dict[str, Any] = {
        "device": {"type": device.type, "name": _device_name(device),
                   "torch": torch.__version__, "python": sys.version.split()[0]},
        "pack": {k: pack.meta[k] for k in ("counts", "tokens", "vocab_rows", "data_sha256", "max_len")},
        "runs": _runs_json(runs),
        "skipped": skipped,
        "select": args.select,
        "candidates": [{"name": c.name, "rank": c.rank, "params": c.params, "dev_score": c.score,
                        "dev_calibrated": c.calibrated,
                        "dev": {k: v for k, v in c.dev.items() if "/" not in k},
                        **({"dev_composed": c.composed} if c.composed is not None else {})}
                       for c in candidates],
        "picked": best.name,
        "eval": report.as_dict(),
        # Logits of the first suite texts: the assembled model must give the same (a test checks).
        "probe_suite_logits": probe.tolist(),
    }
    if pack.baseline is not None:
        try:
            out["rule"] = apply_rule(pack, best, report, device, log)
        except Exception as exc:  # the call's adapter and report must come back regardless
            log(f"rule not applied: {exc!r}")
            out["rule"] = {"applied": False, "reason": repr(exc)}
    split = split_large(args.out / "adapter", int(args.split_mib * 2**20))
    if split:
        out["split"] = [str(p.relative_to(args.out)) for p in split]
        log(f"split into parts of at most {args.split_mib:g} MiB (join them with `bertstream "
            f"model join DIR`): {', '.join(out['split'])}")
    out["seconds"] = round(time.time() - t0, 1)
    (args.out / "report.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    log(f"wrote {args.out / 'adapter'} and report.json ({time.time() - t0:.0f}s in all); "
        f"dev of the pick:\n{format_table(best.dev)}")
    return out

if __name__ == "__main__":
    main()
