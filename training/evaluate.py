"""Held-out accuracy, calibration error and the behavioural suite of a sequence classifier."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from training.behaviour import (
    CONFIDENT,
    LABELS,
    SuiteItem,
    confident_errors,
    format_suite_table,
    load_suite,
    suite_table,
)
from training.calibration import (
    ece,
    fit_temperature,
    neutral_tradeoff,
    nll,
    reliability_bins,
    reliability_png,
)
from training.data import Example
from worker.sentiment.calibration import load_temperature

NEUTRAL_THRESHOLDS = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
#: Seconds between two progress lines (stderr) of :func:`predict_logits` given ``progress``.
PROGRESS_EVERY_S = 15.0

try:
    from contract.errors import ModelLoadError
except ImportError:  # the lent GPU machine (training.full_train) has no contract package
    ModelLoadError = RuntimeError  # type: ignore[misc,assignment]


class UnusableModel(ModelLoadError):
    """The model folder cannot be measured as a negative/positive sentiment classifier.

    Its labels are not exactly "negative" and "positive", or its weights lack
    parameters (the classification head) that loading would fill at random.
    The CLI prints it as one ``error:`` line.
    """


def label_columns(config: Any) -> list[int]:
    """The logit columns of "negative" and "positive", in that order, from a model config.

    Everything here (accuracy, ECE, the suite, the judge of composed texts)
    reads column 0 as negative and column 1 as positive, so
    :func:`predict_logits` reorders a model's logits with these columns
    first; a model whose config lists ``{0: "positive", 1: "negative"}`` is
    then measured as the worker (which reads ``id2label``) serves it.

    Names are matched case-insensitively in ``id2label`` (the worker's source
    of truth); ``label2id``, when it names the same labels, must agree. The
    model must have exactly these two labels: any other label, including a
    third "neutral" column, is refused (:class:`UnusableModel`) rather than
    dropped, because the worker would serve that column and a figure measured
    without it would not be the served model's. A topic model or an unnamed
    head (``LABEL_0``/``LABEL_1``) is refused the same way.
    """
    id2label = {int(i): str(name).strip().lower()
                for i, name in (getattr(config, "id2label", None) or {}).items()}
    num_labels = int(getattr(config, "num_labels", len(id2label)) or len(id2label))
    names = [id2label.get(i, f"label_{i}") for i in range(max(num_labels, len(id2label)))]
    if sorted(names) != sorted(LABELS):
        raise UnusableModel(
            f"the model's labels are {names} (config id2label); evaluation needs exactly "
            f"{list(LABELS)} (any order, any case): a model with other labels, or with a "
            f"third one such as 'neutral', is not measured as a sentiment classifier")
    columns = [names.index(label) for label in LABELS]
    label2id = {str(k).strip().lower(): v
                for k, v in (getattr(config, "label2id", None) or {}).items()}
    for label, column in zip(LABELS, columns, strict=True):
        if label in label2id and int(label2id[label]) != column:
            raise UnusableModel(
                f"the model's config disagrees with itself: id2label puts {label!r} at "
                f"{column}, label2id at {label2id[label]}")
    return columns


def _in_label_order(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` with columns [negative, positive] (:func:`label_columns` of the model's config).

    A module without a ``config`` (not a Hugging Face model) is taken as
    giving them in that order already.
    """
    config = getattr(model, "config", None)
    if config is None:
        return logits
    return logits[:, label_columns(config)]


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 32,
    max_len: int = 512,
    progress: str | None = None,
) -> torch.Tensor:
    """Give the float32 logits of each text, ``(len(texts), 2)``, in input order.

    The columns are [negative, positive] whatever order the model's config
    lists its labels in (:func:`label_columns`; a model without exactly
    these two labels is refused). Texts are sorted by length before batching so padding stays small; the
    model is put in eval mode (and left there). ``max_len`` is the truncation
    length: the worker serves the model's maximum (512). ``progress``: the name of
    these texts for lines on stderr (at the start, every :data:`PROGRESS_EVERY_S`
    seconds and at the end), so a long run on a slow machine shows it is working.
    """
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: torch.Tensor | None = None
    started = said = time.monotonic()
    if progress:
        _progress(f"{progress}, {len(texts):,} texts ...")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        )
        logits = _in_label_order(model, model(**enc).logits.float())
        if out is None:
            out = torch.zeros((len(texts), logits.shape[-1]))
        out[torch.tensor(idx)] = logits
        done = start + len(idx)
        if progress and done < len(texts) and time.monotonic() - said >= PROGRESS_EVERY_S:
            said = time.monotonic()
            _progress(f"{progress}: {done:,} of {len(texts):,} texts, {said - started:.0f} s")
    if progress:
        _progress(f"{progress}: {len(texts):,} texts in {time.monotonic() - started:.0f} s")
    return out if out is not None else torch.zeros((0, 2))


def _progress(line: str) -> None:
    """A progress line of ``model eval`` on stderr (its stdout is the report)."""
    print(f"eval: {line}", file=sys.stderr, flush=True)


def predict(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 32,
    max_len: int = 128,
) -> list[int]:
    """Give the arg-max label of each text (0 negative, 1 positive), in input order.

    See :func:`predict_logits`: the model's own label order is mapped first.
    """
    logits = predict_logits(model, tokenizer, texts, batch_size, max_len)
    return [int(p) for p in logits.argmax(-1).tolist()]


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


@dataclass
class EvalReport:
    """What ``bertstream model eval`` measures, at one truncation length."""

    max_len: int
    heldout: dict[str, dict[str, float]]
    #: ECE (15 bins) per language and "all", raw softmax and after temperature.
    ece: dict[str, dict[str, float]]
    temperature: float
    suite: dict[str, dict[str, float]] | None = None
    #: Per language of the held-out texts: :func:`neutral_tradeoff` rows.
    neutral: dict[str, list[dict[str, float]]] | None = None
    #: The suite items read wrong at a calibrated score >= CONFIDENT (confident_errors).
    suite_confident: list[dict[str, Any]] | None = None
    #: The held-out split measured ("test" or "dev"); None: not recorded.
    split: str | None = None
    #: The split seed (the training seed) that chose the held-out texts; None: not recorded.
    seed: int | None = None
    #: The held-out texts' sources: ``{"lang/source": count}`` (which data, how many texts).
    sources: dict[str, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-able data."""
        return asdict(self)


def evaluate_logits(
    examples: Sequence[Example],
    logits: torch.Tensor,
    temperature: float,
    max_len: int,
    suite_items: Sequence[SuiteItem] = (),
    suite_logits: torch.Tensor | None = None,
    *,
    split: str | None = None,
    seed: int | None = None,
) -> EvalReport:
    """Build the report from logits already computed (held-out texts, then the suite).

    ``logits`` columns are [negative, positive] (as :func:`predict_logits`
    gives them). ``split`` and ``seed`` say which held-out texts these are
    (recorded, with the texts' sources, so that ``model verdict`` compares
    only reports measured alike; a report without them is refused there).
    Accuracy is the arg-max's (temperature never changes it); ECE is given
    before and after dividing the logits by ``temperature``; the suite's
    confident errors use the calibrated probabilities, as the worker serves.
    """
    preds = [int(p) for p in logits.argmax(-1).tolist()]
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    ece_table: dict[str, dict[str, float]] = {}
    for group in ("all", *sorted({e.lang for e in examples})):
        mask = torch.tensor([group in ("all", e.lang) for e in examples], dtype=torch.bool)
        ece_table[group] = {
            "n": int(mask.sum()),
            "raw": ece(torch.softmax(logits[mask], -1), labels[mask]),
            "calibrated": ece(torch.softmax(logits[mask] / temperature, -1), labels[mask]),
        }
    suite = sure_wrong = None
    if suite_items and suite_logits is not None:
        probs = torch.softmax(suite_logits / temperature, -1)
        suite, sure_wrong = suite_table(suite_items, probs), confident_errors(suite_items, probs)
    sources: dict[str, int] = defaultdict(int)
    for e in examples:
        sources[f"{e.lang}/{e.source}"] += 1
    return EvalReport(max_len, accuracy_table(examples, preds), ece_table, temperature, suite,
                      suite_confident=sure_wrong, split=split, seed=seed,
                      sources=dict(sorted(sources.items())))


def format_report(report: EvalReport, split: str) -> str:
    """The held-out table, the ECE lines and the suite table, as ``model eval`` prints them."""
    parts = [f"held-out split {split!r}, max_len {report.max_len}",
             format_table(report.heldout), "",
             f"expected calibration error (15 bins), temperature {report.temperature:.4f}",
             f"{'group':<22} {'n':>6} {'raw':>9} {'calibrated':>11}"]
    parts += [f"{k:<22} {int(v['n']):>6} {v['raw']:>9.4f} {v['calibrated']:>11.4f}"
              for k, v in report.ece.items()]
    if report.suite is not None:
        parts += ["", f"behavioural suite, max_len {report.max_len}, calibrated scores",
                  format_suite_table(report.suite)]
    if report.suite_confident:
        parts += ["", f"suite items read wrong at a calibrated score >= {CONFIDENT}"]
        parts += [f"{e['lang']} {e['category']:<12} {e['score']:.3f} {e['text']} "
                  f"(is {e['label']})" for e in report.suite_confident]
    for lang, rows in (report.neutral or {}).items():
        parts += ["", f"neutral band vs {lang} held-out texts (calibrated top probability < p)",
                  f"{'p':>5} {'neutral caught':>15} {'polar made neutral':>19} {'acc on rest':>12}"]
        parts += [f"{r['threshold']:>5.2f} {r['neutral_caught']:>15.3f} "
                  f"{r['polar_neutralised']:>19.3f} {r['polar_acc_kept']:>12.4f}" for r in rows]
    return "\n".join(parts)


def neutral_report(examples: Sequence[Example], logits: torch.Tensor,
                   neutral_logits: torch.Tensor, temperature: float,
                   thresholds: Sequence[float] = NEUTRAL_THRESHOLDS,
                   ) -> dict[str, list[dict[str, float]]]:
    """The neutral band's trade-off per language of ``examples`` (calibrated probabilities)."""
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    neutral = torch.softmax(neutral_logits / temperature, -1)
    out = {}
    for lang in sorted({e.lang for e in examples}):
        mask = torch.tensor([e.lang == lang for e in examples], dtype=torch.bool)
        out[lang] = neutral_tradeoff(torch.softmax(logits[mask] / temperature, -1),
                                     labels[mask], neutral, thresholds)
    return out


def eval_main(
    model_dir: Path | None = None,
    cache_dir: Path | None = None,
    vader_sdist: Path | None = None,
    more_data: Path | None = None,
    split: str = "test",
    seed: int = 13,
    batch_size: int = 32,
    max_len: int = 512,
    threads: int = 2,
    record_in: Path | None = None,
    suite: bool = True,
    neutral: bool = True,
    reliability_to: Path | None = None,
) -> EvalReport:
    """``bertstream model eval``: print and return held-out accuracy, ECE and the suite.

    Evaluates ``model_dir`` (an HF directory) or, when None, the default model
    assembled into ``cache_dir``, truncating at ``max_len`` tokens (512 is
    what the worker serves). ``split`` is "test" or "dev"; ``seed`` must be
    the training seed so the held-out texts are the ones training never saw.
    The model directory's ``calibration.json`` temperature, when present,
    gives the calibrated ECE and the suite's scores. ``neutral`` (with the
    vader sdist): the neutral band's trade-off on vader's near-neutral
    items (:func:`neutral_texts`). ``record_in``: an
    adapter directory whose meta.json gets the held-out table under
    ``split`` (this changes the adapter hash, hence the model revision).
    ``reliability_to``: write the reliability diagram PNG there (matplotlib).
    """
    from training.data import SplitSpec, load_examples

    model_dir = _resolve(model_dir, cache_dir)
    torch.set_num_threads(threads)
    model, tokenizer = _load(model_dir)
    temperature = load_temperature(model_dir) or 1.0
    examples = load_examples(vader_sdist, SplitSpec(seed=seed), more_data)[split]
    logits = predict_logits(model, tokenizer, [e.text for e in examples], batch_size, max_len,
                            progress=f"held-out {split!r} split")
    items = load_suite() if suite else []
    suite_logits = (predict_logits(model, tokenizer, [i.text for i in items], batch_size, max_len,
                                   progress="behavioural suite")
                    if items else None)
    report = evaluate_logits(examples, logits, temperature, max_len, items, suite_logits,
                             split=split, seed=seed)
    if neutral and vader_sdist is not None:
        texts = neutral_texts(vader_sdist, seed)
        report.neutral = neutral_report(
            examples, logits, predict_logits(model, tokenizer, texts, batch_size, max_len,
                                             progress="near-neutral texts (vader)"),
            temperature)
    print(format_report(report, split))
    if reliability_to is not None:
        write_reliability(examples, logits, temperature, reliability_to,
                          f"{model_dir.name}, split {split} ({len(examples)} texts), "
                          f"max_len {max_len}")
    if record_in is not None:
        meta_path = record_in / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta[split] = report.heldout
        meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return report


def write_reliability(examples: Sequence[Example], logits: torch.Tensor, temperature: float,
                      path: Path, title: str) -> None:
    """Reliability diagrams of the raw and the calibrated probabilities, side by side."""
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    series = {}
    for name, scaled in (("raw softmax", logits), (f"temperature {temperature:.2f}",
                                                   logits / temperature)):
        probs = torch.softmax(scaled, -1)
        series[f"{name} (ECE {ece(probs, labels):.3f})"] = reliability_bins(probs, labels)
    reliability_png(series, path, title)


def neutral_texts(vader_sdist: Path, seed: int = 13) -> list[str]:
    """Vader's items rated within 0.5 of neutral, less any text that is in a split."""
    from training.data import SplitSpec, load_examples, normalise, read_vader_neutral

    seen = {normalise(e.text) for split in load_examples(vader_sdist, SplitSpec(seed=seed)).values()
            for e in split}
    return [text for _, text, _ in read_vader_neutral(vader_sdist) if normalise(text) not in seen]


def calibration_record(dev_logits: torch.Tensor, dev_labels: torch.Tensor,
                       max_len: int) -> dict[str, Any]:
    """Fit the temperature on dev and give the ``calibration`` entry of an adapter's meta.json."""
    temperature = fit_temperature(dev_logits, dev_labels)
    return {
        "temperature": round(temperature, 4),
        "fitted_on": "dev",
        "method": "temperature scaling, NLL, golden-section search on log T in [0.05, 20]",
        "max_len": max_len,
        "dev_nll_raw": round(nll(dev_logits, dev_labels, 1.0), 4),
        "dev_nll_calibrated": round(nll(dev_logits, dev_labels, temperature), 4),
    }


def calibrate_main(
    adapter_dir: Path,
    cache_dir: Path,
    vader_sdist: Path | None = None,
    more_data: Path | None = None,
    seed: int = 13,
    batch_size: int = 32,
    max_len: int = 512,
    threads: int = 2,
) -> dict[str, Any]:
    """``bertstream model calibrate``: fit the temperature on dev, store it in the adapter.

    Assembles the model from ``adapter_dir``, computes the dev logits at
    ``max_len`` and writes :func:`calibration_record` under ``calibration``
    in its meta.json (a new adapter hash, hence a new model revision; the
    assembled directory then carries ``calibration.json``). Test is not read.
    """
    from training.data import SplitSpec, load_examples
    from worker.sentiment.assemble import ensure_model

    torch.set_num_threads(threads)
    model, tokenizer = _load(ensure_model(cache_dir, adapter_dir))
    dev = load_examples(vader_sdist, SplitSpec(seed=seed), more_data)["dev"]
    logits = predict_logits(model, tokenizer, [e.text for e in dev], batch_size, max_len)
    record = calibration_record(logits, torch.tensor([e.label for e in dev]), max_len)
    meta_path = adapter_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["calibration"] = record
    meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(record, indent=2))
    return record


def _resolve(model_dir: Path | None, cache_dir: Path | None) -> Path:
    from worker.sentiment.assemble import ensure_default_model

    if model_dir is not None:
        return model_dir
    if cache_dir is None:
        raise ValueError("give model_dir or cache_dir")
    return ensure_default_model(cache_dir)


def _load(model_dir: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The classifier and tokenizer of a local model folder (never the hub), checked.

    Refuses (:class:`UnusableModel`) a folder whose weights lack parameters
    the model has (loading would draw them at random: a folder saved without
    its classification head measures differently on every run) and one whose
    labels are not negative/positive (:func:`label_columns`).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from worker.runner import check_model_dir, check_vocabulary

    check_model_dir(model_dir)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        model_dir, output_loading_info=True, local_files_only=True)
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k)
                        for k in info.get("mismatched_keys") or ())
    if missing or mismatched:
        prefix = f"{model.base_model_prefix}."
        head = sorted(k for k in missing if not k.startswith(prefix))
        rest = sorted(set(missing) - set(head)) + mismatched
        what = (f"has no classification head ({', '.join(head)} not in its weights"
                + (f"; nor {', '.join(rest)}" if rest else "") + ")" if head
                else f"lacks weights ({', '.join(rest)})")
        raise UnusableModel(
            f"{model_dir} {what}: loading would fill them at random, so its figures "
            f"would mean nothing; give a folder saved with its whole classifier")
    label_columns(model.config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    check_vocabulary(tokenizer, model_dir)
    return model, tokenizer
