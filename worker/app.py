"""Building a worker process: load the model once, wire the task, run Celery.

The order matters: the model and the database are made ready before the
worker consumes its first message, so a bad model directory or an
unreachable database fails at start, loudly, not on the first task.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from celery import Celery

from contract import migrate
from contract.broker import make_celery
from contract.constants import DEFAULT_MODEL, LANE_BULK, LANE_INTERACTIVE, queue_name
from contract.results import ResultStore
from contract.settings import Settings
from worker import kombu_redis
from worker.device import Placement, resolve_placement
from worker.flush import FlushProcessor
from worker.heartbeat import Heartbeat
from worker.process import close_store
from worker.runner import HFRunner, NullRunner, Runner
from worker.tasks import AnalyzeTask, register_tasks

log = logging.getLogger(__name__)

NULL_MODEL = "null"


def resolve_model_dir(settings: Settings, progress: bool = True) -> tuple[Path, str]:
    """The directory of the model to load and its display name.

    ``default`` assembles (first use) or finds (later) the bundled sentiment
    model under ``settings.cache_dir``; anything else is a directory path.
    """
    if settings.model == DEFAULT_MODEL:
        from worker.sentiment.assemble import ensure_default_model

        path = ensure_default_model(Path(settings.cache_dir), progress=progress)
        return path, "bertstream-sentiment-e5small"
    path = Path(settings.model).expanduser()
    return path, path.name


def build_runner(settings: Settings, placement: Placement | None = None) -> Runner:
    """Load the configured model once for this process."""
    if settings.model == NULL_MODEL:
        return NullRunner()
    placement = placement or resolve_placement(settings.device, settings.dtype)
    if placement.device.type == "cpu" and settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    path, name = resolve_model_dir(settings)
    runner = HFRunner(path, placement, name=name, max_length=settings.max_length,
                      neutral_below=settings.neutral_below)
    log.info("model %s (rev %s) on %s, max_length %d",
             runner.name, runner.revision, placement.describe(), runner.max_length)
    if placement.is_cuda:
        t0 = time.perf_counter()
        shapes = runner.warm_up(settings.token_budget, settings.max_batch_size)
        log.info("warm-up: %d batch shapes in %.1f s", shapes, time.perf_counter() - t0)
    return runner


@dataclass
class WorkerApp:
    """A Celery app with the analysis task registered, ready to consume."""

    app: Celery
    task: AnalyzeTask
    processor: FlushProcessor
    queues: list[str]


def build_worker_app(
    settings: Settings, runner: Runner, *, store: ResultStore | None = None,
    hostname: str | None = None,
) -> WorkerApp:
    """Wire the Celery app, the results store and the task.

    An empty database gets the schema; an outdated one raises
    :class:`SchemaMismatch` (``bertstream db upgrade`` fixes it).
    """
    store = store or ResultStore.from_settings(settings)
    migrate.ensure(store)
    # The transport patch belongs to worker processes, never to an app importing the client.
    kombu_redis.install(atomic_receive=settings.atomic_receive)
    app = make_celery(settings, name="bertstream-worker")
    # The pid keeps two workers on one host apart (rows, heartbeats, Celery's
    # node names); containers differ by their host names already.
    name = hostname or f"bertstream-{os.getpid()}@{socket.gethostname()}"
    processor = FlushProcessor(runner, store, settings, worker_name=name, hold_windows=True)
    metrics = None
    if settings.metrics_port:
        from worker.metrics import WorkerMetrics

        metrics = WorkerMetrics(runner.name)
        metrics.serve(settings.metrics_port, settings)
        log.info("metrics on http://0.0.0.0:%d/metrics", settings.metrics_port)
    task = register_tasks(app, processor, settings, metrics)
    # Items the transport cannot deliver: the task fails those whose ids it can read.
    kombu_redis.on_undeliverable(task.fail_undeliverable)
    # Enough prefetched messages to fill a flush; celery-batches needs them
    # unacked in the buffer, and solo concurrency is 1.
    app.conf.worker_prefetch_multiplier = max(settings.flush_every * 2, 4)
    queues = [queue_name(settings.family, lane) for lane in (LANE_INTERACTIVE, LANE_BULK)]
    return WorkerApp(app, task, processor, queues)


def run_worker(wapp: WorkerApp, *, hostname: str | None = None, loglevel: str = "INFO",
               ready_file: str | None = None) -> None:
    """Consume until stopped.

    SIGTERM/SIGINT: warm shutdown. The flush running finishes and commits;
    buffered messages not yet flushed are unacked, and closing the channel
    puts them back on the queue at once (kombu restores a channel's unacked
    messages when it closes). ``ready_file`` is created once the worker
    consumes: how a supervisor (or a test) knows it is ready without
    Celery's remote control, which is off by default. At the end the
    results store is closed (:func:`worker.process.close_store`): on SQLite
    the stopped worker's rows are then in the database file itself.
    """
    hostname = hostname or wapp.processor.worker_name
    if ready_file:
        from celery import signals

        def mark_ready(**_kw: Any) -> None:
            Path(ready_file).write_text(hostname, encoding="utf-8")

        signals.worker_ready.connect(mark_ready, weak=False)
    worker: Any = wapp.app.Worker(
        pool="solo",
        concurrency=1,
        queues=wapp.queues,
        hostname=hostname,
        loglevel=loglevel,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        optimization="fair",
    )
    runner = wapp.processor.runner
    placement = getattr(runner, "placement", None)
    beat = Heartbeat(wapp.processor.settings, hostname, {
        "model": runner.name, "device": placement.describe() if placement else "none"})
    beat.start()
    try:
        worker.start()
    finally:
        beat.stop()
        close_store(wapp.processor.store)
    code = getattr(worker, "exitcode", 0) or 0
    if code:
        raise SystemExit(code)
