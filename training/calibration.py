"""Temperature scaling, expected calibration error and the neutral band.

Temperature scaling (Guo et al., ICML 2017) divides the logits by one scalar
``T`` fitted on dev by negative log-likelihood; it never changes the arg-max
label, only how sure the scores are. The fitted ``T`` is stored in the
adapter's ``meta.json`` under ``calibration`` and written into the assembled
model directory as ``calibration.json`` (worker/sentiment/calibration.py), where
the worker's runner reads it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

ECE_BINS = 15


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    return float(torch.nn.functional.cross_entropy(logits.double() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor,
                    low: float = 0.05, high: float = 20.0, tol: float = 1e-4) -> float:
    """The temperature in ``[low, high]`` minimising NLL on ``(logits, labels)``.

    Golden-section search over log T: the NLL of a temperature-scaled
    softmax is unimodal in log T, and a bounded 1-D search needs no step
    size and cannot leave the bounds.
    """
    labels = labels.long()
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(logits, labels, math.exp(c)), nll(logits, labels, math.exp(d))
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(logits, labels, math.exp(d))
    return math.exp((a + b) / 2)


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor,
                     bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per confidence bin (equal width on [0, 1]): count, mean confidence, accuracy.

    Confidence is the top-class probability; a prediction with confidence
    ``c`` falls in bin ``ceil(c * bins) - 1`` (bins are closed on the right).
    """
    conf, pred = probs.max(dim=-1)
    hits = (pred == labels.long()).double()
    index = (torch.ceil(conf.double() * bins) - 1).clamp(0, bins - 1).long()
    out = []
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        out.append({
            "lo": b / bins, "hi": (b + 1) / bins, "n": n,
            "confidence": float(conf.double()[mask].mean()) if n else 0.0,
            "accuracy": float(hits[mask].mean()) if n else 0.0,
        })
    return out


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of (n_bin / n) * |accuracy - confidence|."""
    total = len(labels)
    if total == 0:
        return 0.0
    return sum(b["n"] / total * abs(b["accuracy"] - b["confidence"])
               for b in reliability_bins(probs, labels, bins))


def neutral_tradeoff(probs_polar: torch.Tensor, labels_polar: torch.Tensor,
                     probs_neutral: torch.Tensor,
                     thresholds: Sequence[float]) -> list[dict[str, float]]:
    """What a neutral band ``top probability < p`` does, for each ``p``.

    ``probs_polar``/``labels_polar``: texts with a clear label;
    ``probs_neutral``: texts people rated neutral. Gives, per threshold, the
    share of neutral texts labelled neutral, the share of polar texts
    labelled neutral, and the accuracy on the polar texts still labelled.
    """
    top_p, pred_p = probs_polar.max(dim=-1)
    top_n = probs_neutral.max(dim=-1).values
    rows = []
    for t in thresholds:
        kept = top_p >= t
        hits = (pred_p[kept] == labels_polar.long()[kept]).double()
        rows.append({
            "threshold": float(t),
            "neutral_caught": float((top_n < t).double().mean()) if len(top_n) else 0.0,
            "polar_neutralised": float((~kept).double().mean()),
            "polar_acc_kept": float(hits.mean()) if len(hits) else 0.0,
        })
    return rows


def reliability_png(series: dict[str, list[dict[str, float]]], path: Path,
                    title: str = "") -> None:
    """Draw reliability diagrams (one panel per series) into a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 4.2), squeeze=False)
    for ax, (name, bins) in zip(axes[0], series.items(), strict=True):
        width = bins[0]["hi"] - bins[0]["lo"]
        filled = [b for b in bins if b["n"]]
        ax.bar([b["lo"] for b in filled], [b["accuracy"] for b in filled], width=width,
               align="edge", edgecolor="black", color="#4c72b0", label="accuracy")
        ax.bar([b["lo"] for b in filled],
               [b["confidence"] - b["accuracy"] for b in filled],
               bottom=[b["accuracy"] for b in filled], width=width, align="edge",
               edgecolor="#c44e52", color="#c44e52", alpha=0.3, label="gap")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(name, fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
