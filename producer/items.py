"""Turning caller input into validated task items, one rejection at a time.

Bulk submits and streams must refuse a bad item without losing the good ones
around it, so validation here returns an :class:`ItemError` instead of
raising. The rules themselves live in :mod:`contract.messages` (the worker
runs them too); this module only adapts the caller's shapes to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from contract.errors import InvalidInput
from contract.messages import TaskItem, make_item
from contract.settings import Settings

#: Keys a dict item may carry; anything else is refused (a typo such as
#: ``txt`` would otherwise submit nothing useful).
ITEM_KEYS = frozenset({"text", "id", "source", "meta"})

#: The key of an item's own deadline, which the HTTP API's bulk items may also carry
#: (``ItemValidator(item_ttl=True)``); the client's take one ``ttl_s`` for them all.
ITEM_TTL_KEY = "ttl_s"


@dataclass(frozen=True)
class ItemError:
    """One refused item: where it was, its id when known, and why.

    ``index`` is the 0-based position for :meth:`producer.Client.submit_many`
    and the 1-based line number for streams; ``id`` is the caller's (None when
    the item gave none: an id made up for it names nothing the caller knows);
    ``ref`` is a Redis Stream entry's id.
    """

    index: int
    id: str | None
    reason: str
    ref: str | None = None

    def __str__(self) -> str:
        ident = f" (id {self.id})" if self.id else ""
        return f"item {self.index}{ident}: {self.reason}"


class ItemValidator:
    """Validates a sequence of caller items, refusing ids seen earlier in it.

    Takes settings (limits), the default source tag and a deadline
    (``ttl_s``) for every item; with ``item_ttl`` a dict item may carry its own
    ``ttl_s`` (null: the validator's), listed with the keys it takes. Keeps only the
    caller-supplied ids (generated ones cannot collide), so memory grows with
    explicit ids only; ``track_ids=False`` keeps none (for endless sources).
    """

    def __init__(self, settings: Settings, default_source: str | None = None, *,
                 ttl_s: float | None = None, track_ids: bool = True,
                 item_ttl: bool = False) -> None:
        self.settings = settings
        self.default_source = default_source
        self.ttl_s = ttl_s
        self.item_ttl = item_ttl
        #: the keys a dict item may carry, as a refusal of another lists them
        self.keys = ITEM_KEYS | {ITEM_TTL_KEY} if item_ttl else ITEM_KEYS
        # An endless source (a Redis Stream) must not remember every id it saw;
        # a repeated id there is left to the store's idempotent upsert.
        self.track_ids = track_ids
        self._seen: dict[str, int] = {}

    def check(self, index: int, obj: Any) -> TaskItem | ItemError:
        """A :class:`TaskItem` for ``obj`` (str, bytes or a dict with ``text``), or why not.

        Never raises for bad input; the id of a refused dict item is reported
        when it gave one as a string (never the one made up for an item without).
        """
        try:
            item = self._build(obj)
        except InvalidInput as exc:
            given = _raw_id(obj)
            item_id = exc.item_id if exc.item_id is not None and given is not None else given
            return ItemError(index, item_id, exc.reason)
        if self.track_ids and isinstance(obj, Mapping) and obj.get("id") is not None:
            first = self._seen.setdefault(item.id, index)
            if first != index:
                return ItemError(index, item.id, f"duplicate id {item.id!r} (first at {first})")
        return item

    def _build(self, obj: Any) -> TaskItem:
        if isinstance(obj, (str, bytes, bytearray)):
            return make_item(obj, self.settings, source=self.default_source, ttl_s=self.ttl_s)
        if not isinstance(obj, Mapping):
            raise InvalidInput(
                f"item must be a string or an object with 'text', got {type(obj).__name__}"
            )
        unknown = sorted(str(k) for k in obj if k not in self.keys)
        if unknown:
            raise InvalidInput(f"unknown field(s) {unknown}; expected {sorted(self.keys)}")
        if "text" not in obj:
            raise InvalidInput("missing 'text'")
        source = obj.get("source")
        own_ttl = obj.get(ITEM_TTL_KEY) if self.item_ttl else None
        return make_item(
            obj["text"],
            self.settings,
            id=obj.get("id"),
            source=self.default_source if source is None else source,
            meta=obj.get("meta"),
            ttl_s=self.ttl_s if own_ttl is None else own_ttl,
        )


def _raw_id(obj: Any) -> str | None:
    if isinstance(obj, Mapping):
        value = obj.get("id")
        if isinstance(value, str):
            return value
    return None
