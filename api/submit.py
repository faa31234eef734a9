"""Accepting tasks: idempotency by id, backpressure, and coalescing single submits.

Hop 0 of the data path for web apps. :class:`Submitter` takes validated
items and, in one Redis round trip, claims their ids (``SET NX`` of the
text's SHA-256 under :data:`ACCEPTED_KEY_PREFIX`, with a TTL), so that

- a resubmitted id with the same text is answered ``duplicate`` and not
  queued again (the caller id is the idempotency key);
- a resubmitted id with a different text is a ``conflict``, reported, never
  silently answered with the old row;
- ``GET /v1/tasks/{id}`` can say ``queued`` for an accepted id not yet stored.

A claim lasts until the task's row is stored (the worker drops it after its
commit) or its TTL ends; ids no longer claimed are checked against the stored
rows' hashes.
A caller id sent again with the same text whose stored row is ``failed`` or
``expired`` is queued again, once per stored attempt (see
:mod:`contract.retries`).
On a Redis that refuses scripts (an ACL user without ``+@scripting``, a
server without Lua) the claims and retry markers are written in WATCH/MULTI
transactions instead, with the same guarantees (switched once, logged once).
Accepted items are published through :class:`producer.client.Client`, one
message per ``bulk_chunk_size`` items; if publishing fails the claims are
released, so a retry is not taken for a duplicate.

:class:`Coalescer` gathers the single-text submits of concurrent requests
for a few milliseconds and hands them to the submitter together: one message
per lane per window instead of one per text.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from api.errors import ApiError
from api.logthrottle import RefusalLog, cause_key
from contract.broker import (
    WATCH_TRIES,
    BrokerMisconfigured,
    ScriptSwitch,
    broker_error,
    required_redis,
    watched,
)
from contract.claims import (
    DROP_CLAIMS,
    accepted_any_prefix,
    drop_claims_args,
    drop_claims_in_transaction,
)
from contract.constants import (
    ACCEPTED_KEY_PREFIX,
    LANE_BULK,
    model_family,
    served_name,
)
from contract.errors import BrokerUnavailable, StoreRefused, StoreUnavailable
from contract.liveness import live_workers
from contract.messages import TaskItem, text_sha256
from contract.results import IdState, ResultRecord
from contract.retries import MARK_RETRIES, is_retrying, retriable, retry_key, retry_marker
from contract.settings import Settings
from producer.client import Client

log = logging.getLogger(__name__)
#: The refusals of callers without a log of their own (the app's model gate).
_REFUSALS = RefusalLog(log)

ACCEPTED = "accepted"
DUPLICATE = "duplicate"
CONFLICT = "conflict"
#: A caller id that could not be compared with the stored rows (``partial`` submits only).
UNAVAILABLE = "unavailable"

#: How long a measured queue length is reused before Redis is asked again.
QUEUE_LENGTH_TTL_S = 0.2
#: Seconds a client is told to wait (Retry-After) when Redis is out of memory: it frees
#: memory as workers take the queued messages, not in an instant.
FULL_RETRY_AFTER_S = 30


def broker_redis(settings: Settings) -> redis.Redis:
    """The API's Redis client on the broker (:func:`contract.broker.redis_client`: the
    configured timeouts, keepalive and health checks).

    Raises :class:`ConfigError` for ``memory://``, which reaches no worker and has no
    Redis to claim ids and count queues in, and for a Redis URL that does not parse.
    """
    return required_redis(settings, "the API needs a Redis broker: {url} reaches no worker "
                                    "(only `bertstream demo` runs on it)")


def redis_failure(settings: Settings, exc: redis.RedisError,
                  refusals: RefusalLog | None = None) -> Exception:
    """What a failed Redis command means to the API's caller. Redis refusing the broker
    URL (a database index it lacks, credentials it does not take): a setting to fix
    (:class:`BrokerMisconfigured`, a 503 without Retry-After). Redis unreachable: the
    outage (503). Redis up but out of memory: a 503 that says so (a warning). Any other
    error reply (a script error, an expiry Redis refuses) is no outage: an internal error
    (500), the reply logged as an error. Those two are logged on ``refusals``, the
    repeats of each reply summed."""
    error = broker_error(settings, exc)
    if isinstance(error, BrokerMisconfigured):
        return error
    refusals = refusals or _REFUSALS
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        refusals.note("answering 503 broker_full", cause_key(exc), logging.WARNING,
                      "answering 503 broker_full: Redis is out of memory (maxmemory): %s", exc)
        return ApiError(503, "broker_full", "the queue (Redis) is out of memory; retry "
                        "later", {"Retry-After": str(FULL_RETRY_AFTER_S)})
    if isinstance(exc, redis.ResponseError):
        refusals.note("answering 500 internal_error", cause_key(exc), logging.ERROR,
                      "answering 500 internal_error: Redis refused a command: %s", exc)
        return ApiError(500, "internal_error", "internal error (Redis refused a command)")
    return error


#: Claim every id of a batch at once: ``SET <prefix><id> <hash> NX EX <ttl>`` each. The
#: ids travel NUL-separated in one argument and the hashes (64 hex characters each)
#: concatenated in another: packing 2 arguments instead of 2 per id is what keeps this
#: cheap in Python. The reply lists only the ids already taken, as (1-based index, the
#: hash held, or "?" if it expired in between) pairs. Ids never hold NUL (refused by
#: validation). An id claimed for a named model also records that model's queue family
#: under :func:`~contract.claims.accepted_any_prefix` (a status asked without a model reads it; the
#: default model's claims, the common case, need no second key). Standalone
#: Redis: the keys are not declared up front, as a cluster needs.
_CLAIM = """
local ttl, prefix, hashes = ARGV[1], ARGV[2], ARGV[3]
local any_prefix, family = ARGV[5], ARGV[6]
local out = {}
local i = 0
for id in string.gmatch(ARGV[4], "[^%z]+") do
  i = i + 1
  local key = prefix .. id
  if redis.call('SET', key, string.sub(hashes, (i - 1) * 64 + 1, i * 64), 'NX', 'EX', ttl) then
    if family ~= '' then
      redis.call('SET', any_prefix .. id, family, 'EX', ttl)
    end
  else
    out[#out + 1] = i
    out[#out + 1] = redis.call('GET', key) or '?'
  end
end
return out
"""


@dataclass(frozen=True)
class Outcome:
    """What became of one submitted item."""

    id: str
    status: str  # ACCEPTED, DUPLICATE or CONFLICT (UNAVAILABLE: partial submits only)
    reason: str = ""
    #: UNAVAILABLE: the error the stored rows could not be read with
    error: StoreUnavailable | None = None


class Submitter:
    """Claims ids and publishes items; thread-safe (called from the server's threads)."""

    def __init__(self, settings: Settings, client: Client, *,
                 on_message: Callable[[str, int], None] | None = None) -> None:
        """``on_message(lane, items)`` is called for each message published (metrics)."""
        self.settings = settings
        self.client = client
        self.on_message = on_message
        self.redis = broker_redis(settings)
        #: its log lines of refusals and of answers made without Redis or the database
        self.refusals = RefusalLog(log)
        self._lock = threading.Lock()
        self._queue_length: tuple[float, int] | None = None
        self._claim = self.redis.register_script(_CLAIM)
        self._mark_retries = self.redis.register_script(MARK_RETRIES)
        self._unclaim = self.redis.register_script(DROP_CLAIMS)
        self._scripts = ScriptSwitch(log, "ids are claimed and retries marked from here "
                                     "on with WATCH/MULTI transactions (two round trips "
                                     "instead of one)")

    @property
    def scripted(self) -> bool:
        """False once Redis refused a script: claims, retry markers and releases then go
        through WATCH/MULTI transactions (:meth:`_scriptless`)."""
        return self._scripts.scripted

    def key(self, task_id: str, family: str | None = None) -> str:
        """The Redis key remembering that ``task_id`` was accepted for this model (or for
        the model of queue ``family``)."""
        return f"{ACCEPTED_KEY_PREFIX}{family or self.settings.family}:{task_id}"

    def accepted_hash(self, task_id: str, family: str | None = None) -> str | None:
        """The text hash ``task_id`` was accepted with for this model (or ``family``'s),
        while it is remembered."""
        return self._get(self.key(task_id, family))

    def accepted_anywhere(self, task_id: str) -> str | None:
        """The text hash ``task_id`` was accepted with for this model, else for the named
        model it was last accepted for, else (this model being named) for the default
        model, whose claims write no pointer; while remembered."""
        mine = self.accepted_hash(task_id)
        if mine is not None:
            return mine
        family = self._get(accepted_any_prefix(self.settings.queue) + task_id)
        found = self.accepted_hash(task_id, family) if family else None
        if found is None and self.settings.model_name:
            found = self.accepted_hash(task_id, self.settings.queue)
        return found

    def repeated(self, task_id: str, text: str) -> bool:
        """Whether ``text`` sent again under ``task_id`` is a duplicate that queues nothing:
        its claim holds the text's hash or, its claim dropped once its row was stored, a
        ``done`` row holds that text (a failed or expired one would be queued again). A
        database that cannot be read: False."""
        digest = text_sha256(text)
        held = self.accepted_hash(task_id)
        if held is not None:
            return held == digest
        try:
            rows = (self.client.store.id_states([task_id])
                    if self.client.has_results_table() else {})
        except StoreUnavailable:
            return False
        row = rows.get(task_id)
        return row is not None and row.hashes == {digest} and not retriable(row.status)

    def accepted_for(self, task_id: str, model: str | None) -> str | None:
        """The text hash ``task_id`` was accepted with for ``model`` (a name, or the stored
        name of the default model), or for any model when ``model`` is None."""
        if not model:
            return self.accepted_anywhere(task_id)
        # served_name: ``default`` is the default model, as a submit to it reads it
        known = self.accepted_hash(task_id, model_family(self.settings.queue, served_name(model)))
        return known if known is not None else self.accepted_as_stored_name(task_id, model)

    def accepted_as_stored_name(self, task_id: str, model: str) -> str | None:
        """The text hash ``task_id`` was accepted with for the default model, when ``model``
        is the name that model's live workers store their rows under (the ``model`` a
        done result shows, which a client may pass back while the task is still queued).

        Only for a default model without a name of its own: a named model's rows carry
        its name. The default model's claims and workers are those of the queue's own
        family, whatever model this server submits to. Reads the workers' heartbeats, so
        a task asked for this way while no worker is alive is not found.
        """
        try:
            alive = live_workers(self.redis, self.settings.queue)
        except redis.RedisError as exc:
            raise redis_failure(self.settings, exc, self.refusals) from exc
        if not any(w.get("model") == model for w in alive):
            return None
        return self.accepted_hash(task_id, self.settings.queue)

    def _get(self, key: str) -> str | None:
        try:
            value = self.redis.get(key)
        except redis.RedisError as exc:
            raise redis_failure(self.settings, exc, self.refusals) from exc
        return value.decode("utf-8") if isinstance(value, bytes) else None

    def queue_full(self) -> bool:
        """True while the queue holds more messages than ``max_queue_length``."""
        now = time.monotonic()
        with self._lock:
            cached = self._queue_length
        if cached is None or now - cached[0] > QUEUE_LENGTH_TTL_S:
            cached = (now, self.client.queue_length())
            with self._lock:
                self._queue_length = cached
        return cached[1] > self.settings.max_queue_length

    def submit(self, items: Sequence[TaskItem], *, lane: str,
               caller_ids: frozenset[str] = frozenset(), partial: bool = False) -> list[Outcome]:
        """Claim, check and publish ``items`` on ``lane``; one :class:`Outcome` each, in order.

        ``caller_ids``: the ids the caller chose (generated ids cannot collide,
        so only these are looked up among the stored rows).
        Raises :class:`BrokerUnavailable`, :class:`BrokerMisconfigured`, :class:`ApiError`
        when Redis refuses a command (see :func:`redis_failure`), or
        :class:`StoreUnavailable` when the stored rows cannot be compared: nothing
        published, no claim kept.
        ``partial`` (items of separate requests): that database error fails only
        the caller ids it left unchecked, as :data:`UNAVAILABLE` outcomes with
        no claim kept, and the rest are published.
        """
        if not items:
            return []
        hashes = [text_sha256(it.text) for it in items]
        try:
            # One command for the whole batch: SET NX each id, GET the ones taken.
            args = [self.settings.api_id_ttl_s, self.key(""), "".join(hashes),
                    "\0".join(it.id for it in items),
                    accepted_any_prefix(self.settings.queue),
                    self.settings.family if self.settings.model_name else ""]
            previous = self._scriptless(self._claim, args, self._claim_in_transaction)
        except redis.RedisError as exc:
            raise redis_failure(self.settings, exc, self.refusals) from exc
        outcomes: list[Outcome | None] = [None] * len(items)
        for k in range(0, len(previous), 2):
            i = int(previous[k]) - 1
            outcomes[i] = self._verdict(items[i].id, hashes[i], previous[k + 1])
        fresh = [i for i, o in enumerate(outcomes) if o is None]
        try:
            stored = self._check_stored(items, hashes, fresh, caller_ids, outcomes)
        except BaseException as exc:
            if not (partial and isinstance(exc, StoreUnavailable)):
                # Nothing is published: the caller's retry must not meet these claims and
                # be told "duplicate" for a task that was never queued.
                self._release([items[i].id for i in fresh])
                raise
            stored = self._unchecked(items, fresh, caller_ids, outcomes, exc)
        self._judge_repeats(items, hashes, stored, outcomes)
        retries = self._retries(items, hashes, stored, caller_ids, outcomes)
        publish = sorted([i for i in fresh if outcomes[i] is None] + list(retries))
        sent, error = self._publish([items[i] for i in publish], lane)
        if error is not None:
            # The chunks already queued keep their claims: the caller's retry of the whole
            # request reads them as duplicates instead of queueing them a second time.
            queued = {items[i].id for i in publish[:sent]}
            self._release([items[i].id for i in fresh if items[i].id not in queued])
            self._delete([self.retry_key(items[i].id) for i in retries
                          if items[i].id not in queued])
            raise error
        for i in publish:
            outcomes[i] = Outcome(items[i].id, ACCEPTED, retries.get(i, ""))
        # A fresh claim of an id whose stored row answered it (a duplicate not queued
        # again): the row stays its only record, as workers leave it once they store it.
        queued = {items[i].id for i in publish}
        self._release([items[i].id for i in fresh if items[i].id not in queued
                       and (o := outcomes[i]) is not None and o.status == DUPLICATE])
        return [o for o in outcomes if o is not None]

    def retry_key(self, task_id: str) -> str:
        """The Redis key of ``task_id``'s retry marker."""
        return retry_key(self.settings.queue, task_id)

    def retrying(self, record: ResultRecord, model: str | None) -> bool:
        """Whether a retry of ``record`` (a stored row) is queued, so that a status read of
        it (asked with ``model``, or without one) is ``queued``."""
        if not retriable(record.status):
            return False
        try:
            marker = self._get(self.retry_key(record.id))
        # the stored row is still the best answer, Redis down or refusing the broker URL
        except (BrokerUnavailable, BrokerMisconfigured, ApiError) as exc:
            self.refusals.note("status read without its retry marker", cause_key(exc),
                               logging.WARNING, "status of %r read without its retry "
                               "marker: %s", record.id, exc)
            return False
        return is_retrying(marker, record.attempts, record.model, model)

    def _retries(self, items: Sequence[TaskItem], hashes: list[str],
                 stored: dict[str, IdState], caller_ids: frozenset[str],
                 outcomes: list[Outcome | None]) -> dict[int, str]:
        """The duplicates to queue again because their stored row is ``failed`` or
        ``expired`` (index -> why), each id once, each stored attempt once; the others stay
        duplicates. A database that cannot be read leaves them all duplicates (logged)."""
        first: dict[str, int] = {}
        for i, outcome in enumerate(outcomes):
            if (outcome is not None and outcome.status == DUPLICATE
                    and items[i].id in caller_ids):
                first.setdefault(items[i].id, i)
        if not first:
            return {}
        rows = dict(stored)
        unread = [task_id for task_id in first if task_id not in rows]
        if unread:
            try:
                if self.client.has_results_table():
                    rows.update(self.client.store.id_states(unread))
            except StoreUnavailable as exc:
                self.refusals.note("duplicates answered unchecked", cause_key(exc),
                                   logging.WARNING, "duplicates answered without checking "
                                   "for failed rows to retry: %s", exc)
                return {}
        candidates = [(i, rows[task_id]) for task_id, i in first.items()
                      if task_id in rows and retriable(rows[task_id].status)
                      and rows[task_id].hashes == {hashes[i]}]
        if not candidates:
            return {}
        target = self.settings.model_name
        try:
            marked = self._scriptless(self._mark_retries, [
                self.settings.api_id_ttl_s,
                "\0".join(self.retry_key(items[i].id) for i, _ in candidates),
                "\0".join(retry_marker(row.attempts, row.model, target)
                          for _, row in candidates)], self._mark_in_transaction)
        except redis.RedisError as exc:
            raise redis_failure(self.settings, exc, self.refusals) from exc
        now_marked = {int(m) - 1 for m in marked}
        retries: dict[int, str] = {}
        for k, (i, row) in enumerate(candidates):
            if k in now_marked:
                retries[i] = f"queued again: its stored attempt {row.attempts} {row.status}"
                outcomes[i] = None
            else:
                outcomes[i] = Outcome(items[i].id, DUPLICATE,
                                      f"a retry of its {row.status} attempt is already queued")
        return retries

    def _scriptless(self, script: Any, args: list[Any],
                    fallback: Callable[[list[Any]], list[Any]]) -> list[Any]:
        """Run ``script`` with ``args``; once Redis refuses scripts (an ACL user without
        ``+@scripting``, a server without Lua), ``fallback`` with them instead, from then
        on (:class:`~contract.broker.ScriptSwitch`: the switch is logged once)."""
        return self._scripts.run(lambda: list(script(args=args)), lambda: fallback(args))

    def _transaction(self, keys: list[str], step: Callable[[Any, list[Any]], list[Any]]
                     ) -> list[Any]:
        """:func:`contract.broker.watched`: ``step``'s writes decided on ``keys`` as no
        other client changed them. Its result; a 503 when the keys kept changing."""
        try:
            return watched(self.redis, keys, step)
        except redis.WatchError:
            self.refusals.note("answering 503 broker_busy", "", logging.WARNING,
                               "answering 503 broker_busy: a submit's ids kept changing "
                               "through %d transactions", WATCH_TRIES)
            raise ApiError(503, "broker_busy", "the ids of this submit kept changing meanwhile "
                           "(concurrent submits of the same ids); retry",
                           {"Retry-After": "1"}) from None

    def _claim_in_transaction(self, args: list[Any]) -> list[Any]:
        """What :data:`_CLAIM` does, in a transaction: the same arguments, the same reply."""
        ttl, prefix, hashes, ids, any_prefix, family = args
        task_ids = ids.split("\0")
        keys = [prefix + task_id for task_id in task_ids]
        unique = list(dict.fromkeys(keys))

        def claim(pipe: Any, values: list[Any]) -> list[Any]:
            held = dict(zip(unique, values, strict=True))
            out: list[Any] = []
            for i, (key, task_id) in enumerate(zip(keys, task_ids, strict=True)):
                digest = hashes[i * 64:(i + 1) * 64]
                if held[key] is None:
                    pipe.set(key, digest, nx=True, ex=ttl)
                    if family:
                        pipe.set(any_prefix + task_id, family, ex=ttl)
                    held[key] = digest.encode("ascii")  # a later copy meets this claim
                else:
                    out += [i + 1, held[key]]
            return out

        return self._transaction(unique, claim)

    def _mark_in_transaction(self, args: list[Any]) -> list[Any]:
        """What :data:`~contract.retries.MARK_RETRIES` does, in a transaction: the same
        arguments, the same reply. Its keys are distinct (one per task id)."""
        ttl, keys, values = args[0], args[1].split("\0"), args[2].split("\0")

        def mark(pipe: Any, held: list[Any]) -> list[Any]:
            out = []
            for i, (key, value) in enumerate(zip(keys, values, strict=True)):
                if held[i] != value.encode("utf-8"):
                    pipe.set(key, value, ex=ttl)
                    out.append(i + 1)
            return out

        return self._transaction(keys, mark)

    def _unchecked(self, items: Sequence[TaskItem], fresh: list[int], caller_ids: frozenset[str],
                   outcomes: list[Outcome | None],
                   exc: StoreUnavailable) -> dict[str, IdState]:
        """The stored rows could not be read (``exc``): each fresh caller id (every copy of
        it in the batch) becomes :data:`UNAVAILABLE` and loses its claim, as a whole submit
        would; ``exc`` is kept, so each caller is told what a whole submit's would be (a
        refusal: the setting to fix). Gives the stored rows known (none)."""
        unchecked = {items[i].id for i in fresh if items[i].id in caller_ids}
        self._release(sorted(unchecked))
        for i, item in enumerate(items):
            if item.id in unchecked:
                outcomes[i] = Outcome(item.id, UNAVAILABLE, str(exc), exc)
        return {}

    def _verdict(self, task_id: str, digest: str, previous: bytes) -> Outcome:
        if previous not in (b"?", digest.encode("ascii")):
            return Outcome(task_id, CONFLICT,
                           f"id {task_id!r} was already accepted with a different text")
        return Outcome(task_id, DUPLICATE, "already accepted with the same text")

    def _check_stored(self, items: Sequence[TaskItem], hashes: list[str], fresh: list[int],
                      caller_ids: frozenset[str],
                      outcomes: list[Outcome | None]) -> dict[str, IdState]:
        """Ids no longer remembered in Redis may still have a stored row: compare hashes.
        Gives the stored rows found."""
        wanted = [i for i in fresh if items[i].id in caller_ids]
        if not wanted:
            return {}
        # Any model's row: an id names one text, whichever model scores it.
        stored = (self.client.store.id_states([items[i].id for i in wanted])
                  if self.client.has_results_table() else {})
        conflicts = []
        for i in wanted:
            row = stored.get(items[i].id)
            if row is None:
                continue
            if row.hashes != {hashes[i]}:
                outcomes[i] = Outcome(items[i].id, CONFLICT,
                                      f"id {items[i].id!r} is stored with a different text")
                conflicts.append(items[i].id)
            else:
                outcomes[i] = Outcome(items[i].id, DUPLICATE, "already stored with the same text")
        # The claim just made holds the refused text's hash: drop it, so the
        # stored row stays the only record of that id.
        self._release(conflicts)
        return stored

    @staticmethod
    def _judge_repeats(items: Sequence[TaskItem], hashes: list[str],
                       stored: dict[str, IdState], outcomes: list[Outcome | None]) -> None:
        """An id given twice in one batch whose row is stored: the later copies are judged
        against the stored row too. (Redis judged them against the first copy's claim,
        which the stored row may have just refused: "duplicate" of a text never queued.)"""
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.id not in seen:
                seen.add(item.id)
                continue
            row = stored.get(item.id)
            if row is None:
                continue
            outcomes[i] = (Outcome(item.id, DUPLICATE, "already stored with the same text")
                           if row.hashes == {hashes[i]} else
                           Outcome(item.id, CONFLICT,
                                   f"id {item.id!r} is stored with a different text"))

    def _publish(self, items: list[TaskItem],
                 lane: str) -> tuple[int, BrokerUnavailable | BrokerMisconfigured | None]:
        """Publish ``items`` in messages of ``bulk_chunk_size``: how many were sent, and the
        error that stopped the rest (None when all were): Redis unreachable, or refusing
        the broker URL."""
        size = self.settings.bulk_chunk_size
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            try:
                self.client.publish(chunk, bulk=lane == LANE_BULK)
            except (BrokerUnavailable, BrokerMisconfigured) as exc:
                return start, exc
            if self.on_message is not None:
                self.on_message(lane, len(chunk))
        return len(items), None

    def _release(self, ids: list[str]) -> None:
        """Drop the claims of ``ids``; a named model's with their pointers, while these name
        it (:data:`~contract.claims.DROP_CLAIMS`; a transaction on a Redis that refuses
        scripts)."""
        if ids and self.settings.model_name:
            args = drop_claims_args(self.key(""), accepted_any_prefix(self.settings.queue),
                                    self.settings.family, ids)
            try:
                self._scriptless(self._unclaim, args,
                                 lambda a: drop_claims_in_transaction(self.redis, a))
                return
            except redis.RedisError:
                pass  # the claims alone, below (they and the pointers expire on their own)
        self._delete([self.key(i) for i in ids])

    def _delete(self, keys: list[str]) -> None:
        if not keys:
            return
        try:
            self.redis.delete(*keys)
        except redis.RedisError:
            pass  # they expire on their own; the caller already gets the outage error

    def close(self) -> None:
        """Close the Redis connection."""
        self.redis.close()


@dataclass
class _Pending:
    item: TaskItem
    caller_id: bool
    future: asyncio.Future[Outcome]


class Coalescer:
    """Gathers single submits per lane for ``window_s``, then submits them together.

    A lane's window opens with its first item and closes ``window_s`` later,
    or at once when ``bulk_chunk_size`` items are waiting. Each caller awaits
    its own :class:`Outcome`; a broker outage fails every caller of that window,
    a database outage only the callers whose id had to be checked against it.
    """

    def __init__(self, submitter: Submitter, window_s: float, max_items: int) -> None:
        self.submitter = submitter
        self.window_s = window_s
        self.max_items = max_items
        self._pending: dict[str, list[_Pending]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self.messages = 0

    def idle(self) -> bool:
        """No item waits for its window and no window is being submitted."""
        return not self._pending and not self._sending

    async def submit(self, item: TaskItem, lane: str, caller_id: bool) -> Outcome:
        """Queue ``item`` for the next message of ``lane``; give its outcome once published."""
        loop = asyncio.get_running_loop()
        if self.window_s <= 0:
            ids = frozenset({item.id}) if caller_id else frozenset()
            outcomes = await loop.run_in_executor(
                None, lambda: self.submitter.submit([item], lane=lane, caller_ids=ids))
            return outcomes[0]
        future: asyncio.Future[Outcome] = loop.create_future()
        batch = self._pending.setdefault(lane, [])
        batch.append(_Pending(item, caller_id, future))
        if len(batch) >= self.max_items:
            self._flush(lane)
        elif lane not in self._timers:
            self._timers[lane] = loop.call_later(self.window_s, self._flush, lane)
        return await future

    def _flush(self, lane: str) -> None:
        timer = self._timers.pop(lane, None)
        if timer is not None:
            timer.cancel()
        batch = self._pending.pop(lane, [])
        if batch:
            self.messages += 1
            task = asyncio.get_running_loop().create_task(self._send(lane, batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, lane: str, batch: list[_Pending]) -> None:
        items = [p.item for p in batch]
        ids = frozenset(p.item.id for p in batch if p.caller_id)
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(
                None, lambda: self.submitter.submit(items, lane=lane, caller_ids=ids,
                                                    partial=True))
        except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, outcome in zip(batch, outcomes, strict=True):
            if p.future.done():
                continue
            if outcome.status == UNAVAILABLE:
                p.future.set_exception(_unavailable(outcome))
            else:
                p.future.set_result(outcome)


def _unavailable(outcome: Outcome) -> StoreUnavailable:
    """The error for one caller of an :data:`UNAVAILABLE` outcome: a new one each (many
    callers raise it), of the kind the stored rows' read raised (:class:`StoreRefused`
    with its problem: a 503 ``database_misconfigured``) and caused by it, so that the
    503 handler can tell a table missing under a running API."""
    cause = outcome.error
    error = (StoreRefused(outcome.reason, cause.problem) if isinstance(cause, StoreRefused)
             else StoreUnavailable(outcome.reason))
    error.__cause__ = cause
    return error
