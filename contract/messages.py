"""The task message: what travels from the producer through Redis to the worker.

One Celery message carries a list of items (one for an interactive submit, up
to ``bulk_chunk_size`` for bulk streams) so a stream of thousands of texts per
second does not pay one broker round trip per text. The body is JSON only.

Wire form of one item::

    {"id": "…", "text": "…", "source": "…" | null, "meta": {…} | null,
     "submitted_at": 1764350000.123, "expires_at": 1764350060.0}

``expires_at`` (UNIX seconds) is optional and only sent when set; a
producer may send ``ttl_s`` (seconds after ``submitted_at``) instead. A task
past its deadline when a worker takes it is stored as ``expired`` and never
reaches the model.

Validation lives here because both sides run it: the producer to refuse bad
input at once, the worker because a message may come from any producer.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from contract.constants import ID_COLUMN_CHARS
from contract.errors import InvalidInput, quoted
from contract.settings import Settings

#: Latest timestamp accepted (the end of year 9999, the last a datetime holds).
MAX_TIMESTAMP = 253_402_300_799.0
#: Deepest nesting of ``meta`` accepted.
MAX_META_DEPTH = 32
#: Fields a wire item may carry.
WIRE_FIELDS = frozenset({"id", "text", "source", "meta", "submitted_at", "expires_at", "ttl_s",
                         "model"})


@dataclass(frozen=True)
class TaskItem:
    """One text to analyse, validated."""

    id: str
    text: str
    source: str | None = None
    meta: dict[str, Any] | None = None
    submitted_at: float = field(default_factory=time.time)
    #: UNIX seconds after which the task is not worth running (None: no deadline).
    expires_at: float | None = None
    #: The named model the task is for (None: the default model).
    model: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict sent on the wire (``expires_at`` only when set)."""
        wire: dict[str, Any] = {
            "id": self.id,
            "text": self.text,
            "source": self.source,
            "meta": self.meta,
            "submitted_at": self.submitted_at,
        }
        if self.expires_at is not None:
            wire["expires_at"] = self.expires_at
        if self.model is not None:
            wire["model"] = self.model
        return wire

    def expired(self, now: float) -> bool:
        """True when the deadline has passed at ``now``."""
        return self.expires_at is not None and now > self.expires_at


def text_sha256(text: str) -> str:
    """The hex SHA-256 of a text's UTF-8 bytes, as the results table stores it."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def new_id() -> str:
    """A fresh task id (UUID4 hex)."""
    return uuid.uuid4().hex


def storable(text: str) -> bool:
    """True when ``text`` can be stored as it is: valid UTF-8, no NUL.

    A lone surrogate (JSON allows ``"\\ud800"``) cannot be encoded; PostgreSQL
    text cannot hold NUL.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def printable(text: str) -> str:
    """``text`` made storable and safe on a terminal: surrogates, NUL and other
    control characters (but newline and tab) become escapes such as ``\\x1b``."""
    out = _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"),
                           text)
    return out.encode("utf-8", "backslashreplace").decode("utf-8")


def validate_text(text: Any, settings: Settings) -> str:
    """Return ``text`` as a valid ``str`` or raise :class:`InvalidInput`.

    Bytes are decoded as UTF-8; undecodable bytes, lone surrogates (which
    JSON allows but UTF-8 cannot store), empty or whitespace-only texts,
    texts with no visible character (zero-width spaces, a BOM, control
    characters, Hangul fillers: :func:`has_visible`) and texts over
    ``settings.max_text_chars`` are refused with a readable reason.
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
    if not has_visible(text):
        raise InvalidInput("text has no visible characters (only control, format, space or "
                           "blank characters such as U+3164 HANGUL FILLER)")
    if len(text) > settings.max_text_chars:
        raise InvalidInput(
            f"text is {len(text)} characters, over the limit of {settings.max_text_chars}"
        )
    return text


#: Unicode categories that show nothing: controls, format characters (zero-width spaces
#: and joiners, the BOM, direction marks), separators. Unassigned code points (``Cn``)
#: count as visible: an emoji newer than Python's Unicode tables is one (the ranges
#: Unicode reserves as ignorable, in ``_BLANK``, excepted).
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
#: Code points of other categories that show nothing: Unicode's Default_Ignorable_Code_Point
#: list (DerivedCoreProperties.txt) but for the ``Cf`` runs the categories cover. Hangul
#: fillers (``Lo``), variation selectors and other marks that stand for no glyph (``Mn``),
#: and the ranges Unicode reserves as ignorable (``Cn``: whatever is assigned there later
#: shows nothing). Then two symbols (``So``) drawn blank: BRAILLE PATTERN BLANK and
#: MUSICAL SYMBOL NULL NOTEHEAD.
_BLANK_RANGES = (
    (0x034F, 0x034F),    # COMBINING GRAPHEME JOINER
    (0x115F, 0x1160),    # HANGUL CHOSEONG FILLER, HANGUL JUNGSEONG FILLER
    (0x17B4, 0x17B5),    # KHMER VOWEL INHERENT AQ, AA
    (0x180B, 0x180D),    # MONGOLIAN FREE VARIATION SELECTOR ONE..THREE
    (0x180F, 0x180F),    # MONGOLIAN FREE VARIATION SELECTOR FOUR
    (0x2065, 0x2065),    # reserved
    (0x3164, 0x3164),    # HANGUL FILLER
    (0xFE00, 0xFE0F),    # VARIATION SELECTOR-1..16
    (0xFFA0, 0xFFA0),    # HALFWIDTH HANGUL FILLER
    (0xFFF0, 0xFFF8),    # reserved
    (0xE0000, 0xE0FFF),  # tags (Cf), VARIATION SELECTOR-17..256, reserved
    (0x2800, 0x2800),    # BRAILLE PATTERN BLANK
    (0x1D159, 0x1D159),  # MUSICAL SYMBOL NULL NOTEHEAD
)
_BLANK = frozenset(chr(c) for low, high in _BLANK_RANGES for c in range(low, high + 1))


def has_visible(text: str) -> bool:
    """True when ``text`` has a character that is no space, control, format or blank character.

    ``str.strip`` keeps ``"\\u200b"`` or ``"\\ufeff"``, and a Hangul filler
    (``"\\u3164"``) is a letter by its category: such a text is empty to a
    reader and to the model, which would still give it a confident label.
    Stops at the first visible character (usually the first).
    """
    return any(not ch.isspace() and ch not in _BLANK
               and unicodedata.category(ch) not in _INVISIBLE for ch in text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# C0 but newline and tab, DEL, C1 (0x9b is a one-byte CSI on some terminals).
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def id_problem(value: Any, limit: int = ID_COLUMN_CHARS, *, new: bool = False) -> str | None:
    """Why ``value`` cannot be an id or source tag of at most ``limit`` characters, or None.

    An id must be a non-blank string that the id column can hold on every
    database: no control characters (NUL included), no lone surrogates.
    ``new``: the id of a task being submitted, which must also be one that
    ``GET /v1/tasks/{id}`` can reach (:func:`_route_problem`); without it (a
    read, a delete) an id stored before that rule still passes.
    """
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value.strip():
        return "is empty"
    limit = min(limit, ID_COLUMN_CHARS)
    if len(value) > limit:
        return f"is {len(value)} characters, over the limit of {limit}"
    if new and (unreachable := _route_problem(value)) is not None:
        return unreachable
    if value.isascii() and value.isprintable():
        return None  # the usual id: printable ASCII has no control character or surrogate
    if _CONTROL.search(value):
        return "contains control characters"
    if not storable(value):
        return "is not valid Unicode (lone surrogate)"
    return None


def _route_problem(value: str) -> str | None:
    """Why ``GET /v1/tasks/{id}`` could not reach the task ``value``, or None.

    An id may hold ``/``, so the route ``/v1/tasks/{id}/windows`` takes
    ``x/windows`` for the windows of ``x``; and a browser or HTTP client
    resolves a ``.`` or ``..`` path segment before sending (``/v1/tasks/..``
    asks for ``/v1/``).
    """
    if value.endswith("/windows"):
        return ("ends in '/windows', which GET /v1/tasks/{id}/windows reads as the windows "
                "of another id")
    if "." in value and any(part in (".", "..") for part in value.split("/")):
        return ("has a '.' or '..' path segment, which URLs resolve away (GET /v1/tasks/{id} "
                "could not reach it)")
    return None


def validate_id(value: Any, settings: Settings, what: str = "id") -> str:
    """Return a valid id/tag string or raise :class:`InvalidInput` (without ``item_id``);
    an ``id`` (not a source tag) is a new task's, so it must also be reachable by URL."""
    problem = id_problem(value, settings.max_id_chars, new=what == "id")
    if problem is not None:
        raise InvalidInput(f"{what} {problem}")
    return str(value)


def validate_meta(meta: Any, settings: Settings) -> dict[str, Any] | None:
    """Return ``meta`` (a JSON object or None) or raise :class:`InvalidInput`.

    Every string in it (keys too) must be storable, numbers finite, nesting
    at most :data:`MAX_META_DEPTH` levels, the JSON at most ``max_meta_bytes``.
    """
    if meta is None:
        return None
    if not isinstance(meta, Mapping):
        raise InvalidInput(f"meta must be a JSON object, got {type(meta).__name__}")
    problem = _meta_problem(meta, 0)
    if problem is not None:
        raise InvalidInput(f"meta is not JSON-serialisable: it {problem}")
    try:
        encoded = json.dumps(meta, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"meta is not JSON-serialisable: {exc}") from exc
    if len(encoded.encode("utf-8")) > settings.max_meta_bytes:
        raise InvalidInput(f"meta is over the limit of {settings.max_meta_bytes} bytes")
    return dict(meta)


def _meta_problem(value: Any, depth: int) -> str | None:
    if depth > MAX_META_DEPTH:
        return f"is nested deeper than {MAX_META_DEPTH} levels"
    if isinstance(value, str):
        return None if storable(value) else "holds a string with NUL or a lone surrogate"
    if isinstance(value, float):
        return None if math.isfinite(value) else "holds a number that is not finite"
    if value is None or isinstance(value, (bool, int)):
        return None
    if isinstance(value, Mapping):
        for key, inner in value.items():
            if not isinstance(key, str):
                return f"has a non-string key ({type(key).__name__})"
            problem = _meta_problem(key, depth + 1) or _meta_problem(inner, depth + 1)
            if problem is not None:
                return problem
        return None
    if isinstance(value, (list, tuple)):
        for inner in value:
            problem = _meta_problem(inner, depth + 1)
            if problem is not None:
                return problem
        return None
    return f"holds a {type(value).__name__}, which is not JSON"


def timestamp(value: Any, what: str) -> float:
    """``value`` as UNIX seconds between 1970 and year 9999, or :class:`InvalidInput`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{what} must be a number of UNIX seconds, got {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError as exc:
        raise InvalidInput(f"{what} is out of range") from exc
    if not 0.0 <= seconds <= MAX_TIMESTAMP:  # NaN fails too
        raise InvalidInput(f"{what} is out of range (1970 to 9999)")
    return seconds


def make_item(
    text: Any,
    settings: Settings,
    *,
    id: str | None = None,
    source: str | None = None,
    meta: Any = None,
    submitted_at: float | None = None,
    expires_at: float | None = None,
    ttl_s: float | None = None,
) -> TaskItem:
    """Validate the parts of one task and build a :class:`TaskItem`.

    ``ttl_s`` (seconds from now, or from ``submitted_at``) sets ``expires_at``
    when that is not given. Raises :class:`InvalidInput`; it carries
    ``item_id`` only when the id itself is valid, so a failure is never
    recorded under an id the store cannot hold.
    """
    item_id = validate_id(new_id() if id is None else id, settings)
    try:
        clean = validate_text(text, settings)
        src = None if source is None else validate_id(source, settings, "source")
        clean_meta = validate_meta(meta, settings)
        sent = time.time() if submitted_at is None else timestamp(submitted_at, "submitted_at")
        deadline = _deadline(expires_at, ttl_s, sent)
    except InvalidInput as exc:
        exc.item_id = item_id
        raise
    return TaskItem(id=item_id, text=clean, source=src, meta=clean_meta, submitted_at=sent,
                    expires_at=deadline, model=settings.model_name or None)


def _deadline(expires_at: Any, ttl_s: Any, submitted_at: float) -> float | None:
    if expires_at is not None:
        return timestamp(expires_at, "expires_at")
    if ttl_s is None:
        return None
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)):
        raise InvalidInput(f"ttl_s must be a number of seconds, got {type(ttl_s).__name__}")
    if not 0 < ttl_s <= MAX_TIMESTAMP:  # NaN fails too
        raise InvalidInput(f"ttl_s must be > 0 seconds, finite and at most {MAX_TIMESTAMP:.0f} "
                           f"(the end of year 9999), got {ttl_s!r}")
    return min(submitted_at + float(ttl_s), MAX_TIMESTAMP)


def item_from_wire(obj: Any, settings: Settings, now: float | None = None) -> TaskItem:
    """Parse and validate one wire item (worker side).

    Raises :class:`InvalidInput`; ``item_id`` is set only when the object had
    an id the store can hold, so the failure can be stored against it. A
    ``submitted_at`` that is missing or not a plausible timestamp is replaced
    by ``now`` (the worker's reading of the Redis server's clock, which a ``ttl_s``
    on the wire then counts from; None: this host's clock); a bad deadline fails
    the item.
    """
    if not isinstance(obj, Mapping):
        raise InvalidInput(f"task item must be a JSON object, got {type(obj).__name__}")
    raw_id = obj.get("id")
    problem = id_problem(raw_id, settings.max_id_chars, new=True)
    if problem is not None:
        raise InvalidInput(f"task item has no valid id (the id {problem})")
    try:
        submitted = timestamp(obj.get("submitted_at"), "submitted_at")
    except InvalidInput:
        submitted = time.time() if now is None else now
    unknown = set(obj) - WIRE_FIELDS
    if unknown:
        raise InvalidInput(f"task item has unknown fields: {sorted(map(str, unknown))}", raw_id)
    if "text" not in obj:
        raise InvalidInput("task item has no text", raw_id)
    named = obj.get("model")
    if named is not None and named != (settings.model_name or None):
        served = settings.model_name or "the default model"
        raise InvalidInput(f"task item is for model {quoted(str(named))}, but this "
                           f"queue family serves {served}", raw_id)
    return make_item(
        obj["text"],
        settings,
        id=raw_id,
        source=obj.get("source"),
        meta=obj.get("meta"),
        submitted_at=submitted,
        expires_at=obj.get("expires_at"),
        ttl_s=obj.get("ttl_s"),
    )
