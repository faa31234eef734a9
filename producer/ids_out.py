"""``stream --ids-out FILE``: one JSON line per input, tying it to its task id.

A :class:`producer.stream.Tracker`: a line is written for each record once
its task is in the queue (``{"line": 7, "id": "..."}``; a Redis Stream entry
adds ``"entry": "1700000000000-0"``) and for each refused one, with the
``error`` and the ``id`` the record gave (as the refusal on stderr names
it; null when it gave none or could not be read). Lines follow the order
records were sent, so a refused record may come before the accepted ones
read just ahead of it.
Each chunk's lines are flushed to the file right after it is sent: after a
crash the file lists what reached the queue, less at most the chunk sent in
the last instant (a Redis Stream resends those entries).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from contract.errors import InvalidInput, StreamFailed
from contract.messages import TaskItem
from producer.items import ItemError
from producer.sources import SourceRecord

#: A lone surrogate: valid in JSON text (an id read from ``"\\ud800"``), not in UTF-8.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class IdsOut:
    """Writes the ids file; a context manager that closes it."""

    def __init__(self, path: str | Path) -> None:
        try:
            self._fh: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise InvalidInput(f"cannot write {path}: {exc.strerror or exc}") from exc
        self._path = path
        #: a write failed (reported by the stream): closing must not raise it again
        self._failed = False
        self.written = 0

    def __enter__(self) -> IdsOut:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close the file."""
        try:
            self._fh.close()
        except OSError:
            if not self._failed:
                raise

    def _failure(self, exc: OSError) -> StreamFailed:
        """A failed write (a full disk) as the error that stops the stream, naming the file."""
        self._failed = True
        return StreamFailed(f"cannot write the ids file {self._path}: {exc.strerror or exc}")

    def sent(self, pairs: Sequence[tuple[SourceRecord, TaskItem]]) -> None:
        """One line per record now in the queue."""
        try:
            for record, item in pairs:
                self._write(record, {"id": item.id})
            self._fh.flush()
        except OSError as exc:
            raise self._failure(exc) from exc

    def rejected(self, record: SourceRecord, error: ItemError) -> None:
        """One line for a refused record: the id it gave (None: none), and why."""
        try:
            self._write(record, {"id": error.id, "error": error.reason})
            self._fh.flush()
        except OSError as exc:
            raise self._failure(exc) from exc

    def _write(self, record: SourceRecord, fields: dict[str, Any]) -> None:
        head: dict[str, Any] = {"line": record.line}
        if record.ref is not None:
            head["entry"] = record.ref
        text = json.dumps({**head, **fields}, ensure_ascii=False)
        # a refused id may hold a lone surrogate: written as its JSON escape, it reads
        # back as the same id instead of failing the write (and the run)
        text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
        self._fh.write(text + "\n")
        self.written += 1
