"""A Redis Stream as a stream source, read with a consumer group; entries acked once enqueued.

Hop 1 of the data path for a message stream: entries are read with
``XREADGROUP``; an entry is acknowledged (``XACK``) only after the chunk
holding its task was published to the broker, or at once when it is
refused (it never will be sent). A reader killed between the two leaves
the entry pending in the group; a restarted reader with the same consumer
name first reads its own pending entries again (``XREADGROUP`` from id 0),
then new ones (``>``). The entry id is the task id unless ``--id-field``
names another, so an entry sent twice (killed after the publish, before
the ack) still makes one row: the store's upsert is keyed by task id.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis

from contract.errors import BrokerUnavailable, InvalidInput
from contract.messages import TaskItem
from producer.items import ItemError
from producer.sources import FieldMap, SourceRecord

#: Entries read per XREADGROUP call.
READ_COUNT = 256
#: How long one blocking read waits for new entries, in milliseconds.
BLOCK_MS = 1000


def default_consumer() -> str:
    """The consumer name when none is given: the host name (stable across restarts)."""
    return socket.gethostname()


class RedisStreamSource:
    """Reads ``key`` as ``consumer`` of ``group`` and acks what a run is done with.

    Takes a Redis client (its socket timeout must exceed ``block_ms``), the
    stream key, group and consumer names and a :class:`FieldMap`. Iterate
    :meth:`records` for :class:`SourceRecord` values (``ref`` = entry id);
    it is also a :class:`producer.stream.Tracker` that acks. The group is
    created at the start of the stream (``0``) when missing, with
    ``MKSTREAM``, so entries added before the first reader ran are read too.
    ``idle_exit_s``: stop once no entry arrived for that long (None: never).
    """

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        group: str,
        consumer: str | None = None,
        *,
        fields: FieldMap | None = None,
        idle_exit_s: float | None = None,
        block_ms: int = BLOCK_MS,
        count: int = READ_COUNT,
    ) -> None:
        if not key or not group:
            raise InvalidInput("a Redis Stream needs a key and a group")
        self.client = client
        self.key = key
        self.group = group
        self.consumer = consumer or default_consumer()
        self.fields = fields or FieldMap()
        self.idle_exit_s = idle_exit_s
        self.block_ms = block_ms
        self.count = count
        self.acked = 0

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) when missing."""
        try:
            self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise InvalidInput(f"cannot create group {self.group!r} on {self.key!r}: {exc}") from exc
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"cannot reach the Redis Stream {self.key!r}: {exc}") from exc

    def records(self) -> Iterator[SourceRecord]:
        """This consumer's pending entries, then new ones, as records (``line`` counts them)."""
        self.ensure_group()
        position = 0
        last = "0"
        while True:  # the pending entries a killed run left behind
            entries = self._read(last, block=None)
            if not entries:
                break
            for entry_id, fields in entries:
                last = entry_id
                if fields:
                    position += 1
                    yield self.record(position, entry_id, fields)
                else:  # trimmed or deleted since it was read: nothing to send
                    self.ack([entry_id])
        quiet_since = time.monotonic()
        while True:
            entries = self._read(">", block=self.block_ms)
            if not entries:
                if self.idle_exit_s is not None and time.monotonic() - quiet_since >= self.idle_exit_s:
                    return
                continue
            quiet_since = time.monotonic()
            for entry_id, fields in entries:
                position += 1
                yield self.record(position, entry_id, fields)

    def _read(self, start: str, *, block: int | None) -> list[tuple[str, dict[bytes, bytes]]]:
        try:
            reply: Any = self.client.xreadgroup(self.group, self.consumer, {self.key: start},
                                                count=self.count, block=block)
        except redis.ResponseError as exc:
            raise InvalidInput(f"cannot read {self.key!r} as group {self.group!r}: {exc}") from exc
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"cannot read the Redis Stream {self.key!r}: {exc}") from exc
        if not reply:
            return []
        # RESP2 (redis-py's default): [[key, [(entry id, {field: value}), ...]]]
        return [(_text(entry_id), fields or {}) for entry_id, fields in reply[0][1]]

    def record(self, position: int, entry_id: str, fields: dict[bytes, bytes]) -> SourceRecord:
        """The :class:`SourceRecord` of one entry; the entry id is the default task id."""
        try:
            obj = {_text(k): _text(v) for k, v in fields.items()}
        except UnicodeDecodeError as exc:
            return SourceRecord(position, error=f"a field is not valid UTF-8 ({exc.reason})",
                                ref=entry_id)
        item = self.fields.apply(obj, strings=True)
        if isinstance(item, str):  # named by the id it would have been sent with
            return SourceRecord(position, error=item, ref=entry_id,
                                id=self.fields.id_of(obj, strings=True) or entry_id)
        item.setdefault("id", entry_id)
        return SourceRecord(position, item, ref=entry_id)

    def ack(self, entry_ids: Sequence[str]) -> None:
        """XACK ``entry_ids`` in the group."""
        if not entry_ids:
            return
        try:
            self.acked += int(self.client.xack(self.key, self.group, *entry_ids))
        except redis.RedisError as exc:
            # Unacked entries stay pending and are sent again by the next run
            # (same ids: one row each); stop rather than read on.
            raise BrokerUnavailable(f"cannot acknowledge entries of {self.key!r}: {exc}") from exc

    # -- producer.stream.Tracker ----------------------------------------

    def sent(self, pairs: Sequence[tuple[SourceRecord, TaskItem]]) -> None:
        """Their tasks are in the broker queue: ack the entries."""
        self.ack([rec.ref for rec, _item in pairs if rec.ref is not None])

    def rejected(self, record: SourceRecord, error: ItemError) -> None:
        """A refused entry will never be sent: ack it (the run's report names it)."""
        if record.ref is not None:
            self.ack([record.ref])


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
