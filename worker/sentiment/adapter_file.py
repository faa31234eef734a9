"""The committed adapter: LoRA pairs + fully trained tensors + meta.json.

Layout of an adapter directory::

    adapter.safetensors   fp16; keys "lora.<module>.lora_a|lora_b" and "full.<param>"
    meta.json             recipe, data sizes, seed, steps, scores, lora scale

The hash of both files is the model revision: it names the assembled cache
entry and is recorded with every result the worker stores.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from worker.sentiment.errors import ReportedError

WEIGHTS = "adapter.safetensors"
META = "meta.json"


class AdapterError(ReportedError, RuntimeError):
    """The adapter directory is missing, incomplete, unreadable or does not fit the base.

    A ``ConfigError`` (:mod:`worker.sentiment.errors`): every command reports it in one line and exits 2.
    """


@dataclass(frozen=True)
class Adapter:
    """A loaded adapter: LoRA tensors, full replacement tensors and metadata."""

    lora: dict[str, torch.Tensor]
    full: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def scale(self) -> float:
        """The LoRA scale alpha / rank used in training."""
        return float(self.meta["lora"]["alpha"]) / float(self.meta["lora"]["rank"])


def save_adapter(
    directory: Path,
    lora: dict[str, torch.Tensor],
    full: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    """Write the adapter atomically (each file via a temp file + rename), weights as fp16."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"lora.{k}": v.detach().to(torch.float16).contiguous() for k, v in lora.items()}
    tensors.update(
        {f"full.{k}": v.detach().to(torch.float16).contiguous() for k, v in full.items()}
    )
    atomic_write(directory / WEIGHTS, lambda p: save_file(tensors, str(p)))
    atomic_write(
        directory / META,
        lambda p: p.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n"),
    )


def load_adapter(directory: Path) -> Adapter:
    """Read an adapter directory written by :func:`save_adapter` (tensors as fp32)."""
    try:
        tensors = load_file(str(directory / WEIGHTS))
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot read adapter in {directory}{_parts_hint(directory)}") from exc
    lora = {k[5:]: v.float() for k, v in tensors.items() if k.startswith("lora.")}
    full = {k[5:]: v.float() for k, v in tensors.items() if k.startswith("full.")}
    return Adapter(lora, full, meta)


def adapter_hash(directory: Path) -> str:
    """Give the sha256 (hex) over the adapter's two files: its revision."""
    digest = hashlib.sha256()
    for name in (WEIGHTS, META):
        try:
            digest.update((directory / name).read_bytes())
        except OSError as exc:
            raise AdapterError(f"cannot read {directory / name}{_parts_hint(directory)}") from exc
    return digest.hexdigest()


def _parts_hint(directory: Path) -> str:
    """The way out when the weights came back from a GPU call in parts."""
    if (directory / f"{WEIGHTS}{PARTS_MANIFEST_SUFFIX}").exists():
        return f" (it is in parts: run `bertstream model join {directory}` first)"
    return ""


#: Beside a file that came back from a GPU call in parts: the manifest naming them
#: (``training.parts`` writes and joins them).
PARTS_MANIFEST_SUFFIX = ".parts.json"


def atomic_write(target: Path, write: Callable[[Path], object], mode: int = 0o644) -> None:
    """Write ``target`` by ``write(tmp)`` on a temporary file beside it, then rename it over.

    A reader (or a crash) never meets half a file. ``mode``: mkstemp makes
    0600, and these files are committed and shipped.
    """
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
