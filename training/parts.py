"""Files too large for one transfer, split into parts and joined again with a checked hash.

A lent device brings back files of at most 16 MB each; a rank-128 adapter is
about 23 MB. :func:`split_large` (on the device) replaces each file above the
limit with ``NAME.part001``, ``NAME.part002``, ... and ``NAME.parts.json``
(the whole file's size and sha256, and each part's); :func:`join_parts` (here)
puts them back together and refuses a missing, truncated or altered part.
Standard library only: it runs on the device machine as it is.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from worker.sentiment.adapter_file import PARTS_MANIFEST_SUFFIX, atomic_write

MANIFEST_SUFFIX = PARTS_MANIFEST_SUFFIX
DEFAULT_LIMIT = 15 * 1024 * 1024  # under the 16 MB a device call brings back per file


class PartsError(RuntimeError):
    """A split file cannot be joined: a part is missing, has the wrong size or hash."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_path(path: Path) -> Path:
    """Where the manifest of ``path``'s parts lies."""
    return path.with_name(path.name + MANIFEST_SUFFIX)


def split_file(path: Path, limit: int = DEFAULT_LIMIT) -> list[Path]:
    """Replace ``path`` by parts of at most ``limit`` bytes and a manifest; give the parts."""
    if limit < 1:
        raise ValueError("limit must be at least one byte")
    data = path.read_bytes()
    parts: list[dict[str, Any]] = []
    written: list[Path] = []
    for index, start in enumerate(range(0, len(data), limit), start=1):
        chunk = data[start:start + limit]
        part = path.with_name(f"{path.name}.part{index:03d}")
        part.write_bytes(chunk)
        written.append(part)
        parts.append({"name": part.name, "bytes": len(chunk), "sha256": _sha256(chunk)})
    manifest = {"name": path.name, "bytes": len(data), "sha256": _sha256(data), "parts": parts}
    manifest_path(path).write_text(json.dumps(manifest, indent=1) + "\n")
    path.unlink()
    return written


def split_large(directory: Path, limit: int = DEFAULT_LIMIT) -> list[Path]:
    """Split every file under ``directory`` larger than ``limit``; give the files split."""
    large = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.stat().st_size > limit]
    for path in large:
        split_file(path, limit)
    return large


def _check_entry(manifest: Path, entry: Any, what: str) -> tuple[str, int, str]:
    """An entry's name, byte count and sha256, each of the right type, else PartsError."""
    if not isinstance(entry, dict):
        raise PartsError(f"{manifest}: not a parts manifest ({what} is not an object)")
    name, size, digest = entry.get("name"), entry.get("bytes"), entry.get("sha256")
    if not isinstance(name, str) or not name:
        raise PartsError(f"{manifest}: not a parts manifest ({what} has no 'name' string)")
    if Path(name).name != name or name in (".", ".."):
        raise PartsError(f"{manifest}: the file name {name!r} is not a plain name")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise PartsError(f"{manifest}: not a parts manifest ({what} has no 'bytes' count)")
    if not isinstance(digest, str) or len(digest) != 64:
        raise PartsError(f"{manifest}: not a parts manifest ({what} has no 'sha256' hash)")
    return name, size, digest


def join_file(manifest: Path) -> Path:
    """Join the parts a manifest names (checked), write the file, remove parts and manifest."""
    try:
        spec = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        raise PartsError(f"{manifest}: not a parts manifest ({exc})") from exc
    name, size, digest = _check_entry(manifest, spec, "the manifest")
    parts = spec.get("parts")
    if not isinstance(parts, list):
        raise PartsError(f"{manifest}: not a parts manifest ('parts' is not a list of parts)")
    entries = [_check_entry(manifest, part, f"part {i}") for i, part in enumerate(parts, 1)]
    chunks = []
    paths = [manifest.with_name(part_name) for part_name, _, _ in entries]
    for (_, part_bytes, part_sha), part_path in zip(entries, paths, strict=True):
        try:
            chunk = part_path.read_bytes()
        except OSError as exc:
            raise PartsError(f"{part_path}: missing ({exc.strerror})") from exc
        if len(chunk) != part_bytes or _sha256(chunk) != part_sha:
            raise PartsError(f"{part_path}: {len(chunk)} bytes, not the {part_bytes} bytes "
                             "with the hash the manifest names")
        chunks.append(chunk)
    data = b"".join(chunks)
    if len(data) != size or _sha256(data) != digest:
        raise PartsError(f"{manifest}: the joined parts do not give the file it names")
    target = manifest.with_name(name)
    atomic_write(target, lambda tmp: tmp.write_bytes(data))
    for part_path in paths:
        part_path.unlink()
    manifest.unlink()
    return target


def join_parts(directory: Path) -> list[Path]:
    """Join every split file under ``directory``; give the files written."""
    return [join_file(m) for m in sorted(directory.rglob("*" + MANIFEST_SUFFIX))]
