"""The task message: what travels from the producer through Redis to the worker.

One Celery message carries a list of items (one for an interactive submit, up
to ``bulk_chunk_size`` for bulk streams) so a stream of thousands of texts per
second does not pay one broker round trip per text. The body is JSON only.

Wire form of one item::

    {"id": "…", "text": "…", "source": "…" | null, "meta": {…} | null,
     "submitted_at": 1764350000.123}

Validation lives here because both sides run it: the producer to refuse bad
input at once, the worker because a message may come from any producer.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from contract.errors import InvalidInput
from contract.settings import Settings


@dataclass(frozen=True)
class TaskItem:
    """One text to analyse, validated."""

    id: str
    text: str
    source: str | None = None
    meta: dict[str, Any] | None = None
    submitted_at: float = field(default_factory=time.time)

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict sent on the wire."""
        return {
            "id": self.id,
            "text": self.text,
            "source": self.source,
            "meta": self.meta,
            "submitted_at": self.submitted_at,
        }


def new_id() -> str:
    """A fresh task id (UUID4 hex)."""
    return uuid.uuid4().hex


def validate_text(text: Any, settings: Settings) -> str:
    """Return ``text`` as a valid ``str`` or raise :class:`InvalidInput`.

    Bytes are decoded as UTF-8; undecodable bytes, lone surrogates (which
    JSON allows but UTF-8 cannot store), empty or whitespace-only texts and
    texts over ``settings.max_text_chars`` are refused with a readable reason.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"text is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if not isinstance(text, str):
        raise InvalidInput(f"text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"text is not valid Unicode ({exc.reason} at index {exc.start})") from exc
    if not text.strip():
        raise InvalidInput("text is empty or whitespace only")
    if "\x00" in text:
        raise InvalidInput("text contains a NUL character")
    if len(text) > settings.max_text_chars:
        raise InvalidInput(
            f"text is {len(text)} characters, over the limit of {settings.max_text_chars}"
        )
    return text


_CONTROL = re.compile(r"[\x00-\x1f]")


def validate_id(value: Any, settings: Settings, what: str = "id") -> str:
    """Return a valid id/tag string or raise :class:`InvalidInput`."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    if not value or not value.strip():
        raise InvalidInput(f"{what} is empty")
    if len(value) > settings.max_id_chars:
        raise InvalidInput(f"{what} is {len(value)} characters, over the limit of {settings.max_id_chars}")
    if _CONTROL.search(value):
        raise InvalidInput(f"{what} contains control characters")
    return value


def validate_meta(meta: Any, settings: Settings) -> dict[str, Any] | None:
    """Return ``meta`` (a JSON object or None) or raise :class:`InvalidInput`."""
    if meta is None:
        return None
    if not isinstance(meta, Mapping):
        raise InvalidInput(f"meta must be a JSON object, got {type(meta).__name__}")
    try:
        encoded = json.dumps(meta, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"meta is not JSON-serialisable: {exc}") from exc
    if len(encoded.encode("utf-8", "surrogatepass")) > settings.max_meta_bytes:
        raise InvalidInput(f"meta is over the limit of {settings.max_meta_bytes} bytes")
    return dict(meta)


def make_item(
    text: Any,
    settings: Settings,
    *,
    id: str | None = None,
    source: str | None = None,
    meta: Any = None,
    submitted_at: float | None = None,
) -> TaskItem:
    """Validate the parts of one task and build a :class:`TaskItem`.

    Raises :class:`InvalidInput` carrying ``item_id`` when an id is known.
    """
    item_id = new_id() if id is None else id
    try:
        item_id = validate_id(item_id, settings)
        clean = validate_text(text, settings)
        src = None if source is None else validate_id(source, settings, "source")
        clean_meta = validate_meta(meta, settings)
    except InvalidInput as exc:
        exc.item_id = item_id if isinstance(item_id, str) else None
        raise
    return TaskItem(
        id=item_id,
        text=clean,
        source=src,
        meta=clean_meta,
        submitted_at=time.time() if submitted_at is None else submitted_at,
    )


def item_from_wire(obj: Any, settings: Settings) -> TaskItem:
    """Parse and validate one wire item (worker side).

    Raises :class:`InvalidInput`; ``item_id`` is set when the object had a
    usable id so the failure can be stored against it.
    """
    if not isinstance(obj, Mapping):
        raise InvalidInput(f"task item must be a JSON object, got {type(obj).__name__}")
    raw_id = obj.get("id")
    if not isinstance(raw_id, str) or not raw_id.strip() or len(raw_id) > settings.max_id_chars:
        raise InvalidInput("task item has no valid id")
    submitted = obj.get("submitted_at")
    if not isinstance(submitted, (int, float)) or isinstance(submitted, bool):
        submitted = time.time()
    unknown = set(obj) - {"id", "text", "source", "meta", "submitted_at"}
    if unknown:
        raise InvalidInput(f"task item has unknown fields: {sorted(unknown)}", raw_id)
    if "text" not in obj:
        raise InvalidInput("task item has no text", raw_id)
    return make_item(
        obj["text"],
        settings,
        id=raw_id,
        source=obj.get("source"),
        meta=obj.get("meta"),
        submitted_at=float(submitted),
    )
