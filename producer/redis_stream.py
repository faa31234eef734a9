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
``claim_idle_s``, and sent by it. After each claim scan the reader deletes
the group's consumers that hold nothing and have been idle as long: Redis
keeps a consumer until it is deleted, so one name per container left a
group growing for ever (a consumer that comes back is created again by its
next read). A live reader keeps what it holds from those claims however
long backpressure holds it: a thread of its own resets the idle time of its
pending entries (``XCLAIM ... JUSTID``, which leaves their delivery count
alone) at a fraction of ``claim_idle_s``, so only the entries of a reader
that died go idle. A pending entry trimmed or deleted
from the stream before it was sent is acknowledged and reported as lost (a
refusal), so it is neither silently dropped nor met again at every restart.
A group destroyed, a key deleted or holding another type stops the reader
with :class:`InvalidInput`, one line naming what happened; the entries read
before it are still sent (:func:`producer.stream.stream` publishes what a
failing source gave before raising its error).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import redis

from contract.errors import BrokerUnavailable, InvalidInput
from contract.messages import TaskItem
from producer.items import ItemError
from producer.sources import FieldMap, SourceRecord

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Entries read per XREADGROUP call.
READ_COUNT = 256
#: How long one blocking read waits for new entries, in milliseconds.
BLOCK_MS = 1000
#: Default ``claim_idle_s``: far longer than a reader holds an entry it read (a backpressure
#: pause aside), short enough that a dead consumer's entries are analysed the same hour.
CLAIM_IDLE_S = 600.0
#: Longest pause between two claim scans, in seconds (shorter: half of ``claim_idle_s``).
CLAIM_EVERY_MAX_S = 30.0
#: Longest pause between two refreshes of the idle time of the entries a reader holds,
#: in seconds (shorter: a quarter of ``claim_idle_s``).
REFRESH_EVERY_MAX_S = 30.0
#: Retries of a read, a claim or an ack that lost its connection (a Redis restart), as a publish's
#: by default (``BERTSTREAM_PUBLISH_RETRIES``): no pause first, then 0.25 s more each,
#: capped at :data:`RETRY_MAX_S`.
RETRIES = 8
#: Longest pause between two such retries, in seconds (``BERTSTREAM_PUBLISH_RETRY_MAX_S``).
RETRY_MAX_S = 2.0
#: Pending entries listed per XPENDING call of a refresh.
REFRESH_COUNT = 1000
#: Delete the consumers of a group (``ARGV[1]``) of stream ``KEYS[1]`` that hold no pending
#: entry and have been idle for ``ARGV[2]`` ms at least, except ``ARGV[3]`` (the caller).
#: One script, so no consumer reads an entry between the check and the delete (a consumer
#: deleted with pending entries takes them out of the group's pending list for good).
#: Gives the names deleted.
PRUNE_CONSUMERS = """
local out = {}
for _, info in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local c = {}
  for i = 1, #info, 2 do c[info[i]] = info[i + 1] end
  if c['name'] ~= ARGV[3] and tonumber(c['pending']) == 0
      and tonumber(c['idle']) >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c['name'])
    out[#out + 1] = c['name']
  end
end
return out
"""
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
    yet acknowledged are not sent again. While :meth:`records` runs, a thread
    refreshes the idle time of this consumer's pending entries every quarter
    of ``claim_idle_s`` (of the default when None: other readers may claim),
    so other readers do not claim them; :meth:`close` stops it.
    A read, a claim or an ack whose connection fails is tried again ``retries`` times (a
    Redis restart is ridden out, as a publish rides it out), pausing 0.25 s more
    each time up to ``retry_max_s``; then :class:`BrokerUnavailable` is raised.
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
        retries: int = RETRIES,
        retry_max_s: float = RETRY_MAX_S,
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
        self.retries = retries
        self.retry_max_s = retry_max_s
        self.acked = 0
        #: Entry ids read (or claimed) and not yet acked (a claim scan must not resend them).
        self._held: set[str] = set()
        idle = claim_idle_s if claim_idle_s else CLAIM_IDLE_S  # None, 0: others may claim
        #: Seconds between two refreshes of what this consumer holds (:meth:`refresh`).
        self.refresh_every_s = min(idle / 4, REFRESH_EVERY_MAX_S)
        #: Held by an ack and by a claim with its check of ``_held`` (two threads).
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        #: False once Redis refused deleting idle consumers (:meth:`_prune_consumers`).
        self._prune = True
        #: True once a read of new entries was tried again: its lost reply may have left
        #: entries pending here, unknown to this reader (:meth:`_unheld_pending`).
        self._reply_lost = False

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
        self._start_keeper()
        try:
            yield from self._records()
        finally:
            self._stop.set()

    def _records(self) -> Iterator[SourceRecord]:
        position = 0
        last = "0"
        while True:  # the pending entries a killed run left behind
            entries = self._read(last, block=None)
            if not entries:
                break
            for entry_id, fields in entries:
                last = entry_id
                position += 1
                yield (self.record(position, entry_id, fields) if fields
                       else self.lost(position, entry_id))
        quiet_since = time.monotonic()
        next_claim = quiet_since
        while True:
            if self.claim_idle_s is not None and time.monotonic() >= next_claim:
                for entry_id, claimed in self._claim():
                    position += 1
                    quiet_since = time.monotonic()
                    yield (self.record(position, entry_id, claimed) if claimed
                           else self.lost(position, entry_id))
                if self.claim_idle_s is not None:  # None now: this Redis cannot claim
                    next_claim = time.monotonic() + min(self.claim_idle_s / 2,
                                                        CLAIM_EVERY_MAX_S)
            entries = self._read(">", block=self.block_ms)
            if self._reply_lost:
                self._reply_lost = False
                entries = self._unheld_pending() + entries
            if not entries:
                if self.idle_exit_s is not None and time.monotonic() - quiet_since >= self.idle_exit_s:
                    return
                continue
            quiet_since = time.monotonic()
            for entry_id, fields in entries:
                position += 1
                yield (self.record(position, entry_id, fields) if fields
                       else self.lost(position, entry_id))

    def _unheld_pending(self) -> list[tuple[str, dict[bytes, bytes]]]:
        """This consumer's pending entries that it does not hold (held from now): those a
        read whose reply was lost delivered here. Without this they waited for a claim
        scan, and with no claims (``claim_idle_s`` None) for the next run."""
        held, last = set(self._held), "0"
        found: list[tuple[str, dict[bytes, bytes]]] = []
        while True:
            entries = self._read(last, block=None)
            if not entries:
                return found
            found += [(i, f) for i, f in entries if i not in held]
            last = entries[-1][0]

    # -- keeping what this consumer holds from the other readers' claims ---

    def _start_keeper(self) -> None:
        if self._keeper is not None and self._keeper.is_alive():
            return
        self._stop.clear()
        self._keeper = threading.Thread(target=self._keep, name="bertstream-stream-keeper",
                                        daemon=True)
        self._keeper.start()

    def _keep(self) -> None:
        """Refresh what this consumer holds until stopped. A Redis outage, a vanished
        group or key are left to the reading, which reports them, and a refusal that
        passes (a replica's READONLY during a failover, a busy script) is tried again at
        the next refresh; a refusal of the commands themselves (a Redis older than 6.2
        has no XPENDING IDLE, and no XAUTOCLAIM either: nothing is claimed there; an ACL
        without them) stops the refreshing."""
        while not self._stop.wait(self.refresh_every_s):
            try:
                self.refresh()
            except redis.ResponseError as exc:
                # redis-py gives the passing refusals classes of their own (ReadOnlyError,
                # MasterDownError, TryAgainError...); BUSY and the vanished group or key
                # come as plain ResponseErrors, named by their first word
                plain = type(exc) in (redis.ResponseError, redis.exceptions.NoPermissionError)
                if plain and not str(exc).startswith(("NOGROUP", "WRONGTYPE", "BUSY")):
                    log.debug("not refreshing pending entries of %r: %s", self.key, exc)
                    return
            except redis.RedisError:
                continue

    def refresh(self) -> int:
        """Reset the idle time of the entries this reader holds (read or claimed, not yet
        acked) pending on its consumer for half a refresh interval or more, so no other
        reader claims them while this one is alive; give how many were reset.

        ``XPENDING ... IDLE`` lists them (this consumer's own pending list);
        ``XCLAIM`` with the same minimum idle time and ``JUSTID`` resets their idle
        time without raising their delivery count. The minimum idle time is what keeps
        an entry another reader has just claimed (idle 0 again) where it is. Entries
        pending under the name that this reader does not hold (another reader of the
        same name, the host name by default, that died) are left to go idle and be
        claimed.
        """
        min_idle_ms = max(1, int(self.refresh_every_s * 500))
        start, refreshed = "-", 0
        while True:
            page: Any = self.client.xpending_range(
                self.key, self.group, start, "+", REFRESH_COUNT,
                consumername=self.consumer, idle=min_idle_ms)
            ids: list[Any] = [_text(p["message_id"]) for p in page]
            held = [i for i in ids if i in self._held]
            if held:
                reset: Any = self.client.xclaim(self.key, self.group, self.consumer,
                                                min_idle_ms, held, justid=True)
                refreshed += len(reset)
            if len(ids) < REFRESH_COUNT:
                return refreshed
            start = f"({ids[-1]}"

    def close(self) -> None:
        """Stop refreshing what this consumer holds (entries not acked then go idle and
        are claimed by another reader after ``claim_idle_s``)."""
        self._stop.set()
        keeper, self._keeper = self._keeper, None
        if keeper is not None and keeper is not threading.current_thread():
            keeper.join(timeout=5)

    def __enter__(self) -> RedisStreamSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _claim(self) -> Iterator[tuple[str, dict[bytes, bytes] | None]]:
        """Entries pending longer than ``claim_idle_s`` on any consumer, now claimed by this
        one (``XAUTOCLAIM``, the whole pending list in pages), less those it holds; an
        entry gone from the stream comes with no fields."""
        cursor = "0-0"
        while True:
            # An ack lands before the claim (the entry is not pending: not claimed) or
            # after the check (the entry is held: not handed out again), never between.
            with self._lock:
                page = self._claim_page(cursor)
            if page is None:
                return
            cursor, found = page
            yield from found
            if cursor == "0-0":
                self._prune_consumers()
                return

    def _prune_consumers(self) -> None:
        """Delete the consumers of the group idle for ``claim_idle_s`` with nothing pending
        (:data:`PRUNE_CONSUMERS`), the dead readers whose entries the scan just claimed.
        Best effort: a Redis that refuses the script keeps them (logged once)."""
        if self.claim_idle_s is None or not self._prune:
            return
        try:
            gone = self.client.eval(PRUNE_CONSUMERS, 1, self.key, self.group,
                                    int(self.claim_idle_s * 1000), self.consumer)
        except redis.RedisError as exc:
            self._prune = False
            log.warning("cannot delete the idle consumers of group %r (they stay listed, "
                        "holding nothing): %s", self.group, exc)
            return
        if gone:
            log.info("deleted %d consumer(s) of group %r idle for %.0f s with nothing "
                     "pending", len(gone), self.group, self.claim_idle_s)

    def _claim_page(self, cursor: str) -> tuple[str, list[tuple[str, Any]]] | None:
        """One XAUTOCLAIM from ``cursor``: the next cursor and the entries to hand out,
        now held; None when this Redis cannot claim."""
        assert self.claim_idle_s is not None
        try:
            idle_ms = int(self.claim_idle_s * 1000)
            reply: Any = self._retried(lambda: self.client.xautoclaim(
                self.key, self.group, self.consumer, idle_ms, start_id=cursor,
                count=self.count))
        except redis.ResponseError as exc:
            if "unknown command" in str(exc).lower():
                # A Redis older than 6.2 (or one that renamed the command away): read
                # on without claiming, rather than refuse a stream it can read.
                log.warning("Redis has no XAUTOCLAIM (6.2 or later has it): entries left "
                            "pending by other consumers of group %r are not claimed; "
                            "rerun their --consumer to send them", self.group)
                self.claim_idle_s = None
                return None
            raise self._refused(exc, f"cannot claim pending entries of {self.key!r}") from exc
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"cannot read the Redis Stream {self.key!r}: {exc}") from exc
        scanned_from, cursor = cursor, _text(reply[0])
        claimed = [(_text(i), f) for i, f in reply[1] if i is not None]
        # Redis 7 takes entries gone from the stream out of the pending list itself
        # and names them apart; Redis 6.2 claims them and returns a nil for each
        deleted: list[tuple[str, Any]] = [(_text(i), None)
                                          for i in (reply[2] if len(reply) > 2 else [])]
        if any(i is None for i, _f in reply[1]):
            try:
                deleted += self._claimed_gone(scanned_from, cursor, {i for i, _f in claimed})
            except redis.ResponseError as exc:
                raise self._refused(
                    exc, f"cannot list pending entries of {self.key!r}") from exc
            except redis.RedisError as exc:
                raise BrokerUnavailable(
                    f"cannot read the Redis Stream {self.key!r}: {exc}") from exc
        found = [(i, f) for i, f in sorted(claimed + deleted, key=lambda e: _entry_key(e[0]))
                 if i not in self._held]
        self._held.update([entry_id for entry_id, _fields in found])
        return cursor, found

    def _claimed_gone(self, start: str, end: str,
                      claimed: set[str]) -> list[tuple[str, None]]:
        """The ids of the nils of a Redis 6.2 claim reply: entries gone from the stream
        that the claim of ``start`` up to ``end`` (excluded; ``0-0``: the end) moved to
        this consumer, which it neither got with fields nor holds already."""
        gone: list[tuple[str, None]] = []
        while True:
            page: Any = self.client.xpending_range(
                self.key, self.group, start, "+" if end == "0-0" else f"({end}",
                REFRESH_COUNT, consumername=self.consumer)
            ids = [_text(p["message_id"]) for p in page]
            gone += [(i, None) for i in ids if i not in claimed and i not in self._held]
            if len(ids) < REFRESH_COUNT:
                return gone
            start = f"({ids[-1]}"

    def _retried(self, call: Callable[[], T]) -> T:
        """``call()``, tried again while Redis cannot be reached (a restart), up to
        ``retries`` times; a refusal (a ResponseError, credentials) is raised at once.
        A read whose reply was lost leaves its entries pending here, not held: the
        reader reads them back after the read tried again (:meth:`_unheld_pending`)."""
        tries, pause = self.retries, 0.0
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if tries <= 0 or isinstance(exc, redis.AuthenticationError):
                    raise
                tries -= 1
            time.sleep(pause)
            pause = min(pause + min(0.25, self.retry_max_s), self.retry_max_s)

    def _read(self, start: str, *, block: int | None) -> list[tuple[str, dict[bytes, bytes]]]:
        tries = 0

        def read() -> Any:
            nonlocal tries
            tries += 1
            if tries > 1 and start == ">":  # the failed try may have delivered entries
                self._reply_lost = True
            return self.client.xreadgroup(self.group, self.consumer, {self.key: start},
                                          count=self.count, block=block)

        try:
            reply: Any = self._retried(read)
        except redis.ResponseError as exc:
            raise self._refused(
                exc, f"cannot read {self.key!r} as group {self.group!r}") from exc
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"cannot read the Redis Stream {self.key!r}: {exc}") from exc
        if not reply:
            return []
        # RESP2 (redis-py's default): [[key, [(entry id, {field: value}), ...]]]
        entries = [(_text(entry_id), fields or {}) for entry_id, fields in reply[0][1]]
        # held from now: in memory until sent, so the refresh keeps them pending here
        self._held.update([entry_id for entry_id, _fields in entries])
        return entries

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
        with self._lock:  # not between a claim and its check of what is held
            try:
                self.acked += int(self._retried(
                    lambda: self.client.xack(self.key, self.group, *entry_ids)))
            except redis.ResponseError as exc:  # the key is no stream now: no rerun mends it
                raise self._refused(
                    exc, f"cannot acknowledge entries of {self.key!r}") from exc
            except redis.RedisError as exc:
                # Unacked entries stay pending and are sent again by the next run
                # (same ids: one row each); stop rather than read on.
                raise BrokerUnavailable(
                    f"cannot acknowledge entries of {self.key!r}: {exc}") from exc
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
