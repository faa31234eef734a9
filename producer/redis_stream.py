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

Entries a consumer read and never acknowledged (a container whose host
name, the default consumer name, changes at every restart) are claimed
(``XAUTOCLAIM``) by any reader of the group once pending longer than
``claim_idle_s``, and sent by it. A pending entry trimmed or deleted from
the stream before it was sent is acknowledged and reported as lost (a
refusal), so it is neither silently dropped nor met again at every restart.
A group destroyed, a key deleted or holding another type stops the reader
with :class:`InvalidInput`, one line naming what happened.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis

from contract.errors import BrokerUnavailable, InvalidInput
from contract.messages import TaskItem
from producer.items import ItemError
from producer.sources import FieldMap, SourceRecord

log = logging.getLogger(__name__)

#: Entries read per XREADGROUP call.
READ_COUNT = 256
#: How long one blocking read waits for new entries, in milliseconds.
BLOCK_MS = 1000
#: Default ``claim_idle_s``: far longer than a reader holds an entry it read (a backpressure
#: pause aside), short enough that a dead consumer's entries are analysed the same hour.
CLAIM_IDLE_S = 600.0
#: Longest pause between two claim scans, in seconds (shorter: half of ``claim_idle_s``).
CLAIM_EVERY_MAX_S = 30.0
#: Why a pending entry with no fields (trimmed or deleted since it was read) is not sent.
LOST = "lost: trimmed or deleted from the stream before it was sent"


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
    ``claim_idle_s``: claim and send entries pending on any consumer of the
    group for longer than that (None: never); this reader's own entries not
    yet acknowledged are not sent again.
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
        claim_idle_s: float | None = CLAIM_IDLE_S,
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
        self.claim_idle_s = claim_idle_s
        self.block_ms = block_ms
        self.count = count
        self.acked = 0
        #: Entry ids handed out and not yet acked (a claim scan must not resend them).
        self._held: set[str] = set()

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) when missing."""
        try:
            self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise self._refused(
                    exc, f"cannot create group {self.group!r} on {self.key!r}") from exc
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"cannot reach the Redis Stream {self.key!r}: {exc}") from exc

    def records(self) -> Iterator[SourceRecord]:
        """This consumer's pending entries, then new ones and, every so often, those
        claimed from other consumers, as records (``line`` counts them)."""
        self.ensure_group()
        position = 0
        last = "0"
        while True:  # the pending entries a killed run left behind
            entries = self._read(last, block=None)
            if not entries:
                break
            for entry_id, fields in entries:
                last = entry_id
                position += 1
                yield self._handed(self.record(position, entry_id, fields) if fields
                                   else self.lost(position, entry_id))
        quiet_since = time.monotonic()
        next_claim = quiet_since
        while True:
            if self.claim_idle_s is not None and time.monotonic() >= next_claim:
                for entry_id, claimed in self._claim():
                    position += 1
                    quiet_since = time.monotonic()
                    yield self._handed(self.record(position, entry_id, claimed) if claimed
                                       else self.lost(position, entry_id))
                if self.claim_idle_s is not None:  # None now: this Redis cannot claim
                    next_claim = time.monotonic() + min(self.claim_idle_s / 2,
                                                        CLAIM_EVERY_MAX_S)
            entries = self._read(">", block=self.block_ms)
            if not entries:
                if self.idle_exit_s is not None and time.monotonic() - quiet_since >= self.idle_exit_s:
                    return
                continue
            quiet_since = time.monotonic()
            for entry_id, fields in entries:
                position += 1
                yield self._handed(self.record(position, entry_id, fields))

    def _handed(self, record: SourceRecord) -> SourceRecord:
        if record.ref is not None:
            self._held.add(record.ref)
        return record

    def _claim(self) -> Iterator[tuple[str, dict[bytes, bytes] | None]]:
        """Entries pending longer than ``claim_idle_s`` on any consumer, now claimed by this
        one (``XAUTOCLAIM``, the whole pending list in pages), less those it holds; an
        entry gone from the stream comes with no fields."""
        assert self.claim_idle_s is not None
        cursor = "0-0"
        while True:
            try:
                reply: Any = self.client.xautoclaim(
                    self.key, self.group, self.consumer, int(self.claim_idle_s * 1000),
                    start_id=cursor, count=self.count)
            except redis.ResponseError as exc:
                if "unknown command" in str(exc).lower():
                    # A Redis older than 6.2 (or one that renamed the command away): read
                    # on without claiming, rather than refuse a stream it can read.
                    log.warning("Redis has no XAUTOCLAIM (6.2 or later has it): entries left "
                                "pending by other consumers of group %r are not claimed; "
                                "rerun their --consumer to send them", self.group)
                    self.claim_idle_s = None
                    return
                raise self._refused(exc, f"cannot claim pending entries of {self.key!r}") from exc
            except redis.RedisError as exc:
                raise BrokerUnavailable(f"cannot read the Redis Stream {self.key!r}: {exc}") from exc
            cursor = _text(reply[0])
            claimed = [(_text(i), f) for i, f in reply[1] if i is not None]
            # Redis 7 takes entries gone from the stream out of the pending list itself
            # and names them apart; Redis 6.2 returns them with no fields
            deleted = [(_text(i), None) for i in (reply[2] if len(reply) > 2 else [])]
            for entry_id, fields in sorted(claimed + deleted, key=lambda e: _entry_key(e[0])):
                if entry_id not in self._held:
                    yield entry_id, fields
            if cursor == "0-0":
                return

    def _read(self, start: str, *, block: int | None) -> list[tuple[str, dict[bytes, bytes]]]:
        try:
            reply: Any = self.client.xreadgroup(self.group, self.consumer, {self.key: start},
                                                count=self.count, block=block)
        except redis.ResponseError as exc:
            raise self._refused(
                exc, f"cannot read {self.key!r} as group {self.group!r}") from exc
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

    @staticmethod
    def lost(position: int, entry_id: str) -> SourceRecord:
        """The refusal of a pending entry gone from the stream: its task id is unknown."""
        return SourceRecord(position, error=LOST, ref=entry_id)

    def _refused(self, exc: redis.ResponseError, failed: str) -> InvalidInput:
        """The one-line error for Redis refusing a stream command on the key or group;
        ``failed`` says what failed, for an answer of another kind."""
        text = str(exc)
        if text.startswith("WRONGTYPE"):
            try:
                kind = _text(self.client.type(self.key))
            except redis.RedisError:
                kind = "value of another type"
            return InvalidInput(f"{self.key!r} holds a {kind}, not a stream: give "
                                "--from-redis-stream a stream key")
        if text.startswith(("NOGROUP", "UNBLOCKED")):
            try:
                exists = bool(self.client.exists(self.key))
            except redis.RedisError:
                exists = text.startswith("NOGROUP")
            if exists:
                return InvalidInput(
                    f"group {self.group!r} of stream {self.key!r} was destroyed while reading: "
                    "rerun to create it again, at the start of the stream (its entries are "
                    "read again)")
            return InvalidInput(f"stream {self.key!r} was deleted while reading (its entries "
                                "with it): rerun to create it and the group again")
        return InvalidInput(f"{failed}: {exc}")

    def ack(self, entry_ids: Sequence[str]) -> None:
        """XACK ``entry_ids`` in the group."""
        if not entry_ids:
            return
        try:
            self.acked += int(self.client.xack(self.key, self.group, *entry_ids))
        except redis.ResponseError as exc:  # the key is no stream now: no rerun mends it
            raise self._refused(exc, f"cannot acknowledge entries of {self.key!r}") from exc
        except redis.RedisError as exc:
            # Unacked entries stay pending and are sent again by the next run
            # (same ids: one row each); stop rather than read on.
            raise BrokerUnavailable(f"cannot acknowledge entries of {self.key!r}: {exc}") from exc
        self._held.difference_update(entry_ids)

    # -- producer.stream.Tracker ----------------------------------------

    def sent(self, pairs: Sequence[tuple[SourceRecord, TaskItem]]) -> None:
        """Their tasks are in the broker queue: ack the entries."""
        self.ack([rec.ref for rec, _item in pairs if rec.ref is not None])

    def rejected(self, record: SourceRecord, error: ItemError) -> None:
        """A refused entry will never be sent: ack it (the run's report names it)."""
        if record.ref is not None:
            self.ack([record.ref])


def _entry_key(entry_id: str) -> tuple[int, int]:
    """An entry id's sort key: ``1700000000000-3`` -> (1700000000000, 3)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
