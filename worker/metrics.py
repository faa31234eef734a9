"""A worker's Prometheus metrics, served on ``--metrics-port`` (``BERTSTREAM_METRICS_PORT``)
of ``--metrics-host`` (``BERTSTREAM_METRICS_HOST``, all interfaces by default).

Updated once per flush from its :class:`worker.flush.FlushStats`: items by
model, source and status; batch size, tokens per batch and padding ratio;
queue wait (submitted → flush start), inference and commit time per flush,
and end to end (submitted → committed) per item. Queue depth per lane and
liveness are read at scrape time. Source tags are caller data, so only the
first ``MAX_SOURCES`` distinct ones get a label of their own; the rest count
as ``other``.

What the logs alone used to tell is counted too: messages requeued (by a reason of
:data:`REQUEUE_REASONS`, a fixed set), dead-lettered and undeliverable, whether the
worker consumes (``bertstream_worker_up``: its consumer started and its heartbeat
reaches Redis) and whether its last database write worked (``bertstream_database_up``).
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis
from celery import bootsteps
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from contract.broker import lane_keys, lane_queue, redis_client, redis_full, redis_unreachable
from contract.constants import ENV_PREFIX, LANE_BULK, LANE_INTERACTIVE, TASK_ANALYZE
from contract.errors import ConfigError
from contract.results import ping
from contract.settings import Settings
from contract.sharedread import SharedRead

log = logging.getLogger(__name__)

MAX_SOURCES = 100
#: Why a message went back to its queue, the only values of the ``reason`` label:
#: ``database`` (an outage: the rows could not be written, or a flush's groups not tried
#: after one), ``refused`` (the database refused its rows: it runs alone next, and is
#: dead-lettered past ``BERTSTREAM_MAX_ATTEMPTS``), ``redis`` (Redis unreachable or full
#: during the flush), ``error`` (a flush failed unexpectedly), ``shutdown`` (held for its
#: long texts at a warm shutdown).
REQUEUE_REASONS = ("database", "refused", "redis", "error", "shutdown")
#: ``bertstream_database_up`` during an outage (:meth:`WorkerMetrics._database_up`): the
#: seconds without an outage requeue before a ``SELECT 1`` may read it as over (past the
#: longest pause before a requeue), how often one runs at most, and how long a scrape
#: waits for the one it started.
DATABASE_QUIET_S = 15.0
DATABASE_PROBE_EVERY_S = 5.0
DATABASE_PROBE_WAIT_S = 2.0
#: How long a scrape waits for its queue-depth read (:class:`_QueueDepth`) at most: well
#: under Prometheus's default scrape timeout (10 s), which a read hanging for the
#: configured Redis socket timeout (10 s by default) on a paused Redis used to reach.
DEPTH_WAIT_S = 2.0
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class WorkerMetrics:
    """The worker's metrics in their own registry; :meth:`observe` takes each flush."""

    def __init__(self, model: str, revision: str | None = None) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        r = self.registry
        self.items = Counter("bertstream_items", "Items stored, by model, source and status",
                             ["model", "source", "status"], registry=r)
        self.batch_size = Histogram("bertstream_batch_size", "Texts per model batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.batch_tokens = Histogram(
            "bertstream_batch_tokens", "Padded tokens per model batch",
            buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536), registry=r)
        self.padding = Histogram("bertstream_padding_ratio",
                                 "Padded tokens over real tokens - 1, per flush",
                                 buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=r)
        self.queue_wait = Histogram("bertstream_queue_wait_seconds",
                                    "Submitted to flush start, per item", buckets=_SECONDS,
                                    registry=r)
        self.infer = Histogram("bertstream_inference_seconds",
                               "Tokenize + inference time per flush", buckets=_SECONDS,
                               registry=r)
        self.commit = Histogram("bertstream_commit_seconds", "Commit time per flush",
                                buckets=_SECONDS, registry=r)
        self.end_to_end = Histogram("bertstream_end_to_end_seconds",
                                    "Submitted to committed row, per item", buckets=_SECONDS,
                                    registry=r)
        self.messages = Counter("bertstream_flush_messages", "Broker messages flushed",
                                registry=r)
        self.steps = Counter("bertstream_flush_step_seconds",
                             "Seconds spent in each step inside flushes: tokenize, collate, "
                             "launch, wait (for the device), decode", ["step"], registry=r)
        self.up = Gauge("bertstream_worker_up", "1 while this worker consumes: its consumer "
                        "started and its heartbeat reaches Redis; 0 while it waits for Redis "
                        "at start, reconnects to it or shuts down", registry=r)
        #: Set by the consumer step (:class:`Consuming`) and the heartbeat (:meth:`beat`).
        self._consuming = self._reachable = False
        self.up.set_function(lambda: float(self._consuming and self._reachable))
        self.requeued = Counter(
            "bertstream_requeued_messages", "Broker messages put back on their queue, by "
            "reason: " + ", ".join(REQUEUE_REASONS), ["reason"], registry=r)
        for reason in REQUEUE_REASONS:
            self.requeued.labels(reason)
        self.dead_lettered = Counter(
            "bertstream_dead_lettered_messages", "Broker messages delivered more than "
            "BERTSTREAM_MAX_ATTEMPTS times, acked with their tasks stored as failed (or "
            "dropped when even that failed)", registry=r)
        self.undeliverable = Counter(
            "bertstream_undeliverable_messages", "Queue items kombu could not make a "
            "message of, parked by the transport (their readable tasks stored as failed)",
            registry=r)
        #: The processor's :class:`worker.flush.OutageLog` (:meth:`watch_database`).
        self._outage: Any = None
        #: The results store a ``SELECT 1`` asks once writes stop (:meth:`_database_up`).
        self._store: Any = None
        self._probe_lock = threading.Lock()
        self._probing: threading.Event | None = None
        self._probed_at = float("-inf")
        #: When the latest ``SELECT 1`` that answered began, and the latest outage requeue.
        self._answered_since = float("-inf")
        self._requeued_at = float("-inf")
        self.database_up = Gauge(
            "bertstream_database_up", "0 from this worker's first failed database write of "
            "an outage until a write succeeds again or, with no outage requeue for a few "
            "seconds, a SELECT 1 answers; else 1", registry=r)
        self.database_up.set_function(lambda: float(self._database_up()))
        # The model label above is the name, which two models may share (fine-tunes each
        # in a directory named ``model``); the revision is the rows' ``model_revision``.
        Info("bertstream_model", "The model this worker serves: its name and revision",
             registry=r).info({"model": model, "revision": revision or ""})
        self._sources: set[str] = set()

    def source_label(self, source: str | None) -> str:
        """``source`` itself for the first MAX_SOURCES distinct tags, else ``other``."""
        if source is None:
            return ""
        if source in self._sources:
            return source
        if len(self._sources) < MAX_SOURCES:
            self._sources.add(source)
            return source
        return "other"

    def observe(self, stats: Any, *, inference: bool = True) -> None:
        """Record one flush (a :class:`worker.flush.FlushStats`): ``stats.rows`` holds one
        entry per row the flush wrote, with the status it was last written with (not a
        row a ``done`` one kept out).

        ``inference`` False: rows stored without the model's path (a refused message, a
        dead-lettered one), not a sample of inference time.
        """
        for size in stats.batch_sizes:
            self.batch_size.observe(size)
        for tokens in stats.batch_tokens:
            self.batch_tokens.observe(tokens)
        if stats.real_tokens:
            self.padding.observe(stats.padded_tokens / stats.real_tokens - 1)
        if inference:
            self.infer.observe(stats.infer_s)
        self.commit.observe(stats.persist_s)
        self.messages.inc(stats.messages)
        steps = stats.steps
        for name, seconds in (("tokenize", stats.encode_s), ("collate", steps.collate_s),
                              ("launch", steps.launch_s), ("wait", steps.wait_s),
                              ("decode", steps.decode_s)):
            self.steps.labels(name).inc(seconds)
        for status, source, submitted, committed in stats.rows:
            self.items.labels(self.model, self.source_label(source), status).inc()
            if submitted is not None:
                self.queue_wait.observe(max(stats.began - submitted, 0.0))
                self.end_to_end.observe(max(committed - submitted, 0.0))

    def serve(self, port: int, settings: Settings) -> str:
        """Serve the registry over HTTP on ``port`` of ``settings.metrics_host`` (an
        address, or a host name bound at its first address), with queue depth; return the
        URL it is served at, which names the address bound.

        Raises :class:`ConfigError` when it cannot be served: the port in use or
        privileged, the host name not resolved, the address not one of this host's.
        """
        host = settings.metrics_host
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(_serve_refusal(host, port, exc)) from exc
        self.registry.register(_QueueDepth(settings))
        bound = str(server.server_address[0])
        return (f"http://{'[' + bound + ']' if ':' in bound else bound}:"
                f"{server.server_address[1]}/metrics")

    def consuming(self, on: bool) -> None:
        """The consumer started consuming (True) or stopped: a lost connection, a shutdown."""
        self._consuming = on

    def beat(self, reached: bool) -> None:
        """A heartbeat reached Redis (True) or failed to (the heartbeat's ``on_beat``)."""
        self._reachable = reached

    def watch_database(self, outage: Any, store: Any = None) -> None:
        """Read ``bertstream_database_up`` from ``outage`` (a :class:`worker.flush.OutageLog`:
        its ``began`` is set by a failed write, read or requeue of an outage, and cleared
        by the next successful write) at scrape time; given ``store`` (the results store),
        a ``SELECT 1`` may turn it to 1 before that write (:meth:`_database_up`)."""
        self._outage, self._store = outage, store

    def requeued_for_outage(self) -> None:
        """An outage requeued messages now: no ``SELECT 1`` before this says it is over."""
        self._requeued_at = time.monotonic()

    def _database_up(self) -> bool:
        """1 with no outage known; during one, 1 once a ``SELECT 1`` that began after the
        outage's latest requeue, and :data:`DATABASE_QUIET_S` after it, answered.

        Only a successful write clears the outage (:class:`worker.flush.OutageLog`), and a
        worker with nothing to write writes nothing: its messages committed by another
        worker once the database is back, it read 0 for as long as it stayed idle, an
        alert that never cleared. The quiet time keeps a database that answers reads but
        refuses writes (read-only) at 0 while flushes keep requeueing. The probe runs in a
        daemon thread, one at a time, at most every :data:`DATABASE_PROBE_EVERY_S`, bounded
        by the store's timeouts; a scrape waits for it :data:`DATABASE_PROBE_WAIT_S` at most.
        Never raises."""
        outage = self._outage
        began = None if outage is None else outage.began
        if began is None:
            return True
        since = max(began, self._requeued_at) + DATABASE_QUIET_S
        if self._answered_since >= since:
            return True
        now = time.monotonic()
        if self._store is None or now < since:
            return False
        with self._probe_lock:
            if self._probing is None and now - self._probed_at >= DATABASE_PROBE_EVERY_S:
                self._probing, self._probed_at = threading.Event(), now
                threading.Thread(target=self._probe, args=(self._probing, now), daemon=True,
                                 name="bertstream-database-probe").start()
            probing = self._probing
        if probing is not None:
            probing.wait(DATABASE_PROBE_WAIT_S)
        return self._answered_since >= since

    def _probe(self, done: threading.Event, began: float) -> None:
        try:
            self._store.run(ping, "cannot reach the results database")
        except Exception:  # noqa: BLE001 - any failure reads as down
            pass
        else:
            with self._probe_lock:
                self._answered_since = max(self._answered_since, began)
        finally:
            with self._probe_lock:
                self._probing = None
            done.set()


def _serve_refusal(host: str, port: int, exc: OSError) -> str:
    """Why the metrics cannot be served on ``port`` of ``host``, in one line naming the
    setting to change: ``BERTSTREAM_METRICS_HOST`` when the host name does not resolve or
    the address is not this host's, else ``BERTSTREAM_METRICS_PORT`` (in use, privileged)."""
    if isinstance(exc, socket.gaierror):
        return (f"cannot serve metrics on {host} ({ENV_PREFIX}METRICS_HOST): the host name "
                f"does not resolve ({exc.strerror or exc})")
    if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        return (f"cannot serve metrics on {host} ({ENV_PREFIX}METRICS_HOST): not an "
                f"address of this host ({exc.strerror or exc})")
    return (f"cannot serve metrics on port {port} ({ENV_PREFIX}METRICS_PORT) of {host}: "
            f"{exc.strerror or exc}")


def count_requeued(metrics: WorkerMetrics | None, reason: str | BaseException,
                   n: int) -> None:
    """Count ``n`` messages requeued for ``reason`` (one of :data:`REQUEUE_REASONS`, or the
    exception that stopped a flush: ``redis`` for Redis unreachable or full, else
    ``error``) when metrics are served. Never raises: a flush must not fail for its
    metrics."""
    if metrics is None or n <= 0:
        return
    try:
        if isinstance(reason, BaseException):
            reason = ("redis" if redis_full(reason) or redis_unreachable(reason)
                      else "error")
        if reason not in REQUEUE_REASONS:
            raise ValueError(f"unknown requeue reason {reason!r}: one of {REQUEUE_REASONS}")
        metrics.requeued.labels(reason).inc(n)
        if reason == "database":
            metrics.requeued_for_outage()
    except Exception:  # noqa: BLE001 - metrics must not cost a flush
        log.exception("updating the metrics failed")


def count_dead_lettered(metrics: WorkerMetrics | None, n: int) -> None:
    """Count ``n`` dead-lettered messages when metrics are served (never raises)."""
    if metrics is not None and n > 0:
        metrics.dead_lettered.inc(n)


def count_undeliverable(metrics: WorkerMetrics | None) -> None:
    """Count one item the transport parked when metrics are served (never raises)."""
    if metrics is not None:
        metrics.undeliverable.inc()


class Consuming(bootsteps.StartStopStep):
    """Consumer step: ``bertstream_worker_up``'s half that says the consumer consumes.

    It starts after the task consumer's step, so once the connection is made and the
    queues are consumed from; Celery stops it when the connection is lost (before its
    reconnection attempts) and at shutdown, and starts it again after a reconnection."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def _metrics(self, parent: Any) -> WorkerMetrics | None:
        task = parent.app.tasks.get(TASK_ANALYZE)
        metrics = getattr(task, "metrics", None)
        return metrics if isinstance(metrics, WorkerMetrics) else None

    def start(self, parent: Any) -> None:
        metrics = self._metrics(parent)
        if metrics is not None:
            metrics.consuming(True)

    def stop(self, parent: Any) -> None:
        metrics = self._metrics(parent)
        if metrics is not None:
            metrics.consuming(False)

    shutdown = stop


class _QueueDepth(Collector):
    """Messages waiting per lane of this worker's queue family, read at scrape time (on a
    Redis broker; with the configured Redis timeouts, and a scrape waits for the read
    :data:`DEPTH_WAIT_S` at most, so a scrape outlasts no setting).

    The read is a :class:`contract.sharedread.SharedRead`: it runs in a daemon thread,
    one at a time on one connection: a scrape while
    one is under way waits for that one rather than starting another, so scrapes of a
    paused Redis (SIGSTOP, ``DEBUG SLEEP``, a partition that leaves TCP open) neither
    pile up threads or connections nor outlast Prometheus's scrape timeout. The thread
    ends with the read, by the configured socket timeout at the latest. A read that did
    not answer in time, or failed, leaves ``bertstream_queue_depth`` out of the scrape
    (the other families answer as usual), rather than a made-up 0; but a scrape whose read
    does not answer in time serves, once, the depths of the read before it if that one
    answered after its own scrape stopped waiting, so a Redis slower than
    :data:`DEPTH_WAIT_S` that answers every read does not lose the depth at every scrape.

    A lane is its list and its priority-step lists (:func:`contract.broker.lane_keys`), as
    the producer's ``queue_length`` and the API's depth count it: a message sent with a
    priority waits in one of those."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = redis_client(settings)
        self._read: SharedRead[dict[str, int]] = SharedRead(
            self._depths, DEPTH_WAIT_S, "bertstream-queue-depth")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.client is None:
            return  # memory://: no queue to count
        _, depths, error = self._read.get()
        if error is not None and not isinstance(error, redis.RedisError):
            log.error("reading the queue depth failed", exc_info=error)
        if depths is None:
            return  # a scrape during an outage shows no depth rather than failing
        depth = GaugeMetricFamily("bertstream_queue_depth", "Messages waiting in Redis per lane",
                                  labels=["lane"])
        for lane, size in depths.items():
            depth.add_metric([lane], size)
        yield depth

    def _depths(self) -> dict[str, int]:
        """Messages waiting per lane, read from Redis (in :class:`SharedRead`'s thread)."""
        assert self.client is not None
        lanes = [(lane, lane_keys(lane_queue(self.settings, lane == LANE_BULK)))
                 for lane in (LANE_INTERACTIVE, LANE_BULK)]
        with self.client.pipeline(transaction=False) as pipe:
            for _, keys in lanes:
                for key in keys:
                    pipe.llen(key)
            sizes = iter(pipe.execute())
        return {lane: sum(int(next(sizes)) for _ in keys) for lane, keys in lanes}
