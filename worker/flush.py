"""Hops 2-4 for one flush: prepare, infer, persist.

Takes the payloads of the buffered messages; gives, per message, whether
every item of it is now committed to the database. The caller (the Celery
task) acks exactly those messages and requeues the rest, so a message is
never acked before its rows are committed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from contract.constants import STATUS_DONE, STATUS_FAILED
from contract.errors import InvalidInput, StoreUnavailable
from contract.messages import TaskItem, item_from_wire
from contract.results import ResultRecord, ResultStore, utc_from_timestamp, utcnow
from contract.settings import Settings
from worker.batching import plan_batches
from worker.inference import InferTimings, infer_pipelined
from worker.runner import Encoded, Prediction, Runner

log = logging.getLogger(__name__)


@dataclass
class Failure:
    """An item that failed validation before reaching the model."""

    id: str
    reason: str
    text: Any = None
    source: str | None = None
    submitted_at: float | None = None


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
    batch_sizes: list[int] = field(default_factory=list)


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
class _Parsed:
    items: list[TaskItem] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def parse_payload(payload: Any, message_id: str, settings: Settings) -> _Parsed:
    """Hop 2a: one message's args to valid items and failures.

    A malformed message (args not ``[[item, …]]``) or an item without a
    usable id still yields a failure row, keyed ``malformed-<message id>-<n>``,
    so the problem is stored and visible instead of silently dropped.
    """
    out = _Parsed()
    items = payload[0] if isinstance(payload, (list, tuple)) and len(payload) == 1 else None
    if not isinstance(items, list) or not items:
        out.failures.append(Failure(f"malformed-{message_id}-0",
                                    "malformed message: expected args [[item, ...]]"))
        return out
    for n, obj in enumerate(items):
        try:
            out.items.append(item_from_wire(obj, settings))
        except InvalidInput as exc:
            fid = exc.item_id or f"malformed-{message_id}-{n}"
            text = obj.get("text") if isinstance(obj, dict) else None
            source = obj.get("source") if isinstance(obj, dict) else None
            out.failures.append(Failure(
                fid, exc.reason, text=text,
                source=source if isinstance(source, str) and len(source) <= settings.max_id_chars else None,
            ))
    return out


class FlushProcessor:
    """Runs prepare → infer → persist for a list of message payloads.

    Built once per worker process with its runner and store (injected).
    """

    def __init__(
        self, runner: Runner, store: ResultStore, settings: Settings, worker_name: str = ""
    ) -> None:
        self.runner = runner
        self.store = store
        self.settings = settings
        self.worker_name = worker_name
        self.last = FlushStats()

    def process(self, payloads: Sequence[tuple[str, Any]], attempt: int = 1) -> FlushStats:
        """Process ``(message_id, args)`` pairs; all their rows commit together.

        ``attempt`` is the delivery count of these messages, stored on new rows.
        Raises :class:`StoreUnavailable` when the commit still fails after
        retries: nothing was written and nothing may be acked.
        """
        started = utcnow()
        stats = FlushStats(messages=len(payloads))
        items: list[TaskItem] = []
        failures: list[Failure] = []
        for message_id, args in payloads:
            parsed = parse_payload(args, message_id, self.settings)
            items.extend(parsed.items)
            failures.extend(parsed.failures)
        t0 = time.perf_counter()
        encoded = self._encode(items, failures)
        stats.encode_s = time.perf_counter() - t0
        live = [i for i, e in enumerate(encoded) if e is not None]
        outcomes: dict[int, Prediction | str] = {}
        batch_of: dict[int, int] = {}
        lengths = [len(encoded[i].ids) for i in live]  # type: ignore[union-attr]
        dense: list[Encoded] = [encoded[i] for i in live]  # type: ignore[misc]
        batches = plan_batches(lengths, token_budget=self.settings.token_budget,
                               max_batch_size=self.settings.max_batch_size,
                               max_padding=self.settings.max_padding)
        # padded tokens of each batch: the flush's stats and the early-commit estimate
        cost = [len(rows) * max(lengths[r] for r in rows) for rows in batches]
        stats.batches = len(batches)
        stats.padded_tokens = sum(cost)
        for rows in batches:
            stats.batch_sizes.append(len(rows))
            stats.real_tokens += sum(lengths[r] for r in rows)
            for r in rows:
                batch_of[live[r]] = len(rows)
        early = _EarlyCommits(cost, t0)
        written: set[int] = set()  # item indices already committed in this flush

        def persist(done: dict[int, Prediction | str], flush_failures: list[Failure]) -> None:
            t1 = time.perf_counter()
            self._commit(self._records(items, encoded, done, batch_of, flush_failures, started,
                                       attempt, only=set(done)))
            written.update(done)
            stats.persist_s += time.perf_counter() - t1
            stats.commits += 1

        def on_batch(k: int, done: dict[int, Prediction | str]) -> None:
            if not early.due(k):
                return
            ready = {live[r]: out for r, out in done.items() if live[r] not in written}
            if ready:
                persist(ready, [])
                early.committed()

        for r, out in infer_pipelined(self.runner, dense, batches, on_batch,
                                      timings=stats.steps).items():
            outcomes[live[r]] = out
        stats.infer_s = time.perf_counter() - t0 - stats.persist_s
        stats.items = len(outcomes) + len(failures)
        stats.failed = len(failures) + sum(
            1 for out in outcomes.values() if not isinstance(out, Prediction))
        persist({i: out for i, out in outcomes.items() if i not in written}, failures)
        self.last = stats
        return stats

    def dead_letter(self, payloads: Sequence[tuple[str, Any]], reason: str, attempt: int) -> None:
        """Store every item of ``payloads`` as ``failed`` with ``reason``, without the model.

        For messages that were delivered too many times (their worker died
        each time). Raises :class:`StoreUnavailable` like :meth:`process`.
        """
        started = utcnow()
        failures: list[Failure] = []
        for message_id, args in payloads:
            parsed = parse_payload(args, message_id, self.settings)
            failures.extend(parsed.failures)
            failures.extend(Failure(it.id, reason, it.text, it.source, it.submitted_at)
                            for it in parsed.items)
        self._commit(self._records([], [], {}, {}, failures, started, attempt))

    def _encode(self, items: list[TaskItem], failures: list[Failure]) -> list[Encoded | None]:
        """Hop 2b: tokenize; an item the tokenizer rejects fails alone."""
        try:
            return list(self.runner.encode([it.text for it in items]))
        except Exception:  # noqa: BLE001 - isolate the text the tokenizer cannot take
            out: list[Encoded | None] = []
            for it in items:
                try:
                    out.append(self.runner.encode([it.text])[0])
                except Exception as exc:  # noqa: BLE001
                    failures.append(Failure(it.id, f"tokenizer error: {type(exc).__name__}: {exc}",
                                            it.text, it.source, it.submitted_at))
                    out.append(None)
            return out

    def _records(
        self,
        items: list[TaskItem],
        encoded: list[Encoded | None],
        outcomes: dict[int, Prediction | str],
        batch_of: dict[int, int],
        failures: list[Failure],
        started: Any,
        attempt: int,
        only: set[int] | None = None,
    ) -> list[ResultRecord]:
        """Rows for the items in ``only`` (all when None) and for ``failures``.

        ``attempt`` is the delivery count stored on every row.
        """
        finished = utcnow()
        base = {"model": self.runner.name, "model_revision": self.runner.revision,
                "started_at": started, "finished_at": finished, "worker": self.worker_name,
                "attempts": attempt}
        records = []
        for i, it in enumerate(items):
            enc = encoded[i]
            if enc is None or (only is not None and i not in only):
                continue  # a tokenizer failure (in ``failures``), or not asked for
            out = outcomes[i]
            common = dict(
                id=it.id, source=it.source, meta=it.meta,
                text=it.text if self.settings.store_text else None,
                text_sha256=_sha256(it.text), text_chars=len(it.text),
                truncated=enc.truncated, tokens=len(enc.ids),
                batch_size=batch_of[i], submitted_at=utc_from_timestamp(it.submitted_at), **base,
            )
            if isinstance(out, Prediction):
                records.append(ResultRecord(status=STATUS_DONE, label=out.label, score=out.score,
                                            scores=out.scores, **common))
            else:
                records.append(ResultRecord(status=STATUS_FAILED, error=out, **common))
        for f in failures:
            text = f.text if isinstance(f.text, str) else None
            safe = text if text is not None and _encodable(text) else None
            records.append(ResultRecord(
                id=f.id, source=f.source, status=STATUS_FAILED, error=f.reason,
                text=safe if self.settings.store_text and safe and len(safe) <= self.settings.max_text_chars else None,
                text_sha256=_sha256(safe or ""), text_chars=len(text) if text else 0,
                submitted_at=utc_from_timestamp(f.submitted_at) if f.submitted_at else None,
                batch_size=None, **base,
            ))
        return records

    def _commit(self, records: list[ResultRecord]) -> None:
        """Hop 4: one transaction; retried with backoff on a database outage."""
        delay = 0.2
        for attempt in range(1, 6):
            try:
                self.store.upsert(records)
                return
            except StoreUnavailable as exc:
                if attempt == 5:
                    raise
                log.warning("commit failed (attempt %d/5), retrying in %.1fs: %s",
                            attempt, delay, exc)
                time.sleep(delay)  # a real outage: back off instead of spinning
                delay = min(delay * 2, 5.0)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text
