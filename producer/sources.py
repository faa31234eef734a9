"""Stream sources: a file or stdin, read line by line into raw items.

Files are read in binary and each line (CSV: each record) decoded as UTF-8
on its own, so one undecodable or oversized line is refused alone and the
rest go through.
Formats: ``jsonl`` (one object per line with ``text`` and optional ``id``,
``source``, ``meta``), ``csv`` (a header record naming the columns, then one
record per line, or more where a quoted field holds line breaks: the record
is then bounded and refused as a whole and numbered by its first line),
``lines`` (each line is a text) and ``auto`` (the first non-blank line
decides for the whole file: ``{`` means jsonl).
Blank lines carry no record (trailing newlines are common in every format);
with ``keep_blank`` they are yielded, marked, so a stream's report counts them.
A :class:`FieldMap` says which field holds the text, id, source and time, for
JSONL, CSV and Redis Stream entries alike (:mod:`producer.redis_stream`).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from contract.errors import InvalidInput
from contract.settings import Settings
from producer.items import ITEM_KEYS

FORMATS = ("auto", "jsonl", "csv", "lines")

#: The key of ``meta`` that receives the value of ``--time-field``.
TIME_META_KEY = "time"

_BOM = b"\xef\xbb\xbf"
_QUOTE, _COMMA = ord('"'), ord(",")


@dataclass(frozen=True)
class SourceRecord:
    """One line of a source: a raw item to validate, or why the line is unusable.

    ``line`` is 1-based (for a Redis Stream: the entry's position in this
    run); ``ref`` is the Redis Stream entry id (None for files). Exactly one
    of ``item`` and ``error`` is set; an ``item`` is a dict with ``text`` and
    maybe ``id``/``source``/``meta``, not yet validated (see
    :class:`producer.items.ItemValidator`). ``id`` is the id a refused record
    gave, read as an accepted one's would be (None: none, or not readable), so
    the refusal can name it.
    """

    line: int
    item: dict[str, Any] | None = None
    error: str | None = None
    ref: str | None = None
    #: A blank line (only with ``read_records(keep_blank=True)``): neither item nor error.
    blank: bool = False
    #: The last line of a record that spans lines (a CSV quoted field with line
    #: breaks); None when it is ``line``.
    last: int | None = None
    #: The id a refused record gave (see :meth:`FieldMap.id_of`); None with an ``item``.
    id: str | None = None

    @property
    def where(self) -> str:
        """How a report names this record: ``line 7`` or ``entry 1700000000000-0``."""
        return f"entry {self.ref}" if self.ref is not None else f"line {self.line}"

    @property
    def next_line(self) -> int:
        """The first line after this record: where a run stopped after it resumes."""
        return (self.last if self.last is not None else self.line) + 1


@dataclass(frozen=True)
class FieldMap:
    """Which field of a source record holds the text, id, source tag and time.

    ``time`` (unset by default) is copied into ``meta["time"]`` as given. A
    ``meta`` field, when present, must be a JSON object (JSON text in CSV
    and stream entries). With the default map, no field option given, a
    JSONL object passes through as it is (so a misspelt key is refused);
    with another map, or any field named on purpose, only the mapped fields
    (and ``meta``) are taken and the rest ignored.
    """

    text: str = "text"
    id: str = "id"
    source: str = "source"
    time: str | None = None
    #: The fields the user named (``{"id", "time"}``): a CSV header must have those
    #: columns, while a default one may be missing. Not part of equality.
    given: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def is_default(self) -> bool:
        """True for the default map (text, id, source; no time) with no field named on
        purpose: naming one (even as its default) says other keys are to be ignored."""
        return self == FieldMap() and not self.given

    def check_header(self, header: list[str]) -> None:
        """Raise :class:`InvalidInput` when the text column, or a column named on
        purpose, is not in ``header``.

        Without this every row would be refused alone for its missing text, and a
        misspelt ``--id-field`` ignored row after row: random ids, and a re-run
        would store every text twice.
        """
        columns = ", ".join(repr(c) for c in header)
        for name in ("text", "id", "source", "time"):
            column = getattr(self, name)
            if column is None or column in header:
                continue
            if name in self.given:
                raise InvalidInput(
                    f"--{name}-field {column!r} is not a column of the CSV header "
                    f"(its columns: {columns})")
            if name == "text":
                raise InvalidInput(
                    f"the CSV header has no {column!r} column (its columns: {columns}); "
                    "name the text column with --text-field")

    def apply(self, obj: Mapping[str, Any], *, strings: bool = False) -> dict[str, Any] | str:
        """The raw item for ``obj``, or why it has none.

        ``strings``: every value is text (CSV cells, stream fields), so an
        empty one means absent and ``meta`` is parsed from JSON.
        """
        if self.text not in obj:
            if obj and self.text == "text" and "text" not in self.given:  # a misspelt key?
                return (f"missing 'text' (its fields: {_some_keys(obj)}; name the text field "
                        "with --text-field)")
            return f"missing {self.text!r}"
        item: dict[str, Any] = {"text": obj[self.text]}
        for key, name in (("id", self.id), ("source", self.source)):
            value = _numeric_as_text(obj.get(name))
            if value is not None and not (strings and value == ""):
                item[key] = value
        meta = obj.get("meta")
        if strings and meta == "":
            meta = None  # an empty cell is an absent meta, also beside --time-field
        if strings and isinstance(meta, str) and meta:
            try:
                meta = json.loads(meta)
            except (ValueError, RecursionError) as exc:
                return f"'meta' is not valid JSON ({_json_problem(exc)})"
        if self.time is not None and obj.get(self.time) not in (None, ""):
            if meta is not None and not isinstance(meta, dict):
                return "'meta' must be a JSON object"
            meta = {**(meta or {}), TIME_META_KEY: obj[self.time]}
        if meta not in (None, ""):
            item["meta"] = meta
        return item

    def id_of(self, obj: Mapping[str, Any], *, strings: bool = False) -> str | None:
        """The id ``obj`` gives, as :meth:`apply` takes it (an int as text), for naming a
        refused record: None when it gives none or its id is no text (a float, a list),
        as :class:`producer.items.ItemValidator` names a refused item's id."""
        value = _numeric_as_text(obj.get(self.id))
        if not isinstance(value, str) or (strings and value == ""):
            return None
        return value


def _json_problem(exc: ValueError | RecursionError) -> str:
    """Why ``json.loads`` refused a text, in a few words.

    Besides malformed JSON it raises ValueError for an integer of more digits
    than Python converts, and RecursionError for deep nesting: one bad record
    must be refused alone, not end the stream.
    """
    if isinstance(exc, json.JSONDecodeError):
        # some messages end in "at" already ("Invalid control character at")
        return f"{exc.msg.removesuffix(' at')} at column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(";")[0]  # drop the advice to call sys.set_int_max_str_digits


#: Keys a refusal names at most, and characters of each.
SHOWN_KEYS = 5
SHOWN_KEY_CHARS = 40


def _some_keys(keys: Iterable[Any]) -> str:
    """The first :data:`SHOWN_KEYS` of ``keys`` quoted, each cut short, for a refusal:
    a line may carry thousands of keys, or long ones."""
    names = [str(k) for k in keys]
    shown = ", ".join(repr(n if len(n) <= SHOWN_KEY_CHARS else n[:SHOWN_KEY_CHARS] + "...")
                      for n in names[:SHOWN_KEYS])
    more = len(names) - SHOWN_KEYS
    return f"{shown} and {more} more" if more > 0 else shown


def _numeric_as_text(value: Any) -> Any:
    """An int id or source as text (numeric post ids are common in JSON exports);
    anything else (floats and booleans too) as it is, for validation to judge."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def default_line_limit(settings: Settings) -> int:
    """Bytes one line may take: room for the longest valid text JSON-escaped, meta and ids.

    A guard against unbounded reads; the exact limits are checked per item. A
    character JSON-escapes to at most 12 bytes (an astral one is a surrogate
    pair, ``\\ud83d\\ude00``).
    """
    return 12 * settings.max_text_chars + 2 * settings.max_meta_bytes + 12 * settings.max_id_chars + 1024


@contextmanager
def open_source(path: str | Path) -> Iterator[IO[bytes]]:
    """The binary stream for ``path`` (``-`` is stdin); closes files it opened.

    Raises :class:`InvalidInput` when the file cannot be opened.
    """
    if str(path) == "-":
        # A reader of its own on fd 0, never closed, not ``sys.stdin.buffer``: a stream
        # reads its source in a daemon thread, and when the run ends early (Redis gone)
        # that thread is still blocked in a read holding the buffer's lock. Closing a
        # buffer waits for that lock (for ever on a quiet pipe), and the interpreter's
        # shutdown, closing ``sys.stdin``, aborted on it ("Fatal Python error", exit 134).
        # (An stdin with no file descriptor, as a test runner's, is read as it is.)
        if sys.stdin is None:  # started with fd 0 closed (`<&-`): Python sets it to None
            raise InvalidInput("cannot read standard input: it is closed")
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, OSError, ValueError):
            yield sys.stdin.buffer
            return
        yield open(fd, "rb", closefd=False)  # noqa: SIM115
        return
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InvalidInput(f"cannot open {path}: {exc.strerror or exc}") from exc
    with fh:
        yield fh


def read_records(
    stream: IO[bytes], *, fmt: str = "auto", max_line_bytes: int = 1 << 20,
    fields: FieldMap | None = None, keep_blank: bool = False,
) -> Iterator[SourceRecord]:
    """Yield a :class:`SourceRecord` per non-blank line of ``stream``
    (and per blank one, marked ``blank``, with ``keep_blank``: a stream counts them).

    Reads at most ``max_line_bytes + 1`` bytes per line, so a giant line
    never sits in memory whole: its rest is skipped and the line refused (a
    CSV record spanning lines is bounded as a whole). ``fields`` maps JSONL
    and CSV fields (see :class:`FieldMap`). Raises :class:`InvalidInput` when
    the CSV header cannot be read or lacks the text column or a column
    ``fields`` names on purpose.
    """
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown source format {fmt!r}; expected one of {', '.join(FORMATS)}")
    mapping = fields or FieldMap()
    if fmt == "csv":
        yield from _read_csv(stream, max_line_bytes, mapping, keep_blank)
        return
    mode = None if fmt == "auto" else fmt
    for number, raw in _lines(stream, max_line_bytes):
        if raw is None:
            yield SourceRecord(number, error=f"line is over the limit of {max_line_bytes} bytes")
            continue
        text = _decode(number, raw)
        if isinstance(text, SourceRecord):
            yield text
            continue
        if not text.strip():
            if keep_blank:
                yield SourceRecord(number, blank=True)
            continue
        if mode is None:
            mode = "jsonl" if text.lstrip().startswith("{") else "lines"
        if mode == "jsonl":
            yield _parse_json(number, text, mapping)
        else:
            yield SourceRecord(number, {"text": text})


def _read_csv(stream: IO[bytes], limit: int, mapping: FieldMap,
              keep_blank: bool) -> Iterator[SourceRecord]:
    """The records of a CSV source: the first non-blank record is the header.

    A record spanning lines is numbered by its first line (``last`` is its
    last). The header is checked at once: a header that cannot be read would
    otherwise make the first data row the header, and one without the text
    column would refuse every row alone.
    """
    _allow_csv_fields(limit)
    header: list[str] | None = None
    for first, last, raw, problem in _csv_spans(stream, limit):
        row: list[str] | str = problem or ""  # the cells, or why there are none
        if raw is not None:
            text = _decode(first, raw)
            if isinstance(text, SourceRecord):
                row = text.error or ""
            elif not text.strip():
                if keep_blank:
                    yield SourceRecord(first, blank=True)
                continue
            else:
                row = _csv_cells(text)
        if header is None:
            if isinstance(row, str):
                raise InvalidInput(f"the CSV header (line {first}) cannot be read: {row}")
            mapping.check_header(row)
            header = row
            continue
        end = last if last != first else None
        if isinstance(row, str):
            yield SourceRecord(first, error=row, last=end)
        else:
            yield _csv_record(first, end, header, row, mapping)


def _allow_csv_fields(max_line_bytes: int) -> None:
    """For CSV, let a field be as long as a record may be.

    The record limit bounds a field already; csv's own limit (128 KiB) would
    refuse a long text that the record and text limits allow. It is
    process-wide, so it is only ever raised.
    """
    if csv.field_size_limit() < max_line_bytes:
        csv.field_size_limit(max_line_bytes)


def _decode(number: int, raw: bytes) -> str | SourceRecord:
    """The line as text (a byte-order mark off the first), or the record of why not."""
    if number == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return SourceRecord(number, error=f"not valid UTF-8 ({exc.reason} at byte {exc.start})")


def _csv_cells(text: str) -> list[str] | str:
    """One record's CSV cells, or why it is not a CSV row."""
    try:
        return next(csv.reader([text]))
    except csv.Error as exc:
        return f"not a CSV row ({exc})"


def _lines(stream: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes without the line end), or None for an oversized line."""
    number = 0
    while True:
        raw = stream.readline(limit + 2)  # a line of the limit and its CR LF end
        if not raw:
            return
        number += 1
        line = raw.rstrip(b"\r\n")
        # a full read without LF goes on (CRs at the limit included): over it, as for CSV
        if len(line) > limit or (len(raw) > limit + 1 and not raw.endswith(b"\n")):
            while raw and not raw.endswith(b"\n"):
                raw = stream.readline(1 << 16)
            yield number, None
            continue
        yield number, line


def _csv_spans(stream: IO[bytes], limit: int) -> Iterator[tuple[int, int, bytes | None, str | None]]:
    """Lines joined into CSV records: a line that ends inside a quoted field goes on.

    Yields (first line, last line, the record's bytes without its line end or
    None, and then why it is refused). At most ``limit + 2`` bytes of a record
    are kept: a longer one is read to its end (its quotes followed, so the
    next record starts where it should) and refused; so is one whose quoted
    field is still open at the end of the input.
    """
    number = 0
    while True:
        raw = stream.readline(limit + 1)
        if not raw:
            return
        number += 1
        first = number
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        state = _csv_state(raw, _START)
        parts: list[bytes] | None = [raw]
        size = len(raw)
        while state == _QUOTED or not raw.endswith(b"\n"):  # the record goes on
            line_ended = raw.endswith(b"\n")
            raw = stream.readline(limit + 3 - size if parts is not None else 1 << 16)
            if not raw:
                break
            number += line_ended
            state = _csv_state(raw, state)
            size += len(raw)
            if parts is not None:
                parts.append(raw)
                if size > limit + 2:  # over the limit whatever its line end
                    parts = None
        where = f"line {first}" if number == first else f"lines {first}-{number}"
        if state == _QUOTED:
            yield first, number, None, (
                f"a quoted field opened on line {first} is not closed at the end of the input "
                f"({where})")
            continue
        data = b"".join(parts).rstrip(b"\r\n") if parts is not None else None
        if data is None or len(data) > limit:
            what = "line" if number == first else f"record ({where})"
            yield first, number, None, f"{what} is over the limit of {limit} bytes"
            continue
        yield first, number, data, None


#: Where a CSV record is, byte by byte (see :func:`_csv_state`).
_START, _FIELD, _QUOTED = range(3)


def _csv_state(data: bytes, state: int) -> int:
    """Where a CSV record is after ``data``, its next bytes, from ``state``: at a field's
    start (or just after a closing quote), in an unquoted field, or in a quoted one.

    csv's default dialect: a field that starts with ``"`` is quoted up to a
    lone ``"`` (``""`` inside is a quote); elsewhere ``"`` is an ordinary
    character. Commas and quotes are ASCII, so the bytes are followed before
    they are decoded, chunk by chunk.
    """
    if state != _QUOTED and b'"' not in data:  # the common line: no quotes
        return state if not data else _START if data.endswith(b",") else _FIELD
    pos, end = 0, len(data)
    while pos < end:
        if state == _QUOTED:  # up to the next quote: it closes, or starts a ""
            pos = data.find(b'"', pos)
            if pos < 0:
                break
            state, pos = _START, pos + 1
        elif state == _FIELD:  # an unquoted field runs to the next comma
            pos = data.find(b",", pos)
            if pos < 0:
                break
            state, pos = _START, pos + 1
        else:  # a field's start, or just after a closing quote
            char = data[pos]
            state = _QUOTED if char == _QUOTE else _START if char == _COMMA else _FIELD
            pos += 1
    return state


def _csv_record(number: int, last: int | None, header: list[str], row: list[str],
                mapping: FieldMap) -> SourceRecord:
    if len(row) != len(header):
        return SourceRecord(number, error=f"expected {len(header)} CSV fields, got {len(row)}",
                            last=last, id=_wide_row_id(header, row, mapping))
    obj = dict(zip(header, row, strict=True))
    item = mapping.apply(obj, strings=True)
    if isinstance(item, str):
        return SourceRecord(number, error=item, last=last, id=mapping.id_of(obj, strings=True))
    return SourceRecord(number, item, last=last)


def _wide_row_id(header: list[str], row: list[str], mapping: FieldMap) -> str | None:
    """The id of a CSV row with more fields than the header, when its cell is certain.

    Extra fields come from an unquoted comma in some cell: the first column
    is still the row's first cell and the last column its last. Any other
    column may have moved, and in a row with fewer fields any cell may be the
    missing one: no id then.
    """
    if len(row) <= len(header) or mapping.id not in header:
        return None
    column = header.index(mapping.id)
    if column == 0:
        return row[0] or None
    if column == len(header) - 1:
        return row[-1] or None
    return None


def _parse_json(number: int, text: str, mapping: FieldMap) -> SourceRecord:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return SourceRecord(number, error=f"invalid JSON ({_json_problem(exc)})")
    if not isinstance(obj, dict):
        return SourceRecord(number, error=f"expected a JSON object, got {type(obj).__name__}")
    if mapping.is_default:
        unknown = sorted(str(k) for k in obj if k not in ITEM_KEYS)
        missing = "" if "text" in obj else "missing 'text'; "
        if unknown:  # a misspelt key (txt), or another tool's names: say how to map them
            return SourceRecord(number, error=(
                f"{missing}unknown field(s) [{_some_keys(unknown)}]; expected "
                f"{sorted(ITEM_KEYS)} (name the fields with --text-field/--id-field to "
                "ignore other keys)"), id=mapping.id_of(obj))
        if missing:
            return SourceRecord(number, error="missing 'text'", id=mapping.id_of(obj))
        for key in ("id", "source"):
            if key in obj:
                obj[key] = _numeric_as_text(obj[key])
        return SourceRecord(number, obj)
    item = mapping.apply(obj)
    if isinstance(item, str):
        return SourceRecord(number, error=item, id=mapping.id_of(obj))
    return SourceRecord(number, item)
