"""Hops 2-4 for one flush: prepare, infer, persist, one record per item.

Takes the payloads of the buffered messages; gives, per message, whether
every item of it is now committed to the database. The caller (the Celery
task) acks exactly those messages and requeues the rest, so a message is
never acked before its rows are committed.

Every item travels the flush as one :class:`Entry`: wire item → tokens →
outcome → row. A text longer than the model's maximum travels as its
windows (worker/windows.py), planned into the batches like any other text;
its outcome is their combined score, and its row carries their scores.
Whatever goes wrong with one item (parsing, validation, the tokenizer, the
model, a row the database refuses) ends as that item's ``failed`` row; only
a database outage (:class:`StoreUnavailable`) leaves the flush, and then
nothing of the unwritten messages is acked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from contract.constants import (
    LONG_TEXTS_CHUNK,
    MALFORMED_PREFIX,
    STATUS_DONE,
    STATUS_EXPIRED,
    STATUS_FAILED,
)
from contract.errors import InvalidInput, StoreUnavailable
from contract.lang import detect_lang
from contract.messages import TaskItem, id_problem, item_from_wire, printable, storable
from contract.results import (
    ResultRecord,
    ResultStore,
    Upserted,
    WindowRecord,
    ping,
    utc_from_timestamp,
)
from contract.settings import Settings
from worker.batching import plan_batches
from worker.inference import InferTimings, infer_pipelined
from worker.runner import Encoded, Prediction, Runner
from worker.windows import Window, combine, split_windows

log = logging.getLogger(__name__)

#: Longest stored error reason; a reason quoting a huge value is cut.
MAX_REASON_CHARS = 2_000

_SAFE_MESSAGE_ID = re.compile(r"[A-Za-z0-9._:@-]{1,100}")


def derived_key(message_id: Any, n: int) -> str:
    """``malformed-<message id>-<n>``: the row key of item ``n`` of a message when the
    item has no id the store can hold.

    A message id that is long or holds odd characters (Celery task ids are
    whatever the sender put in the headers) is replaced by its SHA-256, so
    the key always fits the id column.
    """
    mid = message_id if isinstance(message_id, str) else repr(message_id)
    if not _SAFE_MESSAGE_ID.fullmatch(mid):
        mid = hashlib.sha256(mid.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return f"{MALFORMED_PREFIX}{mid}-{n}"


#: Seconds between two lines of one kind while a database outage lasts (after its first flush).
OUTAGE_LOG_EVERY_S = 60.0
#: Seconds without a failure after which an outage this worker never saw end (it wrote
#: nothing since: idle, its messages committed by others) is taken as over: the next
#: failure is a new outage, logged in full, its requeue pause starting again from 1 s.
OUTAGE_FORGET_S = 600.0

#: Per kind of line, what stands for the failures since its last line while an outage lasts
#: (%-style, with count, span, outage, flushes, messages and cause).
_OUTAGE_SUMMARIES = {
    "commit": "commit failed %(count)d more times in %(span).0f s, the database still "
              "unavailable; the latest: %(cause)s",
    "lookup": "cannot look up done ids %(count)d more times in %(span).0f s, every item run; "
              "the latest: %(cause)s",
    "requeue": "database still unavailable after %(outage).0f s: %(flushes)d flushes "
               "(%(messages)d messages) requeued since the last such line; the latest: "
               "%(cause)s",
}


@dataclass
class _Kind:
    """What one kind of outage line left unsaid since it was last logged."""

    logged_at: float
    count: int = 0
    flushes: int = 0
    messages: int = 0
    cause: str = ""


class OutageLog:
    """The log lines of a database outage: its first flush in full, then each kind of line
    (:data:`_OUTAGE_SUMMARIES`) at most once per :data:`OUTAGE_LOG_EVERY_S`, counting what
    happened since its last line, and one line when a write succeeds again.

    Each flush that meets an outage runs the commit's retries and requeues its messages,
    every few seconds for as long as it lasts; logged in full, they flood the log. The
    first flush shows the cause at once; a kind first met later is logged in full too.
    One per worker: its flushes, refusals and parked items run on one thread.
    """

    def __init__(self, every_s: float = OUTAGE_LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic,
                 forget_s: float = OUTAGE_FORGET_S) -> None:
        self.every_s = every_s
        self.clock = clock
        self.forget_s = forget_s
        #: When the outage began (None: none now), and whether its first flush is over.
        self.began: float | None = None
        #: When its latest failure was noted.
        self.noted_at = 0.0
        self._first = False
        self._kinds: dict[str, _Kind] = {}
        #: Flushes and messages requeued since the outage began.
        self.flushes = 0
        self.messages = 0

    def new_cycle(self) -> None:
        """A flush (or a refusal, or a parked item's rows) begins: the first flush of an
        outage, if one began, is over."""
        if self.began is not None:
            self._first = False

    def note(self, logger: logging.Logger, kind: str, level: int, msg: str, *args: Any,
             cause: str | None = None, flushes: int = 0, messages: int = 0) -> None:
        """Log ``msg % args`` (of a kind of :data:`_OUTAGE_SUMMARIES`) in full during the
        first flush of an outage or the first time its kind is met; else count it, and
        log what its kind counted once :attr:`every_s` passed since its last line.
        ``cause``: why (None: the cause of its kind's last line); ``flushes`` and
        ``messages``: what it requeued."""
        now = self.clock()
        if self.began is not None and now - self.noted_at >= self.forget_s:
            logger.warning("no database failure for %.0f s: the outage that began %.0f s ago "
                           "(%d flushes requeued) is taken as over, unseen by this worker, "
                           "which wrote nothing since; this failure starts another",
                           now - self.noted_at, now - self.began, self.flushes)
            self._reset()
        self.noted_at = now
        if self.began is None:
            self.began, self._first, self._kinds = now, True, {}
        self.flushes += flushes
        self.messages += messages
        k = self._kinds.get(kind)
        if self._first or k is None:
            self._kinds[kind] = _Kind(logged_at=now, cause=cause or "")
            logger.log(level, msg, *args)
            return
        k.count += 1
        k.flushes += flushes
        k.messages += messages
        k.cause = cause or k.cause
        if now - k.logged_at < self.every_s:
            return
        logger.log(level, _OUTAGE_SUMMARIES[kind],
                   {"count": k.count, "span": now - k.logged_at, "outage": now - self.began,
                    "flushes": k.flushes, "messages": k.messages, "cause": k.cause})
        self._kinds[kind] = _Kind(logged_at=now, cause=k.cause)

    def recovered(self, logger: logging.Logger) -> None:
        """A write succeeded: when an outage was logged, say it is over, how long it lasted
        and what it requeued."""
        if self.began is None:
            return
        logger.warning("database available again after %.0f s; %d flushes requeued meanwhile "
                       "(%d messages)", self.clock() - self.began, self.flushes, self.messages)
        self._reset()

    def _reset(self) -> None:
        """No outage now."""
        self.began, self._first, self._kinds = None, False, {}
        self.flushes = self.messages = 0


@dataclass(eq=False)  # compared and hashed by identity: one per item
class Entry:
    """One item of a flush, from its wire form to its row.

    ``key`` is the row id: the item's own id, or :func:`derived_key` when it
    has none the store can hold. ``item`` is set once the wire item
    validated; ``encoded`` once tokenized; ``outcome`` (a prediction) or
    ``error`` once settled. ``status`` says which row it becomes. A long
    text scored in windows has ``windows`` (its outcome is their combined
    score) and ``tokens``, the tokens of the whole text.
    """

    message_id: str
    n: int
    key: str
    item: TaskItem | None = None
    raw: Any = None
    encoded: Encoded | None = None
    outcome: Prediction | None = None
    status: str | None = None
    error: str | None = None
    batch_size: int | None = None
    written: bool = False
    unwritable: bool = False
    windows: list[Window] | None = None
    tokens: int | None = None
    #: The delivery count of its message (a long text may be stored a flush later).
    attempt: int = 1

    @classmethod
    def parse(cls, message_id: str, n: int, obj: Any, settings: Settings,
              now: float | None = None) -> Entry:
        """Hop 2a for one wire item: a validated item, or a failure under a storable key
        (``now``: as :func:`parse_message`)."""
        try:
            item = item_from_wire(obj, settings, now)
        except InvalidInput as exc:
            key = exc.item_id if exc.item_id is not None else derived_key(message_id, n)
            return cls(message_id, n, key, raw=obj).fail(exc.reason)
        except Exception as exc:  # noqa: BLE001 - a validation bug must not cost the flush
            log.exception("unexpected error parsing item %d of message %s", n,
                          printable(str(message_id))[:200])
            return cls(message_id, n, derived_key(message_id, n), raw=obj).fail(
                f"internal error parsing this item: {type(exc).__name__}: {exc}")
        return cls(message_id, n, item.id, item=item)

    @property
    def pending(self) -> bool:
        """Still on its way to the model (valid, not settled)."""
        return self.status is None

    def fail(self, reason: str) -> Entry:
        """Settle as ``failed`` with ``reason``."""
        self.status, self.error, self.outcome = STATUS_FAILED, _reason(reason), None
        return self

    def expire(self, now: float) -> None:
        """Settle as ``expired``: the deadline passed before the model ran it."""
        assert self.item is not None and self.item.expires_at is not None
        late = now - self.item.expires_at
        self.status = STATUS_EXPIRED
        self.error = f"expired {late:.3f} s before it reached the model"

    def settle(self, out: Prediction | str) -> None:
        """Hop 3's result: a prediction, or the reason the model failed on it."""
        if not self.pending:
            return
        if isinstance(out, Prediction):
            self.status, self.outcome = STATUS_DONE, out
        else:
            self.fail(out)

    def record(self, base: dict[str, Any], store_text: bool, max_text: int) -> ResultRecord:
        """Hop 4's row for this entry (``base``: model, worker, times, attempts)."""
        assert self.status is not None
        it = self.item
        if it is None:
            text = self.raw.get("text") if isinstance(self.raw, dict) else None
            source = self.raw.get("source") if isinstance(self.raw, dict) else None
            text = text if isinstance(text, str) else None
            safe = text if text is not None and storable(text) and len(text) <= max_text else None
            return ResultRecord(
                id=self.key, status=self.status, error=self.error,
                source=source if id_problem(source) is None else None,
                text=safe if store_text else None, lang=detect_lang(safe) if safe else None,
                text_sha256=_sha256(safe or ""), text_chars=len(text) if text else 0, **base)
        enc = self.encoded
        pred = self.outcome
        truncated = enc.truncated if enc else False
        tokens = len(enc.ids) if enc else None
        if self.windows:
            truncated = any(w.encoded.truncated for w in self.windows)
            tokens = self.tokens
        return ResultRecord(
            id=self.key, source=it.source, meta=it.meta, status=self.status, error=self.error,
            text=it.text if store_text else None, text_sha256=_sha256(it.text),
            lang=detect_lang(it.text),
            text_chars=len(it.text), truncated=truncated, tokens=tokens,
            windows=len(self.windows) if self.windows else None, batch_size=self.batch_size,
            submitted_at=utc_from_timestamp(it.submitted_at),
            label=pred.label if pred else None, score=pred.score if pred else None,
            scores=pred.scores if pred else None, **base)

    def window_records(self, model: str) -> list[WindowRecord]:
        """The rows of this entry's windows: a ``done`` text scored in windows only."""
        if not self.windows or self.status != STATUS_DONE:
            return []
        return [WindowRecord(id=self.key, model=model, window=w.n, start_char=w.start,
                             end_char=w.end, tokens=w.tokens, label=w.outcome.label,
                             score=w.outcome.score, scores=w.outcome.scores)
                for w in self.windows if isinstance(w.outcome, Prediction)]

    def fallback(self, reason: str, base: dict[str, Any], own_key: bool) -> ResultRecord:
        """A minimal ``failed`` row for an entry whose row the database refused.

        No text, meta or source (one of them may be what was refused); under
        the entry's own key, or under :func:`derived_key` when the key itself
        may be the problem.
        """
        if not own_key:
            self.key = derived_key(self.message_id, self.n)
        self.fail(f"the database refused this row ({reason}); stored without its text")
        text = self.item.text if self.item is not None else ""
        return ResultRecord(id=self.key, status=STATUS_FAILED, error=self.error,
                            text_sha256=_sha256(text), text_chars=len(text), **base)


def parse_message(message_id: str, args: Any, settings: Settings,
                  now: float | None = None) -> list[Entry]:
    """Hop 2a: one message's args (``[[item, ...]]``) to entries, never raising.

    A malformed message still yields one failed entry under
    ``malformed-<message id>-0``, so the problem is stored and visible
    instead of silently dropped. ``now``: the time an item without a
    ``submitted_at`` gets (None: this host's clock).
    """
    items = args[0] if isinstance(args, (list, tuple)) and len(args) == 1 else None
    if not isinstance(items, list) or not items:
        return [Entry(message_id, 0, derived_key(message_id, 0), raw=args).fail(
            "malformed message: expected args [[item, ...]]")]
    return [Entry.parse(message_id, n, obj, settings, now) for n, obj in enumerate(items)]


@dataclass
class FlushStats:
    """What one flush did (logged, and read by the benchmark)."""

    messages: int = 0
    items: int = 0
    failed: int = 0
    batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    infer_s: float = 0.0
    #: Of infer_s: tokenizing, and the steps of inference (InferTimings).
    encode_s: float = 0.0
    steps: InferTimings = field(default_factory=InferTimings)
    persist_s: float = 0.0
    commits: int = 0
    expired: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    #: Padded tokens of each model batch, in the order they ran.
    batch_tokens: list[int] = field(default_factory=list)
    #: Per (id, model) written, its (status, source, submitted_at, committed_at) as last
    #: written: a row written twice in one flush (a failed copy committed early, then
    #: replaced by a done one) is one row, with its final status.
    written: dict[tuple[str, str], tuple[str, str | None, float | None, float]] = field(
        default_factory=dict)
    #: When the flush began (UNIX time, on the clock rows are stamped with, as
    #: submitted_at is): queue wait = this - submitted_at.
    began: float = 0.0
    #: Rows refused by the database and stored as minimal failed rows instead.
    refused: int = 0
    #: Messages with an item that could not be stored at all: not acked.
    unwritable: set[str] = field(default_factory=set)
    #: Items whose id already had a done row: not run (a done row is final).
    skipped: int = 0
    #: Their ids.
    skipped_ids: list[str] = field(default_factory=list)

    def stored_ids(self) -> set[str]:
        """The ids whose rows are stored now: written by this flush, or found done."""
        return {key[0] for key in self.written} | set(self.skipped_ids)

    @property
    def rows(self) -> list[tuple[str, str | None, float | None, float]]:
        """One (status, source, submitted_at, committed_at) per row written (the metrics)."""
        return list(self.written.values())


#: A partial commit is made when the rest of the flush is expected to take at
#: least this long: finished rows should not wait for a long text's batch.
EARLY_COMMIT_MIN_WAIT_S = 0.1
#: ... and at most once per this many seconds (the first one at any time).
EARLY_COMMIT_EVERY_S = 0.25


class _EarlyCommits:
    """When to commit the rows a flush has finished before the flush ends.

    Batches run shortest first, so in a flush of short posts and one long
    text the posts are done long before the long text. On 2 CPU cores a
    500-token text takes 200-350 ms alone; without a partial commit every
    post of its flush waits for it. The rest of the flush is estimated from
    the padded tokens still to run at the rate measured so far in this
    flush: on a GPU a flush usually ends within 100 ms and commits once.
    Acks still wait for the end of the flush (a redelivery after a partial
    commit finds done rows, which are final: no duplicates).
    """

    def __init__(self, cost: Sequence[int], t0: float) -> None:
        """``cost``: padded tokens of each batch, in the order they run."""
        self._done = list(accumulate(cost))
        total = self._done[-1] if cost else 0
        self._left = [total - d for d in self._done]
        self._t0 = t0
        self._last: float | None = None

    def due(self, k: int) -> bool:
        """True when the rows finished up to batch ``k`` should be committed now."""
        left = self._left[k]
        if not left:
            return False  # the final commit follows at once
        now = time.perf_counter()
        if self._last is not None and now - self._last < EARLY_COMMIT_EVERY_S:
            return False
        per_token = (now - self._t0) / max(self._done[k], 1)
        return left * per_token >= EARLY_COMMIT_MIN_WAIT_S

    def committed(self) -> None:
        self._last = time.perf_counter()


@dataclass
class _Unit:
    """One row of a model batch: a whole text, or one window of a long text."""

    entry: Entry
    window: Window | None = None

    @property
    def encoded(self) -> Encoded:
        enc = self.window.encoded if self.window is not None else self.entry.encoded
        assert enc is not None
        return enc

    def settle(self, out: Prediction | str, neutral_below: float) -> None:
        """Record the model's outcome; a long text settles once all its windows have one."""
        e = self.entry
        if self.window is None:
            e.settle(out)
            return
        self.window.outcome = out
        if e.pending and all(w.outcome is not None for w in e.windows or ()):
            e.settle(combine(e.windows or [], neutral_below))


class FlushProcessor:
    """Runs prepare → infer → persist for a list of message payloads.

    Built once per worker process with its runner and store (injected).
    With ``hold_windows`` (the Celery task), a flush scores the windows of
    long texts that fit ``settings.window_slice_ms`` at the speed measured
    over the last flushes (at least one); the long texts with windows left
    wait in :attr:`backlog` for the next flush, and their messages are
    reported by :meth:`held` (not to be acked yet). Without it every window
    is scored in the flush that received its text.
    """

    def __init__(
        self, runner: Runner, store: ResultStore, settings: Settings, worker_name: str = "",
        *, hold_windows: bool = False,
    ) -> None:
        self.runner = runner
        self.store = store
        self.settings = settings
        self.worker_name = worker_name
        #: The model column of this worker's rows: a named model's name, else the model's own.
        self.model_key = settings.model_name or runner.name
        self.hold_windows = hold_windows
        self.last = FlushStats()
        #: Long texts whose windows are not all scored yet, oldest first.
        self.backlog: list[Entry] = []
        #: Seconds per padded token of inference, averaged over recent flushes
        #: (None until a flush ran the model).
        self.token_cost: float | None = None
        #: Called before each database operation that may wait (the lookup of done ids,
        #: each commit attempt): the task renews the deliveries it holds when due, so no
        #: visibility sweep restores them while a silent database runs the commit's
        #: retries out (worker/tasks.py). None: nothing to renew.
        self.keep_alive: Callable[[], None] | None = None
        #: True once the worker was asked to stop (warm or cold): a database operation that
        #: meets an outage is then not retried, so the shutdown does not wait out five
        #: attempts (each up to the database timeouts, against a silent server) past the
        #: grace period and its SIGKILL; the flush's messages go back to the queue at once
        #: instead, uncounted (worker/tasks.py).
        self.stopping: Callable[[], bool] = lambda: False
        #: The clock task deadlines are compared with and rows are stamped with (started,
        #: finished, and submitted for an item that came without): the Redis server's, set
        #: by the task (worker/tasks.py), as producers stamp submit times and deadlines on
        #: it; this host's until then. Read once per flush and once per commit.
        self.clock: Callable[[], float] = lambda: time.time()
        #: The log lines of a database outage, the task's included (worker/tasks.py).
        self.outage = OutageLog()

    def held(self) -> set[str]:
        """Ids of the messages with a long text still in the backlog: not to be acked yet."""
        return {e.message_id for e in self.backlog}

    def process(self, payloads: Sequence[tuple[str, Any]], attempt: int = 1) -> FlushStats:
        """Process ``(message_id, args)`` pairs and windows of the backlog; gives what the
        flush did.

        ``attempt`` is the delivery count of these messages, stored on new
        rows. Every item ends as exactly one row (``done``, ``failed`` or
        ``expired``), except the items of ``stats.unwritable`` messages, which
        the database refused even as minimal rows: those messages must not
        be acked; and long texts left in the backlog (:meth:`held`), stored
        by a later flush. Raises :class:`StoreUnavailable` when the database
        stays unreachable: the rows not yet committed are not, nothing may be
        acked, and the backlog is dropped; while an outage requeued flushes, before
        the model runs if the database still does not answer (:meth:`_check_database`).
        """
        self.outage.new_cycle()
        if self.outage.flushes:
            self._check_database()
        now = self.clock()  # the clock deadlines and row times are on: once per flush
        started = utc_from_timestamp(now)
        stats = FlushStats(messages=len(payloads), began=now)
        # A long text already in the backlog (its message's copy, restored by the visibility
        # sweep while the original is held) is in progress: not queued a second time.
        in_progress = {e.key for e in self.backlog}
        entries = [e for mid, args in payloads
                   for e in parse_message(mid, args, self.settings, now)
                   if e.key not in in_progress]
        for e in entries:
            e.attempt = attempt
            if e.item is not None and e.item.expired(now):
                e.expire(now)
        try:
            stats.skipped, stats.skipped_ids = self._skip_done(entries)
        except StoreUnavailable:
            self.backlog = []
            raise
        t0 = time.perf_counter()
        live = self._encode([e for e in entries if e.pending])
        stats.encode_s = time.perf_counter() - t0
        waiting = self.backlog + [e for e in live if e.windows]
        units = self._units(live)
        active = list(dict.fromkeys([u.entry for u in units] + live))
        encoded = [u.encoded for u in units]
        batches = self._plan(units, stats)
        # the rate is measured from here: tokenizing and planning are not per batch
        early = _EarlyCommits(stats.batch_tokens, time.perf_counter())
        neutral = self.settings.neutral_below

        def on_batch(k: int, done: dict[int, Prediction | str]) -> None:
            if not early.due(k):
                return
            for r, out in done.items():
                units[r].settle(out, neutral)
            ready = [e for e in active if not e.pending and not e.written]
            if ready:
                self._persist(ready, started, attempt, stats)
                early.committed()

        try:
            for r, out in infer_pipelined(self.runner, encoded, batches, on_batch,
                                          timings=stats.steps).items():
                units[r].settle(out, neutral)
            stats.infer_s = time.perf_counter() - t0 - stats.persist_s
            self._learn_speed(stats)
            self._finish(entries, active, waiting, started, attempt, stats)
        except StoreUnavailable:
            self.backlog = []
            raise
        self.last = stats
        return stats

    def _plan(self, units: list[_Unit], stats: FlushStats) -> list[list[int]]:
        """Hop 2c: the units in token-budget batches (worker/batching.py), with their stats."""
        lengths = [len(u.encoded.ids) for u in units]
        batches = plan_batches(lengths, token_budget=self.settings.token_budget,
                               max_batch_size=self.settings.max_batch_size,
                               max_padding=self.settings.max_padding)
        # padded tokens of each batch: the flush's stats and the early-commit estimate
        cost = [len(rows) * max(lengths[r] for r in rows) for rows in batches]
        stats.batches, stats.padded_tokens = len(batches), sum(cost)
        stats.batch_tokens = cost
        for rows in batches:
            stats.batch_sizes.append(len(rows))
            stats.real_tokens += sum(lengths[r] for r in rows)
            for r in rows:
                e = units[r].entry
                e.batch_size = max(e.batch_size or 0, len(rows))
        return batches

    def _finish(self, entries: list[Entry], active: list[Entry], long: list[Entry],
                started: Any, attempt: int, stats: FlushStats) -> None:
        """Keep the long texts with windows left in the backlog; store everything settled.

        ``long``: the backlog at the start of the flush and the flush's new long texts.
        """
        self.backlog = [e for e in long
                        if e.pending and any(w.outcome is None for w in e.windows or ())]
        waiting = set(self.backlog)
        for e in entries:
            if e.pending and e not in waiting:
                # the model gave nothing for it: must not happen, must not vanish
                e.fail("internal error: the model returned no result for this text")
        stats.items = len(entries)
        stats.failed = sum(e.status == STATUS_FAILED for e in entries)
        stats.expired = sum(e.status == STATUS_EXPIRED for e in entries)
        finished = [e for e in dict.fromkeys(entries + active) if not e.written and not e.pending]
        self._persist(finished, started, attempt, stats)

    def _learn_speed(self, stats: FlushStats) -> None:
        """Update :attr:`token_cost` from this flush's inference time."""
        if stats.padded_tokens:
            cost = (stats.infer_s - stats.encode_s) / stats.padded_tokens
            old = self.token_cost
            self.token_cost = cost if old is None else 0.7 * old + 0.3 * cost

    def _units(self, live: list[Entry]) -> list[_Unit]:
        """The rows for the model: every whole text of ``live``, and the windows of long
        texts (the backlog's first, oldest first) that fit the flush's slice of time."""
        units = [_Unit(e) for e in live if not e.windows]
        slice_s = self.settings.window_slice_ms / 1000 if self.hold_windows else 0.0
        spent, taken = 0.0, 0
        for e in self.backlog + [e for e in live if e.windows]:
            for w in e.windows or ():
                if w.outcome is not None:
                    continue
                cost = w.tokens * self.token_cost if self.token_cost is not None else None
                if slice_s and taken and (cost is None or spent + cost > slice_s):
                    return units
                units.append(_Unit(e, w))
                spent += cost or 0.0
                taken += 1
        return units

    def dead_letter(self, payloads: Sequence[tuple[str, Any]], reason: str,
                    attempt: int) -> FlushStats:
        """Store every item of ``payloads`` as ``failed`` with ``reason``, without the model.

        For messages that were delivered too many times (their worker died
        each time, or their rows could not be written). Raises
        :class:`StoreUnavailable` like :meth:`process`.
        """
        self.outage.new_cycle()
        now = self.clock()
        stats = FlushStats(messages=len(payloads), began=now)
        entries = [e for mid, args in payloads
                   for e in parse_message(mid, args, self.settings, now)]
        for e in entries:
            e.attempt = attempt
            if e.pending:
                e.fail(reason)
        stats.items = stats.failed = len(entries)
        self._persist(entries, utc_from_timestamp(now), attempt, stats)
        return stats

    def refuse(self, message_id: Any, raw: Any, reason: str) -> FlushStats:
        """Store one ``failed`` row with ``reason`` for a message that is no task request
        at all (its body or headers are not Celery's), under :func:`derived_key`.

        Raises :class:`StoreUnavailable` like :meth:`process`.
        """
        self.outage.new_cycle()
        now = self.clock()
        stats = FlushStats(messages=1, items=1, failed=1, began=now)
        entry = Entry(str(message_id), 0, derived_key(message_id, 0), raw=raw).fail(reason)
        self._persist([entry], utc_from_timestamp(now), 1, stats)
        return stats

    def _check_database(self) -> None:
        """While an outage requeued flushes (:attr:`OutageLog.flushes`), one cheap query
        before the model runs: a database still unavailable raises
        :class:`StoreUnavailable` at once, so the task requeues the messages unrun instead
        of scoring texts it cannot store (every worker, every few seconds, for as long as
        the outage lasts). It waits out the database timeouts at most; once it answers,
        the flush runs as any other. The backlog goes, as on any outage.
        """
        try:
            self._keep_alive()
            self.store.run(ping, "cannot reach the results database (checked before "
                                  "running the model)")
        except StoreUnavailable:
            self.backlog = []
            raise

    def _skip_done(self, entries: list[Entry]) -> tuple[int, list[str]]:
        """Settle the pending entries that already have a ``done`` row of this model, unrun.

        A done row is final (the upsert would keep it), so running the model
        again would be wasted: a redelivered message, or a caller id sent
        again (with the same text, or a different one the producer should
        have refused). They count as written: their message may be acked.
        One indexed query per flush. Every copy of a done id is settled (two
        copies in one flush: neither runs). Gives the number of entries settled, and
        their ids.
        """
        pending: dict[str, list[Entry]] = {}
        for e in entries:
            if e.pending:
                pending.setdefault(e.key, []).append(e)
        if not pending:
            return 0, []
        try:
            self._keep_alive()
            done = self.store.done_ids(list(pending), model=self.model_key)
        except StoreUnavailable as exc:
            if self._give_up(exc):
                raise
            # Only a saving: run them all; the commit's retries deal with the outage.
            self.outage.note(log, "lookup", logging.WARNING,
                             "cannot look up done ids, running every item: %s", exc,
                             cause=str(exc))
            return 0, []
        skipped = 0
        for key in done:
            for e in pending[key]:
                e.status, e.written = STATUS_DONE, True
                skipped += 1
        if done:
            log.info("%d item(s) already done: not run again", skipped)
            try:
                # A worker killed between its commit and settling the latest flags
                # (PostgreSQL settles after the commit) left them to this redelivery.
                self._keep_alive()
                self.store.settle_latest(done)
            except StoreUnavailable as exc:
                log.warning("cannot settle the latest flags of done items: %s", exc)
        return skipped, list(done)

    def _encode(self, entries: list[Entry]) -> list[Entry]:
        """Hop 2b: tokenize; an item the tokenizer rejects fails alone. Gives the encoded."""
        try:
            for e, enc in zip(entries, self.runner.encode([e.item.text for e in entries]),  # type: ignore[union-attr]
                              strict=True):
                e.encoded = enc
        except Exception:  # noqa: BLE001 - isolate the text the tokenizer cannot take
            for e in entries:
                try:
                    e.encoded = self.runner.encode([e.item.text])[0]  # type: ignore[union-attr]
                except Exception as exc:  # noqa: BLE001
                    e.encoded = None
                    e.fail(f"tokenizer error: {type(exc).__name__}: {exc}")
        special = getattr(self.runner, "special_tokens", None)
        for e in entries:
            if (e.encoded is not None and e.pending and isinstance(special, int)
                    and len(e.encoded.ids) <= special):
                # the tokenizer dropped every character: the model would score an empty
                # text (its special tokens alone) with a label that means nothing
                e.fail("text has no content tokens: the tokenizer drops every character "
                       "of it")
        live = [e for e in entries if e.encoded is not None and e.pending]
        if self.settings.long_texts == LONG_TEXTS_CHUNK and hasattr(self.runner, "offsets"):
            for e in live:
                if e.encoded is not None and e.encoded.truncated:
                    self._split(e)
        return [e for e in live if e.pending]

    def _split(self, e: Entry) -> None:
        """Hop 2b for a long text: its windows; a text the tokenizer cannot split fails alone."""
        text = e.item.text  # type: ignore[union-attr]
        try:
            offsets = self.runner.offsets(text)
            e.windows = split_windows(self.runner, text, offsets)
            e.tokens = len(offsets) + self.runner.special_tokens
        except Exception as exc:  # noqa: BLE001
            e.windows = None
            e.fail(f"tokenizer error splitting a long text: {type(exc).__name__}: {exc}")

    def _persist(self, entries: list[Entry], started: dt.datetime, attempt: int,
                 stats: FlushStats) -> None:
        """Hop 4: commit the rows of ``entries``; marks them written or unwritable.

        A row the database refuses is written again as a minimal failed row
        under the entry's own key, then under a derived key; an entry refused
        even so is unwritable (its message is not acked). ``finished_at`` is read off
        :attr:`clock`, as ``started`` was, and is never before it (an offset first
        read, or read again after a step of this host's clock, between the two).
        """
        t1 = time.perf_counter()
        finished = max(utc_from_timestamp(self.clock()), started)
        # A named model's rows carry its name; the default model's, its own.
        base = {"model": self.model_key,
                "model_revision": self.runner.revision,
                "started_at": started, "finished_at": finished, "worker": self.worker_name,
                "attempts": attempt}
        rows: dict[int, ResultRecord] = {}
        # Per (id, model), the entry whose row the store keeps, by upsert's rule (the first
        # done row, else the last one): only its windows are written.
        kept: dict[tuple[str, str], Entry] = {}
        windows: dict[tuple[str, str], list[WindowRecord]] = {}
        for e in entries:
            own = base if e.attempt == attempt else {**base, "attempts": e.attempt}
            try:
                row = e.record(own, self.settings.store_text, self.settings.max_text_chars)
                found = e.window_records(row.model)
            except Exception as exc:  # noqa: BLE001 - a row that cannot be built
                row = e.fallback(f"{type(exc).__name__}: {exc}", own,
                                 own_key=id_problem(e.key) is None)
                found = []
            rows[id(e)] = row
            key = _upsert_key(row)
            first = kept.get(key)
            if first is None or rows[id(first)].status != STATUS_DONE:
                kept[key] = e
                windows.pop(key, None)
                if found:
                    windows[key] = found
        by_row = {id(rows[id(e)]): e for e in entries}
        refused = self._commit(list(rows.values()), windows)
        # the rows the store wrote: not a copy it dropped, not one a done row kept out
        written = list(refused.written)
        for own_key in (True, False):
            if not refused:
                break
            retry = []
            for r in refused:
                e = by_row.pop(id(r.record))
                stats.refused += own_key
                log.warning("row %r refused by the database: %s", printable(e.key)[:200],
                            r.reason)
                own = base if e.attempt == attempt else {**base, "attempts": e.attempt}
                row = e.fallback(r.reason, own, own_key and id_problem(e.key) is None)
                by_row[id(row)] = e
                retry.append(row)
            refused = self._commit(retry)
            written += refused.written
        for r in refused:
            e = by_row[id(r.record)]
            e.unwritable = True
            stats.unwritable.add(e.message_id)
            log.error("item %d of message %s cannot be stored at all: %s",
                      e.n, printable(str(e.message_id))[:200], r.reason)
        committed = self.clock()  # end to end = this - submitted_at: one clock
        for e in entries:
            # a copy the store dropped for another of its id is settled all the same
            e.written = not e.unwritable
        for row in written:
            item = by_row[id(row)].item
            stats.written[_upsert_key(row)] = (row.status, item.source if item else None,
                                               item.submitted_at if item else None, committed)
        stats.persist_s += time.perf_counter() - t1
        stats.commits += 1

    def _commit(self, records: list[ResultRecord],
                windows: dict[tuple[str, str], list[WindowRecord]] | None = None) -> Upserted:
        """One write, retried with backoff while the database is down; gives the refused
        rows (a list whose ``written`` holds the rows written).

        Each attempt may wait out the database's timeouts (a silent server: the
        connect timeout, the statement guard), so :attr:`keep_alive` runs before
        each: the retries of one write can outlast the visibility timeout.
        """
        delay = 0.2
        for attempt in range(1, 6):
            try:
                self._keep_alive()
                written = self.store.upsert(records, windows)
            except StoreUnavailable as exc:
                if attempt == 5 or self._give_up(exc):
                    raise
                self.outage.note(log, "commit", logging.WARNING,
                                 "commit failed (attempt %d/5), retrying in %.1fs: %s",
                                 attempt, delay, exc, cause=str(exc))
                time.sleep(delay)  # a real outage: back off instead of spinning
                delay = min(delay * 2, 5.0)
            else:
                self.outage.recovered(log)
                return written
        raise AssertionError("unreachable")  # pragma: no cover

    def _give_up(self, exc: StoreUnavailable) -> bool:
        """True (said in the log) when the worker is stopping: no retry of ``exc``'s outage."""
        if not self.stopping():
            return False
        log.warning("stopping: the database is unavailable (%s); not retrying, this "
                    "flush's messages go back to the queue", exc)
        return True

    def _keep_alive(self) -> None:
        """:attr:`keep_alive`, if any; a failure is logged, never raised (the write goes on)."""
        if self.keep_alive is None:
            return
        try:
            self.keep_alive()
        except Exception:  # noqa: BLE001 - a renewal must not cost the flush
            log.exception("renewing the deliveries of a flush failed")



def _upsert_key(row: ResultRecord) -> tuple[str, str]:
    """The key ``ResultStore.upsert`` tells two records of one batch apart by."""
    return (row.id if isinstance(row.id, str) else repr(row.id),
            row.model if isinstance(row.model, str) else repr(row.model))


def _reason(text: str) -> str:
    """A reason fit to store and print: storable, escaped, bounded."""
    clean = printable(text)
    return clean if len(clean) <= MAX_REASON_CHARS else clean[: MAX_REASON_CHARS - 1] + "…"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
