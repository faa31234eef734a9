"""Hop 1 (buffer) and hop 5 (ack): the micro-batching Celery task.

Built on celery-batches' ``Batches``, which buffers requests in the consumer
and flushes on a count or a timer. Two things are changed:

- a token budget: a flush also fires when the buffered texts hold about
  ``flush_tokens`` tokens, so one bulk message of 256 long texts does not
  wait for 63 more messages;
- acks after commit: celery-batches acks late requests when the batch
  function *returns*, even when it raised. Here each message is acked only
  after its rows are committed, and requeued when the database is down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Any

from celery import Celery
from celery_batches import Batches, SimpleRequest

from contract.constants import TASK_ANALYZE
from contract.errors import StoreUnavailable
from contract.kombu_redis import deferred_acks
from contract.settings import Settings
from worker.deliveries import DeliveryCounter
from worker.flush import FlushProcessor

log = logging.getLogger(__name__)


def estimate_tokens(payload: Any) -> int:
    """Upper-bound token estimate of one message body before tokenizing.

    One token per character (exact for Chinese, generous for English):
    cheap, and only used to decide when to flush.
    """
    try:
        items = payload[0][0]
        return sum(min(len(it.get("text") or ""), 512) + 2 for it in items)
    except (TypeError, KeyError, IndexError, AttributeError):
        return 1


def ack_all(requests: list[Any]) -> None:
    """Ack every request now, with one Redis round trip for all of them.

    Celery's ``Request.acknowledge`` schedules the ack on the event loop
    (``call_soon``), one MULTI/EXEC per message. Here the flush runs on that
    loop's thread already, so the messages are acked directly, inside
    :func:`deferred_acks`, which sends their unacked-index removals as one
    pipeline (contract/kombu_redis.py).
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


class AnalyzeTask(Batches):
    """Buffers analysis requests and hands each flush to a FlushProcessor."""

    name = TASK_ANALYZE
    acks_late = True
    reject_on_worker_lost = True
    typing = False
    processor: FlushProcessor | None = None
    deliveries: DeliveryCounter | None = None
    max_attempts = 3
    flush_tokens = 32_768
    #: Seconds to pause before requeueing after a database outage.
    requeue_pause_s = 1.0

    def __init__(self) -> None:
        super().__init__()
        self._buffered_tokens = 0

    def Strategy(self, task: Any, app: Celery, consumer: Any) -> Callable[..., None]:  # noqa: N802
        """celery-batches' strategy plus a token-budget flush trigger."""
        handler = super().Strategy(task, app, consumer)

        def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                       **kw: Any) -> None:
            handler(message, body, ack, reject, callbacks, **kw)
            self._buffered_tokens += estimate_tokens(message.payload)
            if self._buffered_tokens >= self.flush_tokens and not self._buffer.empty():
                self._do_flush()

        return on_message

    def flush(self, requests: Collection[Any]) -> None:
        """Process the buffered requests now; ack what committed, requeue the rest.

        First deliveries are processed together. A redelivered message (its
        worker died mid-flush) is processed alone, and dead-lettered once it
        has been delivered more than ``max_attempts`` times.
        """
        self._buffered_tokens = 0
        reqs = list(requests)
        simple = [SimpleRequest.from_request(r) for r in reqs]
        counts = (self.deliveries.incr([s.id for s in simple]) if self.deliveries is not None
                  else [1] * len(reqs))
        fresh = [(r, s) for r, s, n in zip(reqs, simple, counts, strict=True) if n == 1]
        if fresh:
            self._commit_group(fresh, attempt=1)
        for r, s, n in zip(reqs, simple, counts, strict=True):
            if n > 1:
                self._commit_group([(r, s)], attempt=n)

    def _commit_group(self, group: list[tuple[Any, SimpleRequest]], attempt: int) -> None:
        payloads = [(s.id, s.args) for _, s in group]
        ids = [s.id for _, s in group]
        try:
            if attempt > self.max_attempts:
                log.error("dead-lettering message %s after %d deliveries", ids[0], attempt)
                self._processor().dead_letter(
                    payloads, f"dead-lettered after {attempt} deliveries: the worker "
                    "processing this task died each time", attempt)
            else:
                self._process(payloads, attempt)
        except StoreUnavailable as exc:
            log.error("database unavailable, requeueing %d message(s): %s", len(group), exc)
            if self.deliveries is not None:
                self.deliveries.forget(ids)  # an outage is not the message's fault
            time.sleep(self.requeue_pause_s)  # let the outage pass before a redelivery
            for r, _ in group:
                r.reject(requeue=True)
            return
        ack_all([r for r, _ in group])
        if self.deliveries is not None:
            self.deliveries.forget(ids)

    def run(self, requests: list[SimpleRequest]) -> None:
        """Eager path (``apply``): process without broker acks."""
        self._process([(r.id, r.args) for r in requests])

    def _processor(self) -> FlushProcessor:
        if self.processor is None:
            raise RuntimeError("AnalyzeTask has no processor: build it with register_tasks()")
        return self.processor

    def _process(self, payloads: list[tuple[str, Any]], attempt: int = 1) -> None:
        stats = self._processor().process(payloads, attempt)
        log.info(
            "flush: %d msg, %d items (%d failed), %d batches, pad %.1f%%, infer %.3fs, "
            "commit %.3fs (%d commits); tokenize %.3fs, collate %.3fs, launch %.3fs, "
            "wait %.3fs, decode %.3fs",
            stats.messages, stats.items, stats.failed, stats.batches,
            100.0 * (stats.padded_tokens - stats.real_tokens) / max(stats.real_tokens, 1),
            stats.infer_s, stats.persist_s, stats.commits, stats.encode_s,
            stats.steps.collate_s, stats.steps.launch_s, stats.steps.wait_s, stats.steps.decode_s,
        )


def register_tasks(app: Celery, processor: FlushProcessor, settings: Settings) -> AnalyzeTask:
    """Register the analysis task on ``app`` with the injected ``processor``."""
    task_cls = type(
        "AnalyzeTask",
        (AnalyzeTask,),
        {
            "processor": processor,
            "flush_every": settings.flush_every,
            "flush_interval": settings.max_wait_ms / 1000.0,
            "flush_tokens": settings.token_budget * 4,
            "deliveries": DeliveryCounter(settings.broker_url),
            "max_attempts": settings.max_attempts,
        },
    )
    task = app.register_task(task_cls())
    return task
