"""Hop 1 (buffer) and hop 5 (ack): the micro-batching Celery task.

Built on celery-batches' ``Batches``, which buffers requests in the consumer
and flushes on a count or a timer. What is changed:

- a token budget: a flush also fires when the buffered texts hold about
  ``flush_tokens`` tokens, so one bulk message of 256 long texts does not
  wait for 63 more messages;
- acks after commit: celery-batches acks late requests when the batch
  function *returns*, even when it raised. Here each message is acked only
  after its rows are committed, and requeued when the database is down;
- long texts over several flushes: a message whose long text still has
  windows to score is held (not acked) and acked by the flush that stores
  it; while such texts wait, the flush timer keeps flushing even with no
  new message. Each flush renews the held messages in kombu's unacked
  index, so the visibility sweep does not restore them as a dead worker's;
  a copy restored all the same (another worker's sweep, a flush longer
  than the timeout) joins its original, uncounted. A warm shutdown hands
  the held messages back to the queue and takes back their delivery
  counts: their flushes ran to the end, so a rolling restart is no death
  of their worker (a kill -9 still counts);
- buffered messages are renewed in the unacked index too, by a consumer
  timer every quarter of the visibility timeout (as are held ones between
  flushes): nothing keeps ``max_wait_ms`` below the visibility timeout,
  and a message still buffered past it was restored by the sweep and came
  back as a second delivery of itself;
- a database outage costs a flush one run of the commit's retries: the
  first group (redelivered messages run one group each) that meets it ends
  the flush, and the groups not tried go back to the queue untried, their
  delivery not counted. Tried in turn, each group spent the retries with
  the event loop blocked and nothing renewing the rest of the flush, which
  other workers' sweeps restored and brought back counted (dead-lettered
  untried). Before each redelivered group the deliveries still waiting are
  renewed in the unacked index, and within a group before each database
  operation when due: against a silent database one run of the retries
  outlasts a short visibility timeout. The group that met the outage has
  its delivery taken back, the deliveries counted before it kept. While
  the outage lasts, the next flushes requeue unrun once a ``SELECT 1``
  fails (worker/flush.py), each after a longer pause (:meth:`_outage_pause`);
- the tasks of a list item the transport parks (worker/kombu_redis.py) get
  ``failed`` rows; during a database outage those rows wait in memory
  (bounded) and are written once the database answers again.

And one rule: nothing raised while handling one message leaves
:meth:`AnalyzeTask.flush`. It runs in the consumer's event loop, where an
exception stops the worker (a count-triggered flush) or is logged by the
timer and leaves the messages unacked until the visibility timeout (a
timer-triggered one). A message whose rows cannot be written is requeued
with its delivery count kept, so it is dead-lettered after
``max_attempts`` deliveries instead of coming back forever.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from celery import Celery, bootsteps
from celery_batches import Batches, SimpleRequest

from contract.broker import redis_client, redis_full, redis_unreachable
from contract.clock import ServerClock
from contract.constants import TASK_ANALYZE
from contract.errors import StoreUnavailable
from contract.messages import printable
from contract.results import ping
from contract.settings import Settings
from worker.claims import ClaimDropper
from worker.deliveries import DeliveryCounter
from worker.flush import FlushProcessor, FlushStats
from worker.kombu_redis import Undeliverable, deferred_acks, forget, keep_visible
from worker.metrics import count_dead_lettered, count_requeued, count_undeliverable

log = logging.getLogger(__name__)

#: Parked items whose failed rows wait for the database (an outage): at most this many...
UNSTORED_MAX = 1_000
#: ... holding at most this many bytes of raw items; past either bound the oldest are let go.
UNSTORED_MAX_BYTES = 32 * 1024 * 1024
#: Parked items stored per try, so many waiting ones do not hold the event loop long.
UNSTORED_PER_TRY = 100
#: Seconds before the next try while the database stays unavailable: the first, doubled
#: after each try in vain up to the last.
UNSTORED_RETRY_S = (1.0, 30.0)


def estimate_tokens(payload: Any) -> int:
    """Upper-bound token estimate of one message body before tokenizing.

    One token per character (exact for Chinese, generous for English):
    cheap, and only used to decide when to flush.
    """
    try:
        items = payload[0][0]
        return sum(min(len(it.get("text") or ""), 512) + 2 for it in items)
    except Exception:  # noqa: BLE001 - any shape at all: a malformed message is small
        return 1


def ack_all(requests: list[Any]) -> None:
    """Ack every request now, with one Redis round trip for all of them.

    Celery's ``Request.acknowledge`` schedules the ack on the event loop
    (``call_soon``), one MULTI/EXEC per message. Here the flush runs on that
    loop's thread already, so the messages are acked directly, inside
    :func:`deferred_acks`, which sends their unacked-index removals as one
    pipeline (worker/kombu_redis.py).
    """
    pending = [r for r in requests if not r.acknowledged]
    messages = [getattr(r, "message", None) for r in pending]
    with deferred_acks([getattr(m, "channel", None) for m in messages]):
        for r, m in zip(pending, messages, strict=True):
            if m is None or not hasattr(m, "ack_log_error"):
                r.acknowledge()
                continue
            m.ack_log_error(log, getattr(r, "_connection_errors", ()))
            r.acknowledged = True


@dataclass(frozen=True)
class _Unstored:
    """The failed rows of a parked item, kept while the database is unavailable.

    ``args`` (``[[item, ...]]``): its items fail under their own ids; None:
    one row under ``malformed-<mid>-0`` keeps ``body``. ``size``: the raw
    item's bytes, what the memory bound counts.
    """

    mid: str
    args: Any
    body: Any
    reason: str
    size: int


class AnalyzeTask(Batches):
    """Buffers analysis requests and hands each flush to a FlushProcessor."""

    name = TASK_ANALYZE
    acks_late = True
    reject_on_worker_lost = True
    typing = False
    processor: FlushProcessor | None = None
    #: Prometheus metrics updated after every flush (None: not served).
    metrics: Any = None
    deliveries: DeliveryCounter | None = None
    #: Drops the HTTP API's id claims of the tasks each commit stored.
    claims: ClaimDropper | None = None
    max_attempts = 3
    flush_tokens = 32_768
    #: Seconds to pause before requeueing after a database outage: the first pause of an
    #: outage, doubled at each requeue of it up to the last (:meth:`_outage_pause`).
    requeue_pause_s = 1.0
    requeue_pause_max_s = 5.0
    #: kombu's visibility timeout: buffered and held messages are renewed well within it.
    visibility_timeout_s = 300

    def __init__(self) -> None:
        super().__init__()
        self._buffered_tokens = 0
        #: Deliveries whose long texts wait in the processor's backlog, by message id: a
        #: copy the visibility sweep restored joins its original, and both are acked together.
        #: Only the first of each id's deliveries is counted (:meth:`hand_back_held`).
        self._held: dict[str, list[Any]] = {}
        self._flushed_at = 0.0
        self._renew_warned_at = float("-inf")
        self._renewed_at = float("-inf")
        self._tick_tref: Any = None
        #: Parked items whose failed rows wait for the database, oldest first, by raw item.
        self._unstored: OrderedDict[bytes, _Unstored] = OrderedDict()
        self._unstored_bytes = 0
        self._unstored_let_go = 0
        self._let_go_warned_at = float("-inf")
        #: When to try the waiting parked items next (monotonic), and the pause after that.
        self._retry_at: float | None = None
        self._retry_s = UNSTORED_RETRY_S[0]
        #: The database answered in this flush (rows written or looked up).
        self._answered = False
        #: The deliveries of the running flush not settled yet: renewed with the buffered
        #: and held ones while its database work waits (:meth:`_renew_due`).
        self._flushing: list[Any] = []

    def _do_flush(self) -> None:
        """celery-batches' timer flush, which also continues the backlog of long texts.

        While long texts wait, flushes follow each other; between two, the
        event loop is left one flush interval to read the messages that came
        meanwhile (it reads one message per turn, so back-to-back flushes
        would take in one message per flush).
        """
        if self.processor is not None and self.processor.backlog:
            if time.monotonic() - self._flushed_at < self.flush_interval:
                return
            if self._buffer.empty():
                self.flush([])
                return
        super()._do_flush()

    def Strategy(self, task: Any, app: Celery, consumer: Any) -> Callable[..., None]:  # noqa: N802
        """celery-batches' strategy plus a token-budget flush trigger.

        Built again each time the consumer (re)connects. celery-batches
        starts its flush timer on the first request only, on the consumer's
        timer; after a broker reconnect that timer is a new one and the old
        entry is dead, so a stale reference would leave later requests
        waiting for a count-triggered flush that may never come. The timer
        is dropped here and restarted at once for requests still buffered;
        so is the housekeeping timer (:meth:`_tick`), which always runs.
        """
        handler = super().Strategy(task, app, consumer)
        tref: Any = getattr(self, "_tref", None)
        if tref is not None:
            tref.cancel()
            self._tref = None
        if not self._buffer.empty() or self._held:
            self._tref = consumer.timer.call_repeatedly(self.flush_interval, self._do_flush)
        if self._tick_tref is not None:
            self._tick_tref.cancel()
        self._tick_tref = consumer.timer.call_repeatedly(self.tick_s, self._tick)

        def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                       **kw: Any) -> None:
            problem = _header_problem(message)
            _drop_eta(message)
            if problem is None:
                try:
                    handler(message, body, ack, reject, callbacks, **kw)
                except Exception as exc:  # noqa: BLE001 - Celery cannot read it as a task
                    problem = f"{type(exc).__name__}: {exc}"
            if problem is not None:
                self._refuse(message, problem, body)
                return
            self._buffered_tokens += estimate_tokens(message.payload)
            if self._buffered_tokens >= self.flush_tokens and not self._buffer.empty():
                self._do_flush()

        return on_message

    def _refuse(self, message: Any, problem: str, body: Any) -> None:
        """A message Celery cannot take as a task request: stored as one failed row and
        acked, instead of an exception that would stop the worker (and then every worker
        the message is redelivered to). During a database outage it is requeued."""
        headers = getattr(message, "headers", None)
        task_id = headers.get("id") if isinstance(headers, dict) else None
        mid = task_id if _header_problem(message) is None else f"tag-{message.delivery_tag}"
        reason = f"malformed task message (not a Celery task request): {problem}"
        log.error("refusing message %s: %s", printable(str(mid))[:200], printable(reason)[:500])
        try:
            # ``body``: the payload Celery decoded (JSON only), kept as the row's raw item.
            stats = self._processor().refuse(mid, body, reason)
        except StoreUnavailable as exc:
            self._processor().outage.note(
                log, "requeue", logging.ERROR,
                "database unavailable, requeueing the refused message: %s", exc,
                cause=str(exc), flushes=1, messages=1)
            self._outage_pause()
            count_requeued(self.metrics, "database", 1)
            _settle(message.reject, requeue=True)
            return
        except Exception:  # noqa: BLE001 - never out of the event loop
            log.exception("storing the refusal of message %s failed; dropping it",
                          printable(str(mid))[:200])
        else:
            self._observe(stats, inference=False)
        _settle(message.ack)

    def fail_undeliverable(self, parked: Undeliverable) -> str | None:
        """A list item the transport parked (worker/kombu_redis.py): the tasks it names get
        ``failed`` rows, so no caller waits on them for ever. Gives what it did.

        A body that reads as ``[[item, ...]]`` fails its items under their own ids (as
        a dead-lettered message's); else a readable task id header gives one row under
        ``malformed-<task id>-0`` (as a refused message's); else nothing is stored.
        During a database outage the rows wait in memory (bounded: the oldest are let
        go first) and are written once it answers (:meth:`_retry_unstored`); while some
        wait, a new one joins them untried, so an outage costs the event loop no commit
        retries per parked item. Never raises: it runs in the consumer's event loop.
        """
        count_undeliverable(self.metrics)
        body = parked.body
        args = body[0] if isinstance(body, list) and body else None
        items = (args[0] if isinstance(args, list) and len(args) == 1
                 and isinstance(args[0], list) else None)
        has_id = _header_problem(parked) is None
        if not items and not has_id:
            return None
        mid = str((parked.headers or {}).get("id")) if has_id else (
            "undeliverable-" + hashlib.sha256(parked.item).hexdigest()[:32])
        where = f"kept on {parked.side}" if parked.side else "dropped (Redis refused to keep it)"
        reason = (f"undeliverable message: kombu cannot make a message of it "
                  f"({parked.reason}); the raw item is {where}")
        unstored = _Unstored(mid, args if items else None, body, reason, len(parked.item))
        key = hashlib.sha256(parked.item).digest()
        if self._unstored:
            return self._wait_for_database(key, unstored, "unavailable at the last try")
        try:
            stats = self._store_unstored(unstored)
        except StoreUnavailable as exc:
            return self._wait_for_database(key, unstored, f"unavailable: {exc}")
        except Exception:  # noqa: BLE001 - never out of the event loop
            log.exception("storing the failed rows of an undeliverable item failed")
            return "storing its failed row(s) failed"
        return self._stored(stats)

    def _store_unstored(self, u: _Unstored) -> FlushStats:
        """Write the failed rows of a parked item; raises :class:`StoreUnavailable`."""
        if u.args is not None:
            return self._processor().dead_letter([(u.mid, u.args)], u.reason, 1)
        return self._processor().refuse(u.mid, u.body, u.reason)

    def _stored(self, stats: FlushStats) -> str:
        self._observe(stats, inference=False)
        self._drop_claims(stats)
        if stats.unwritable:
            return "the database refused even its minimal failed rows"
        return f"{stats.items} task(s) stored as failed"

    def _wait_for_database(self, key: bytes, u: _Unstored, why: str) -> str:
        """Keep ``u`` until the database answers; let the oldest go past the bounds. Gives
        what it did (for the transport's log line)."""
        if u.size > UNSTORED_MAX_BYTES:
            return (f"its failed row(s) not stored, the database is {why}; the item is too "
                    f"large to wait for it in memory: its tasks get no failed row")
        old = self._unstored.pop(key, None)  # the same raw item parked again: one entry
        self._unstored_bytes -= old.size if old is not None else 0
        self._unstored[key] = u
        self._unstored_bytes += u.size
        while len(self._unstored) > UNSTORED_MAX or self._unstored_bytes > UNSTORED_MAX_BYTES:
            _, gone = self._unstored.popitem(last=False)
            self._unstored_bytes -= gone.size
            self._unstored_let_go += 1
        if self._unstored_let_go and time.monotonic() - self._let_go_warned_at >= 60:
            self._let_go_warned_at = time.monotonic()
            log.error("%d parked item(s) let go without their failed rows: more wait for the "
                      "database than the worker keeps (%d items, %d MiB); their raw items stay "
                      "on the side lists", self._unstored_let_go, UNSTORED_MAX,
                      UNSTORED_MAX_BYTES >> 20)
            self._unstored_let_go = 0
        if self._retry_at is None:
            self._retry_at = time.monotonic() + self._retry_s
        return (f"its failed row(s) wait for the database ({why}), written once it answers "
                f"({len(self._unstored)} parked item(s) waiting)")

    def _retry_unstored(self) -> None:
        """Write the failed rows of the parked items that wait for the database, oldest first,
        at most :data:`UNSTORED_PER_TRY` a call (the rest at the next tick). One cheap query
        first: while the database stays unavailable, the next try comes later each time
        (:data:`UNSTORED_RETRY_S`). Each item's rows are written once: an item leaves the
        list when they are. Never raises."""
        if not self._unstored:
            self._retry_at, self._retry_s = None, UNSTORED_RETRY_S[0]
            return
        stored = tasks = refused = 0
        try:
            self._processor().store.run(ping, "cannot reach the results database")
            for _ in range(min(UNSTORED_PER_TRY, len(self._unstored))):
                key, u = next(iter(self._unstored.items()))
                try:
                    stats = self._store_unstored(u)
                except StoreUnavailable:
                    raise
                except Exception:  # noqa: BLE001 - one item must not hold up the others
                    log.exception("storing the failed rows of parked message %s failed; its "
                                  "tasks get none", printable(u.mid)[:200])
                    stats = FlushStats(unwritable={u.mid})
                del self._unstored[key]
                self._unstored_bytes -= u.size
                self._observe(stats, inference=False)
                self._drop_claims(stats)
                stored += 1
                tasks += stats.items
                refused += bool(stats.unwritable)
        except Exception as exc:  # noqa: BLE001 - never out of the event loop
            if isinstance(exc, StoreUnavailable):
                log.warning("the failed rows of %d parked item(s) still wait for the "
                            "database, next try in %.0f s: %s", len(self._unstored),
                            self._retry_s, exc)
            else:
                log.exception("retrying the failed rows of parked items failed; next try "
                              "in %.0f s", self._retry_s)
            self._retry_at = time.monotonic() + self._retry_s
            self._retry_s = min(self._retry_s * 2, UNSTORED_RETRY_S[1])
        else:
            self._retry_s = UNSTORED_RETRY_S[0]
            self._retry_at = time.monotonic() if self._unstored else None
        if stored:
            log.warning("the database answers again: failed rows of %d parked item(s) stored "
                        "(%d task(s)%s), %d still waiting", stored, tasks,
                        f"; {refused} item(s) refused even as minimal rows" if refused else "",
                        len(self._unstored))

    def flush(self, requests: Collection[Any]) -> None:
        """Process the buffered requests now; ack what committed, requeue the rest.

        First deliveries are processed together. A redelivered message (its
        worker died mid-flush, or its rows could not be written) is processed
        alone, and dead-lettered once it has been delivered more than
        ``max_attempts`` times. The first group to meet a database outage ends
        the flush: the groups not tried yet are requeued untried, uncounted
        (:meth:`_requeue_untried`), so an outage costs a flush one run of the
        commit's retries, however many groups it holds. Never raises.
        """
        self._buffered_tokens = 0
        self._answered = False
        reqs = list(requests)
        try:
            self._flush(reqs)
        except Exception as exc:  # noqa: BLE001 - the one rule: nothing leaves the flush
            if redis_full(exc):  # an outage of Redis's, not a bug: no traceback
                log.warning("flush of %d message(s) stopped: Redis is full (maxmemory) and "
                            "refuses writes (%s); requeueing them", len(reqs), exc)
            elif redis_unreachable(exc):  # a restart, say: nothing ran, nothing counted
                log.warning("flush of %d message(s) stopped: Redis cannot be reached (%s); "
                            "they come back once it answers", len(reqs), exc)
            else:
                log.exception("flush of %d message(s) failed unexpectedly; requeueing them "
                              "(each delivery counts towards dead-lettering)", len(reqs))
            count_requeued(self.metrics, exc, len(reqs))
            _reject(reqs, requeue=True)
        finally:
            self._flushing = []
        if self._held:
            self._keep_visible(self._held_requests())
        if self._answered and self._unstored:
            self._retry_unstored()  # the database answers: no need to wait for the next try
        self._flushed_at = time.monotonic()

    def _flush(self, reqs: list[Any]) -> None:
        new = []
        for r in reqs:
            s = SimpleRequest.from_request(r)
            if s.id in self._held:
                self._join(r, s.id)
            else:
                new.append((r, s))
        if not new:
            self._commit_group([], attempt=1)  # the backlog of long texts alone
            return
        counts = (self.deliveries.incr([s.id for _, s in new]) if self.deliveries is not None
                  else [1] * len(new))
        fresh = [(r, s) for (r, s), n in zip(new, counts, strict=True) if n == 1]
        again = [(r, s, n) for (r, s), n in zip(new, counts, strict=True) if n > 1]
        # A flush of several groups renews its deliveries not settled yet (and the held
        # ones) before each group: they wait one group at most unrenewed, not the flush.
        # Within a group, the processor renews them when due before each database
        # operation (:meth:`_renew_due`): one group's commit retries may be long.
        if fresh:
            self._flushing = [r for r, _ in fresh] + [r for r, _, _ in again]
            if again:
                self._keep_visible(self._flushing + self._held_requests())
            if not self._commit_group(fresh, attempt=1):
                self._requeue_untried(again)
                return
        for k, (r, s, n) in enumerate(again):
            if s.id in self._held:  # a copy of a delivery this flush took and holds
                self._join(r, s.id)
                if self.deliveries is not None:
                    try:
                        self.deliveries.undo([s.id])
                    except Exception as exc:  # noqa: BLE001 - the copy joined all the same
                        log.warning("could not take back the delivery count of message %s "
                                    "(it counts as one delivery): %s",
                                    printable(str(s.id))[:200], exc)
                continue
            self._flushing = [q for q, _, _ in again[k:]]
            self._keep_visible(self._flushing + self._held_requests())
            if not self._commit_group([(r, s)], attempt=n):
                self._requeue_untried(again[k + 1:])
                return

    def _join(self, request: Any, message_id: str) -> None:
        """A copy of a held delivery (the visibility sweep restored it while its long texts
        wait) joins its original: no new delivery, so neither counted nor dead-lettered
        (its worker did not die); both are acked, or requeued, together. Acking the copy
        alone would drop the original's record from Redis: they share a delivery tag."""
        log.warning("message %s came back while held for its long texts (restored by a "
                    "visibility sweep: a flush longer than the visibility timeout?); it "
                    "joins its original, not counted", printable(str(message_id))[:200])
        self._held[message_id].append(request)

    def _held_requests(self) -> list[Any]:
        return [r for rs in self._held.values() for r in rs]

    def _keep_visible(self, requests: list[Any]) -> None:
        """Renew these deliveries in kombu's unacked index (worker/kombu_redis.py), so no
        visibility sweep restores them while they wait: held for their long texts (every
        flush, and every tick), or buffered for the next flush (every tick). Never raises;
        a failure is logged at most once a minute."""
        if not requests:
            return
        messages = [getattr(r, "message", None) for r in requests]
        try:
            keep_visible(messages)
        except Exception as exc:  # noqa: BLE001 - a restored copy is processed again, at worst
            if time.monotonic() - self._renew_warned_at >= 60:
                self._renew_warned_at = time.monotonic()
                log.warning("could not renew %d buffered or held message(s) in the unacked "
                            "index (the visibility sweep may restore them): %s",
                            len(messages), exc)

    @property
    def tick_s(self) -> float:
        """Seconds between two :meth:`_tick`: at most a quarter of the visibility timeout."""
        return min(1.0, self.visibility_timeout_s / 4)

    def _tick(self) -> None:
        """The consumer timer's housekeeping between flushes, whatever ``max_wait_ms``.

        Every quarter of the visibility timeout, the buffered and held deliveries
        are renewed in the unacked index: a message that waits in the buffer (a
        flush timer as long as the timeout) or is held (flushes that far apart)
        is not restored by the sweep as a dead worker's, to come back as one more
        delivery of itself. When due, the parked items' failed rows that wait for
        the database are tried again. Never raises: it runs in the event loop.
        """
        try:
            self._renew_due()
            if self._retry_at is not None and time.monotonic() >= self._retry_at:
                self._retry_unstored()
        except Exception:  # noqa: BLE001 - never out of the event loop
            log.exception("the worker's periodic housekeeping failed")

    def _renew_due(self) -> None:
        """Renew every delivery this worker holds unacked (the running flush's not settled
        yet, the buffered, the held) once a quarter of the visibility timeout has passed
        since the last renewal.

        Run by :meth:`_tick` between flushes, and by the processor before each database
        operation of a flush, refusal or parked item (``FlushProcessor.keep_alive``): the
        event loop, and with it the tick, is blocked while the commit's retries wait out
        a silent database (each attempt up to its connect and statement timeouts), long
        enough for other workers' sweeps to restore the deliveries and bring them back
        counted. Never raises.
        """
        now = time.monotonic()
        if now - self._renewed_at < self.visibility_timeout_s / 4:
            return
        waiting = self._flushing + list(self._buffer.queue) + self._held_requests()
        if waiting:
            self._renewed_at = now
            self._keep_visible(waiting)

    def _commit_group(self, group: list[tuple[Any, SimpleRequest]], attempt: int) -> bool:
        """Process ``group`` (past ``max_attempts`` deliveries: dead-letter it); ack what
        committed, requeue what cannot be written, hold what waits for its long texts.
        False when the database is unavailable: then ``group`` and the held deliveries
        are requeued (:meth:`_requeue_for_outage`).

        No delivery of ``group`` is a copy of a held one: :meth:`_flush` joins each such
        copy to its original first (:meth:`_join`). Settled here, the copy would be acked
        (or requeued) alone, and with it the original's record: they share a delivery
        tag. Raised rather than risked: the flush then requeues its messages.
        """
        if any(s.id in self._held for _, s in group):
            raise RuntimeError("a copy of a held delivery reached _commit_group instead of "
                               "joining its original")
        payloads = [(s.id, s.args) for _, s in group]
        ids = [s.id for _, s in group]
        dead = attempt > self.max_attempts
        try:
            if dead:
                log.error("dead-lettering message %s after %d deliveries",
                          printable(str(ids[0]))[:200], attempt)
                stats = self._processor().dead_letter(
                    payloads, f"dead-lettered after {attempt} deliveries: the worker "
                    "processing this task died or could not store it each time", attempt)
                self._observe(stats, inference=False)
            else:
                stats = self._process(payloads, attempt)
        except StoreUnavailable as exc:
            self._requeue_for_outage(group, exc)
            return False
        except Exception:
            if not dead:
                raise
            log.exception("message %s dropped: dead-lettering it failed",
                          printable(str(ids[0]))[:200])
            stats = FlushStats(unwritable=set(ids))
        stuck = set() if dead else stats.unwritable
        count_dead_lettered(self.metrics, len(group) if dead else 0)
        if stuck:
            # Keep the delivery count: the next delivery runs alone, the last is dead-lettered.
            log.error("requeueing %d message(s) whose rows the database refuses", len(stuck))
            count_requeued(self.metrics, "refused", len(stuck))
            _reject([r for r, s in group if s.id in stuck], requeue=True)
        elif dead and stats.unwritable:
            log.error("message %s dropped: even its dead-letter rows cannot be stored",
                      printable(str(ids[0]))[:200])
        self._answered |= bool(stats.written or stats.skipped)  # the database answered
        # Long texts still in the backlog keep their messages held, whatever this group was.
        waiting = self._processor().held()
        if not dead:
            for r, s in group:
                if s.id in waiting and s.id not in stuck:
                    self._held.setdefault(s.id, []).append(r)
        # A dead-lettered delivery is acked, its failed rows stored, even when its id is in
        # the backlog: no request holds that id (checked above), so the long text there was
        # left by a delivery requeued since (its other rows unwritable, say); this one is
        # the only delivery left to settle.
        done = [(r, s) for r, s in group
                if s.id not in stuck and (dead or s.id not in waiting)]
        self._release(waiting, stuck)
        _ack([r for r, _ in done])
        self._forget([s.id for _, s in done])
        self._drop_claims(stats)
        return True

    def _drop_claims(self, stats: FlushStats) -> None:
        """Drop the HTTP API's id claims of the rows ``stats`` committed (never raises)."""
        if self.claims is not None:
            self.claims.drop(stats.stored_ids())

    def _forget(self, message_ids: list[str]) -> None:
        """Drop the delivery counts of messages acked for good. A Redis lost meanwhile (a
        restart after the commit) leaves them to expire on their own: the rows are stored
        and the messages acked, so the flush goes on (it used to stop there, its groups
        not run yet requeued with their delivery counted)."""
        if self.deliveries is None or not message_ids:
            return
        try:
            self.deliveries.forget(message_ids)
        except Exception as exc:  # noqa: BLE001 - a clean-up: the counters expire
            log.warning("could not drop the delivery counts of %d acked message(s) (they "
                        "expire on their own): %s", len(message_ids), exc)

    def _requeue_for_outage(self, group: list[tuple[Any, SimpleRequest]],
                            exc: StoreUnavailable) -> None:
        """The database is down: requeue ``group`` and every held delivery after a pause,
        their deliveries taken back (an outage is not the messages' fault). Taken back,
        not forgotten: the deliveries counted before this one still count, so a message
        that killed a worker before the outage (or is being dead-lettered) keeps its way
        to dead-lettering instead of starting again as a first delivery."""
        held = list(self._held.items())
        self._held.clear()
        held_requests = [r for _, rs in held for r in rs]
        n = len(group) + len(held_requests)
        self._processor().outage.note(log, "requeue", logging.ERROR,
                                      "database unavailable, requeueing %d message(s): %s",
                                      n, exc, cause=str(exc), flushes=1, messages=n)
        if self.deliveries is not None:
            try:
                self.deliveries.undo([s.id for _, s in group] + [mid for mid, _ in held])
            except Exception as err:  # noqa: BLE001 - requeued all the same
                log.warning("could not take back the delivery counts of %d message(s) (each "
                            "counts as one delivery): %s", len(group) + len(held), err)
        # Held until rejected: renewed with the flush's own deliveries during the pause.
        self._flushing = self._flushing + held_requests
        self._outage_pause()  # let the outage pass before a redelivery
        count_requeued(self.metrics, "database", n)
        _reject([r for r, _ in group] + held_requests, requeue=True)

    def _outage_pause(self) -> None:
        """The pause before a requeue for an outage: :attr:`requeue_pause_s`, doubled at
        each flush the outage requeued, up to :attr:`requeue_pause_max_s`. While the
        outage is known, flushes requeue unrun after one cheap query (worker/flush.py),
        so without a growing pause every worker would cycle the queue through Redis as
        fast as it can. A shutdown cuts it short (the messages go back at once); the
        deliveries this worker holds are renewed meanwhile when due."""
        proc = self._processor()
        n = min(max(proc.outage.flushes - 1, 0), 16)
        end = time.monotonic() + min(self.requeue_pause_s * 2 ** n, self.requeue_pause_max_s)
        while (left := end - time.monotonic()) > 0 and not proc.stopping():
            time.sleep(min(left, 0.1))
            self._renew_due()

    def _requeue_untried(self, rest: list[tuple[Any, SimpleRequest, int]]) -> None:
        """A group of this flush just met a database outage: ``rest``, its groups not tried
        yet, go back to the queue untried, their deliveries taken back (not counted: they
        were not tried). Tried in turn, each would meet the same outage and spend the
        commit's retries, the event loop blocked all along: nothing renews the flush's
        other deliveries meanwhile, and other workers' sweeps bring them back counted."""
        if not rest:
            return
        self._processor().outage.note(
            log, "requeue", logging.ERROR, "database unavailable, requeueing %d more "
            "message(s) of this flush untried, their deliveries not counted", len(rest),
            messages=len(rest))
        if self.deliveries is not None:
            try:
                self.deliveries.undo([s.id for _, s, _ in rest])
            except Exception as exc:  # noqa: BLE001 - requeued all the same
                log.warning("could not take back the delivery counts of %d message(s) (each "
                            "counts as one delivery): %s", len(rest), exc)
        count_requeued(self.metrics, "database", len(rest))
        _reject([r for r, _, _ in rest], requeue=True)

    def _release(self, waiting: set[str], stuck: set[str]) -> None:
        """Ack the held messages whose long texts are stored now (requeue the unwritable)."""
        ready = [mid for mid in self._held if mid not in waiting]
        if not ready:
            return
        requests = {mid: self._held.pop(mid) for mid in ready}
        count_requeued(self.metrics, "refused", len(stuck.intersection(requests)))
        _reject([r for mid, rs in requests.items() if mid in stuck for r in rs], requeue=True)
        acked = [mid for mid in ready if mid not in stuck]
        _ack([r for mid in acked for r in requests[mid]])
        self._forget(acked)

    def hand_back_held(self) -> None:
        """Warm shutdown: take back the delivery counts of the held messages.

        Called before the consumer's channel closes, which puts these
        unacked messages back on the queue. Their flushes ran to the end
        without killing the worker, so their next delivery must not count
        as a redelivery (after ``max_attempts`` rolling restarts it would be
        dead-lettered). One count per held message: a restored copy that
        joined its original was not counted (:meth:`_join`). A crash runs
        none of this.
        """
        held = list(self._held)
        self._held.clear()
        if not held:
            return
        count_requeued(self.metrics, "shutdown", len(held))
        log.info("warm shutdown: %d message(s) held for their long texts go back to the "
                 "queue, their deliveries not counted", len(held))
        if self.deliveries is None:
            return
        try:
            self.deliveries.undo(held)
        except Exception as exc:  # noqa: BLE001 - the shutdown goes on
            log.warning("could not take back the delivery counts of %d held message(s) (each "
                        "counts as one delivery): %s", len(held), exc)

    def run(self, requests: list[SimpleRequest]) -> None:
        """Eager path (``apply``): process without broker acks, long texts included."""
        self._process([(r.id, r.args) for r in requests])
        while self._processor().backlog:
            self._process([])

    def _processor(self) -> FlushProcessor:
        if self.processor is None:
            raise RuntimeError("AnalyzeTask has no processor: build it with register_tasks()")
        return self.processor

    def _process(self, payloads: list[tuple[str, Any]], attempt: int = 1) -> FlushStats:
        stats = self._processor().process(payloads, attempt)
        log.info(
            "flush: %d msg, %d items (%d failed, %d expired), %d batches, pad %.1f%%, "
            "infer %.3fs, commit %.3fs (%d commits); tokenize %.3fs, collate %.3fs, "
            "launch %.3fs, wait %.3fs, decode %.3fs",
            stats.messages, stats.items, stats.failed, stats.expired, stats.batches,
            100.0 * (stats.padded_tokens - stats.real_tokens) / max(stats.real_tokens, 1),
            stats.infer_s, stats.persist_s, stats.commits, stats.encode_s,
            stats.steps.collate_s, stats.steps.launch_s, stats.steps.wait_s, stats.steps.decode_s,
        )
        self._observe(stats)
        return stats

    def _observe(self, stats: FlushStats, *, inference: bool = True) -> None:
        """Count what ``stats`` stored in the metrics (``inference``: it ran the model's
        path; a refusal or a dead-letter stores rows without it)."""
        if self.metrics is None:
            return
        try:
            self.metrics.observe(stats, inference=inference)
        except Exception:  # noqa: BLE001 - metrics must not cost a flush
            log.exception("updating the metrics failed")


def _ack(requests: list[Any]) -> None:
    """Ack after commit; a lost broker connection only delays the ack.

    The rows are committed, so a message whose ack is lost comes back after
    the visibility timeout and finds its rows final: nothing is duplicated.
    """
    try:
        ack_all(requests)
    except Exception as exc:  # noqa: BLE001 - a Redis hiccup must not stop the worker
        log.warning("ack of %d message(s) failed (they will be redelivered and find their "
                    "rows stored): %s", len(requests), exc)


def _reject(requests: list[Any], *, requeue: bool) -> None:
    """Reject (``requeue``: put back at the head of its queue) every request now.

    Celery's ``Request.reject`` schedules the Redis transaction on the event loop, where
    an error reply is no connection error kombu swallows: a full noeviction Redis refusing
    the requeue (OOM) escaped the loop and the worker exited. Here, as :func:`ack_all`
    acks, the flush (on that loop's thread) rejects directly; a refused reject is logged
    once for the call, and the message is dropped from this worker's in-process record
    (:func:`worker.kombu_redis.forget`): it stays in the unacked index, which the
    visibility sweep restores once Redis takes writes again.
    """
    failed: list[BaseException] = []
    for r in requests:
        if getattr(r, "acknowledged", False):
            continue
        m = getattr(r, "message", None)
        try:
            if m is None or not hasattr(m, "reject"):
                r.reject(requeue=requeue)
                continue
            m.reject(requeue=requeue)
        except Exception as exc:  # noqa: BLE001 - the broker restores unacked messages
            failed.append(exc)
            forget(m)
        r.acknowledged = True
    if failed:
        log.warning("reject of %d message(s) failed (they come back after the visibility "
                    "timeout): %s", len(failed), failed[0])



class _HandBackHeld(bootsteps.StartStopStep):
    """Consumer step: at shutdown, :meth:`AnalyzeTask.hand_back_held`.

    It starts after the task consumer's step, so it shuts down before it:
    the counts are taken back before the channel closes and the messages
    are queued again, where another worker may take them at once.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def shutdown(self, parent: Any) -> None:
        task = parent.app.tasks.get(TASK_ANALYZE)
        if isinstance(task, AnalyzeTask):
            task.hand_back_held()


def register_tasks(app: Celery, processor: FlushProcessor, settings: Settings,
                   metrics: Any = None) -> AnalyzeTask:
    """Register the analysis task on ``app`` with the injected ``processor`` (and ``metrics``,
    a :class:`worker.metrics.WorkerMetrics`, when served), and the consumer step that hands
    its held messages back at a warm shutdown."""
    task_cls = type(
        "AnalyzeTask",
        (AnalyzeTask,),
        {
            "processor": processor,
            "flush_every": settings.flush_every,
            "flush_interval": settings.max_wait_ms / 1000.0,
            "flush_tokens": settings.token_budget * 4,
            "deliveries": DeliveryCounter(settings),
            "claims": ClaimDropper(settings),
            "max_attempts": settings.max_attempts,
            "visibility_timeout_s": settings.visibility_timeout_s,
            "metrics": metrics,
        },
    )
    task = app.register_task(task_cls())
    # The processor's database waits renew the deliveries the task holds (a silent database).
    processor.keep_alive = task._renew_due
    # A shutdown (warm or cold) does not wait out a database outage's retries
    # (worker/flush.py).
    processor.stopping = _stopping
    # Deadlines and submit times are stamped on the Redis server's clock, and so are the
    # rows' times; an offset to it, refreshed every few seconds, costs a flush no round
    # trip (contract/clock.py).
    processor.clock = ServerClock(redis_client(settings)).now
    app.steps["consumer"].add(_HandBackHeld)
    return task


def _stopping() -> bool:
    """A shutdown was asked for: Celery's signal handlers, which may run in the middle
    of a flush, set ``should_stop`` (warm: SIGTERM, SIGINT) or ``should_terminate``
    (cold: SIGQUIT, a second Ctrl-C, SIGTERM under ``REMAP_SIGTERM=SIGQUIT``), as
    Celery's own check reads them."""
    from celery.worker import state

    return any(flag is not None and flag is not False
               for flag in (state.should_stop, state.should_terminate))


def _header_problem(message: Any) -> str | None:
    """Why ``message``'s task id cannot key a delivery (Celery protocol 2 puts it in the
    headers; a sender may put anything there), or None."""
    headers = getattr(message, "headers", None)
    task_id = headers.get("id") if isinstance(headers, dict) else None
    if not isinstance(task_id, str) or not task_id:
        return f"the task id header is {type(task_id).__name__}, not a non-empty string"
    try:
        task_id.encode("utf-8")
    except UnicodeEncodeError:
        return "the task id header is not valid Unicode (a lone surrogate)"
    return None


def _settle(action: Callable[..., Any], **kw: Any) -> None:
    """Ack or reject a message; a broker error is logged (the message comes back)."""
    try:
        action(**kw)
    except Exception:  # noqa: BLE001
        log.exception("could not settle a refused message; the broker redelivers it")


def _drop_eta(message: Any) -> None:
    """Run a message whatever its Celery ``eta`` header says.

    bertstream's producers never set one (an item's own deadline is
    ``expires_at``). celery-batches would hold a message with an eta unacked
    in its pending queue, comparing a timestamp with a monotonic clock, so
    such a message would wait forever and hold a prefetch slot.
    """
    headers = getattr(message, "headers", None)
    if isinstance(headers, dict) and headers.get("eta") is not None:
        log.warning("ignoring the eta header of message %s: a task runs when it arrives",
                    printable(str(headers.get("id")))[:200])
        headers["eta"] = None
