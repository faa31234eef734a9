"""Stream sources: a file or stdin, read line by line into raw items.

Files are read in binary and each line decoded as UTF-8 on its own, so one
undecodable or oversized line is refused alone and the rest go through.
Formats: ``jsonl`` (one object per line with ``text`` and optional ``id``,
``source``, ``meta``), ``lines`` (each line is a text) and ``auto`` (the first
non-blank line decides for the whole file: ``{`` means jsonl).
Blank lines are skipped silently (trailing newlines are common in both formats).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from contract.errors import InvalidInput
from contract.settings import Settings

FORMATS = ("auto", "jsonl", "lines")

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class SourceRecord:
    """One line of a source: a raw item to validate, or why the line is unusable.

    ``line`` is 1-based. Exactly one of ``item`` and ``error`` is set; an
    ``item`` is a dict with ``text`` and maybe ``id``/``source``/``meta``,
    not yet validated (see :class:`producer.items.ItemValidator`).
    """

    line: int
    item: dict[str, Any] | None = None
    error: str | None = None


def default_line_limit(settings: Settings) -> int:
    """Bytes one line may take: room for the longest valid text JSON-escaped, meta and ids.

    A guard against unbounded reads; the exact limits are checked per item.
    """
    return 6 * settings.max_text_chars + 2 * settings.max_meta_bytes + 12 * settings.max_id_chars + 1024


@contextmanager
def open_source(path: str | Path) -> Iterator[IO[bytes]]:
    """The binary stream for ``path`` (``-`` is stdin); closes files it opened.

    Raises :class:`InvalidInput` when the file cannot be opened.
    """
    if str(path) == "-":
        yield sys.stdin.buffer
        return
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InvalidInput(f"cannot open {path}: {exc.strerror or exc}") from exc
    with fh:
        yield fh


def read_records(
    stream: IO[bytes], *, fmt: str = "auto", max_line_bytes: int = 1 << 20
) -> Iterator[SourceRecord]:
    """Yield a :class:`SourceRecord` per non-blank line of ``stream``.

    Reads at most ``max_line_bytes + 1`` bytes per line, so a giant line
    never sits in memory whole: its rest is skipped and the line refused.
    """
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown source format {fmt!r}; expected one of {', '.join(FORMATS)}")
    mode = None if fmt == "auto" else fmt
    for number, raw in _lines(stream, max_line_bytes):
        if raw is None:
            yield SourceRecord(number, error=f"line is over the limit of {max_line_bytes} bytes")
            continue
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield SourceRecord(number, error=f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        if not text.strip():
            continue
        if mode is None:
            mode = "jsonl" if text.lstrip().startswith("{") else "lines"
        yield _parse_json(number, text) if mode == "jsonl" else SourceRecord(number, {"text": text})


def _lines(stream: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes without the line end), or None for an oversized line."""
    number = 0
    while True:
        raw = stream.readline(limit + 1)
        if not raw:
            return
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = stream.readline(1 << 16)
            yield number, None
            continue
        yield number, raw.rstrip(b"\r\n")


def _parse_json(number: int, text: str) -> SourceRecord:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return SourceRecord(number, error=f"invalid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(obj, dict):
        return SourceRecord(number, error=f"expected a JSON object, got {type(obj).__name__}")
    if "text" not in obj:
        return SourceRecord(number, error="missing 'text'")
    return SourceRecord(number, obj)
