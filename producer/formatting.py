"""Rendering results and rows as an aligned table, JSON, JSON lines or CSV (for the CLI).

Pure functions from records to text; nothing here touches Redis or the DB.
Stored texts come from anyone: output meant for a terminal never carries a
raw control character or ANSI escape (they are shown as ``\\x1b``-style
escapes), so a text cannot rewrite the screen or the terminal's title.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import fields
from typing import Any

from contract.messages import printable
from contract.results import ResultRecord

FORMATS = ("table", "json", "jsonl", "csv")

#: The UTF-8 byte-order mark a CSV export starts with on request (``results --bom``, the
#: API's ``bom=true``): Excel reads a UTF-8 CSV without it in the legacy code page, so
#: Chinese texts show as mojibake. Off by default: a plain UTF-8 reader would take it as
#: part of the first header (``\ufeffid``).
BOM = "\ufeff"

#: Columns of the results table view; texts (or errors) are truncated.
TABLE_COLUMNS = ("id", "source", "status", "label", "score", "lang", "finished_at", "text")
#: Every field of a result, in the order ResultRecord declares them (JSON/CSV).
RECORD_FIELDS = tuple(f.name for f in fields(ResultRecord))

_UNSAFE_JSON = re.compile(r"[\x7f-\x9f\ud800-\udfff]")

#: Widest cell of a table, in terminal columns.
MAX_CELL = 48
#: Bytes of table cells :func:`iter_results` holds in memory before it spools them to a
#: temporary file (a table's widths are known only once every row was read).
TABLE_SPOOL_BYTES = 1024 * 1024


def render_results(records: Sequence[ResultRecord], fmt: str, *, terminal: bool = True,
                   excel_safe: bool = False) -> str:
    """``records`` as text: ``json`` (array of :meth:`ResultRecord.to_json`), ``jsonl``
    (one such object per line), ``csv`` (every field; dicts as JSON) or ``table``
    (aligned, truncated).

    Table, JSON and JSON lines are always safe on a terminal (JSON escapes every
    control character, which keeps it valid JSON); CSV carries every value as stored
    unless ``terminal``, when control characters are escaped too, and
    ``excel_safe`` (see :func:`render_rows`).
    """
    if fmt == "json":
        return _json([r.to_json() for r in records])
    if fmt == "jsonl":
        return "".join(_json_lines(r.to_json() for r in records)).rstrip("\n")
    if fmt == "csv":
        return render_rows([r.to_json() for r in records], RECORD_FIELDS, "csv",
                           terminal=terminal, excel_safe=excel_safe)
    rows = [_table_row(r) for r in records]
    columns: tuple[str, ...] = TABLE_COLUMNS
    if len({r.model for r in records}) > 1:  # several models: say whose each result is
        columns = (*TABLE_COLUMNS[:2], "model", *TABLE_COLUMNS[2:])
    return render_rows(rows, columns, "table") if rows else "(no results)"


def iter_results(records: Iterable[ResultRecord], fmt: str, *, terminal: bool = True,
                 excel_safe: bool = False) -> Iterator[str]:
    """:func:`render_results`' text and a final newline, in pieces, one row at a time, for
    result sets of any size: joined, the pieces are that text.

    JSON, JSON lines and CSV hold one row at a time (a JSON line is a piece). A table
    needs every row's width first:
    it keeps only the widths and spools the rows' cells to a temporary file
    past :data:`TABLE_SPOOL_BYTES`.
    """
    if fmt == "json":
        yield from _json_array(r.to_json() for r in records)
    elif fmt == "jsonl":
        yield from _json_lines(r.to_json() for r in records)
    elif fmt == "csv":
        yield from _csv_lines((r.to_json() for r in records), RECORD_FIELDS,
                              terminal=terminal, excel_safe=excel_safe)
    elif fmt == "table":
        yield from _table_lines(records)
    else:
        raise ValueError(f"unknown format {fmt!r}")


def render_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], fmt: str, *,
                terminal: bool = True, excel_safe: bool = False) -> str:
    """Plain rows (dicts) as ``table``, ``json`` (array of objects), ``jsonl`` (an object
    per line) or ``csv``.

    JSON and JSON lines keep every key of each row; table and CSV show ``columns`` only;
    ``terminal`` escapes control characters in CSV cells. CSV keeps every
    value as stored (an id read back must match); ``excel_safe`` guards the
    :data:`GUARDED_COLUMNS` and the id against running as spreadsheet formulas.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    if fmt == "json":
        return _json([dict(r) for r in rows])
    if fmt == "jsonl":
        return "".join(_json_lines(dict(r) for r in rows)).rstrip("\n")
    if fmt == "csv":
        lines = _csv_lines(rows, columns, terminal=terminal, excel_safe=excel_safe)
        return "".join(lines).rstrip("\n")
    return _table(rows, columns)


def _csv_lines(rows: Iterable[Mapping[str, Any]], columns: Sequence[str], *, terminal: bool,
               excel_safe: bool) -> Iterator[str]:
    """The header, then each row, as CSV lines (see :func:`render_rows`)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        yield out.getvalue()
        out.seek(0)
        out.truncate()
        cells = csv_cells(row, columns, guard=excel_safe)
        writer.writerow([printable(c) for c in cells] if terminal else cells)
    yield out.getvalue()


def _json(value: Any, indent: int | None = 2) -> str:
    # json escapes C0 controls itself; DEL and C1 (0x9b is a one-byte CSI) are
    # escaped here, and lone surrogates are written as \\udXXX escapes.
    text = json.dumps(value, ensure_ascii=False, indent=indent)
    text = _UNSAFE_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


def _json_lines(items: Iterable[Any]) -> Iterator[str]:
    """Each item as one line of JSON (as the API's ``format=jsonl`` writes it), escaped as
    :func:`_json` escapes: a newline inside a value never ends a line."""
    for item in items:
        yield _json(item, indent=None) + "\n"


def _json_array(items: Iterable[Any]) -> Iterator[str]:
    """``_json(list(items))`` and a newline, one element at a time (json.dumps indents an
    array's elements two spaces deeper; a newline inside a value is always escaped)."""
    head = "[\n  "
    for item in items:
        yield head + _json(item).replace("\n", "\n  ")
        head = ",\n  "
    yield "[]\n" if head == "[\n  " else "\n]\n"


#: First characters that make a spreadsheet read a cell as a formula.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: The guard's own mark: a guarded cell starts with it, so it is shown, not run.
GUARD = "'"
#: Columns whose text cells get the formula guard, in the API's CSV export always and in
#: the CLI's with ``--excel-safe``: free text (anyone's texts, tags and error messages)
#: and the label (a name from the model's own config, "-1" or "+1" for some). The task
#: id, which any submitter chooses, is guarded too, reversibly (:data:`ID_COLUMN`).
#: The other identifiers (model, worker, revision: the operator's names; hashes) and the
#: JSON cells (``meta``, ``scores``: an object, which starts with ``{``) never need it.
GUARDED_COLUMNS = frozenset({"text", "source", "error", "label"})
#: The column of the task id: guarded by :func:`guard_id`, which
#: :func:`unguard_id` (``db delete --ids-file F --excel-safe``) undoes.
ID_COLUMN = "id"


def csv_cells(row: Mapping[str, Any], columns: Sequence[str], *, guard: bool) -> list[str]:
    """The CSV cells of ``row``'s ``columns`` (:func:`csv_cell`); with ``guard``, those of
    the :data:`GUARDED_COLUMNS` guarded against running as formulas, and the id by
    :func:`guard_id`."""
    cells = []
    for column in columns:
        value = row.get(column)
        if guard and column == ID_COLUMN and isinstance(value, str):
            cells.append(guard_id(value))
        else:
            cells.append(csv_cell(value, guard=guard and column in GUARDED_COLUMNS))
    return cells


def csv_cell(value: Any, *, guard: bool = True) -> str:
    """A CSV cell: dicts and lists as JSON; with ``guard``, a text a spreadsheet would run
    as a formula gets a leading ``'`` (numbers are left alone: -0.5 is a number, not a
    formula). Without it the value is written as stored."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        value = json.dumps(value, ensure_ascii=False, sort_keys=True)
    if guard and isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return str(value)


def guard_id(value: str) -> str:
    """A task id as a spreadsheet-safe CSV writes it: with a leading ``'`` when it starts
    with a formula character, as a text cell gets, or with ``'`` itself. That second rule
    makes the guard reversible (:func:`unguard_id`): any submitter may choose an id such
    as ``=HYPERLINK(...)``, and an exported id must still name its task."""
    return GUARD + value if value.startswith((*FORMULA_START, GUARD)) else value


def unguard_id(value: str) -> str:
    """The task id a :func:`guard_id` cell stands for: one leading ``'`` taken off when a
    formula character or another ``'`` follows it (as the guard wrote it); any other
    value is the id as it is."""
    if value.startswith(GUARD) and value[1:].startswith((*FORMULA_START, GUARD)):
        return value[1:]
    return value


def _table_row(record: ResultRecord) -> dict[str, Any]:
    shown = record.error if record.status != "done" and record.error else record.text
    return {
        "id": record.id,
        "source": record.source,
        "status": record.status,
        "label": record.label,
        "score": record.score,
        "lang": record.lang,
        "model": record.model,
        "finished_at": record.finished_at.strftime("%Y-%m-%d %H:%M:%S"),
        "text": shown,
    }


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([width(c)] + [width(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [_is_numeric([row.get(c) for row in rows]) for c in columns]

    def line(values: Sequence[str]) -> str:
        parts = [
            _pad(v, w, right=num) for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    head = line([c.upper() for c in columns])
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([head, rule, *(line(r) for r in cells)])


def _table_lines(records: Iterable[ResultRecord]) -> Iterator[str]:
    """:func:`render_results`' table and a newline, line by line: a first pass keeps each
    column's width (and whether it is numeric, whether several models show) and spools
    the cells; the second writes the aligned lines."""
    columns = (*TABLE_COLUMNS[:2], "model", *TABLE_COLUMNS[2:])
    widths = [width(c) for c in columns]
    present = [False] * len(columns)
    numeric = [True] * len(columns)
    models: set[str] = set()
    with tempfile.SpooledTemporaryFile(TABLE_SPOOL_BYTES) as spool:
        for record in records:
            if len(models) < 2:
                models.add(record.model)
            row = _table_row(record)
            cells = []
            for i, column in enumerate(columns):
                value = row[column]
                cell = _cell(value)
                widths[i] = max(widths[i], width(cell))
                if value is not None:
                    present[i] = True
                    numeric[i] = numeric[i] and _is_numeric([value])
                cells.append(cell)
            spool.write(json.dumps(cells).encode("ascii") + b"\n")  # a lone surrogate too
        if not models:
            yield "(no results)\n"
            return
        shown = [i for i, c in enumerate(columns) if c != "model" or len(models) > 1]

        def line(values: Sequence[str]) -> str:
            parts = [_pad(values[i], widths[i], right=present[i] and numeric[i]) for i in shown]
            return "  ".join(parts).rstrip() + "\n"

        yield line([c.upper() for c in columns])
        yield "  ".join("-" * widths[i] for i in shown) + "\n"
        spool.seek(0)
        for cells_json in spool:
            yield line(json.loads(cells_json))


def width(text: str) -> int:
    """Terminal columns ``text`` takes: 2 for a wide or full-width character (CJK), 0 for
    a combining mark, else 1."""
    return sum(_char_width(ch) for ch in text)


def _char_width(ch: str) -> int:
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def _pad(text: str, columns: int, *, right: bool) -> str:
    """``text`` padded with spaces to ``columns`` terminal columns (on the left if ``right``)."""
    fill = " " * max(0, columns - width(text))
    return fill + text if right else text + fill


#: The mark of a cut cell, and the one for a stdout whose encoding has no "…".
ELLIPSIS, ASCII_ELLIPSIS = "…", "..."


def ellipsis() -> str:
    """The mark :func:`_truncate` ends a cut cell with: "…", or "..." where stdout's
    encoding cannot write it (a latin-1 locale). The mark is the table's own, not the
    text's: an all-ASCII text must print in any encoding, with no refusal or warning."""
    try:
        ELLIPSIS.encode(getattr(sys.stdout, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return ASCII_ELLIPSIS
    return ELLIPSIS


def _truncate(text: str, columns: int) -> str:
    """``text`` cut to at most ``columns`` terminal columns, an :func:`ellipsis` marking a
    cut. Reads only as far as the cut (a stored text may be long; a table shows its start)."""
    mark = ellipsis()
    used, cut = 0, None
    for i, ch in enumerate(text):
        used += _char_width(ch)
        if cut is None and used > columns - len(mark):  # the mark takes its columns
            cut = i
        if used > columns:
            return text[:cut] + mark
    return text


def _is_numeric(values: Sequence[Any]) -> bool:
    """True when a column holds numbers (and maybe blanks): it is right-aligned."""
    present = [v for v in values if v is not None]
    return bool(present) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in present
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (dict, list)):
        value = json.dumps(value, ensure_ascii=False, sort_keys=True)
    text = printable(" ".join(str(value).split()))
    return _truncate(text, MAX_CELL)
