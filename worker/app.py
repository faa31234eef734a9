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

import redis
import torch
from celery import Celery

from contract import migrate
from contract.broker import (
    eviction_policy,
    make_celery,
    probe_broker,
    redis_client,
    redis_full,
)
from contract.constants import (
    DEFAULT_MODEL,
    ENV_PREFIX,
    LANE_BULK,
    LANE_INTERACTIVE,
    queue_name,
)
from contract.errors import BertstreamError, BrokerUnavailable
from contract.results import DbTimeouts, ResultStore
from contract.settings import REDIS_SCHEMES, Settings, mask_url
from worker import kombu_redis
from worker.cli import sigterm_logged
from worker.device import Placement, resolve_placement, wider_placement
from worker.flush import FlushProcessor
from worker.heartbeat import Heartbeat
from worker.launcher import torch_threads_source
from worker.process import close_store, prepare_ready_file
from worker.runner import HFRunner, NonFiniteScores, NullRunner, Runner
from worker.tasks import AnalyzeTask, register_tasks

log = logging.getLogger(__name__)

NULL_MODEL = "null"
#: Longest pause between two tries to reach Redis at start (the first is half a second).
BROKER_RETRY_MAX_S = 5.0


def wait_for_broker(settings: Settings) -> None:
    """Return once Redis answers on the broker URL (memory://: at once).

    A worker that could not reach Redis at start retried for ever (Celery's
    connection retry), where ``worker --help`` promises exit 3. It tries for
    ``broker_start_wait_s`` seconds, each failed try logged on one line, so a
    Redis that comes up a little later (a restarted stack) is waited for; then
    :class:`BrokerUnavailable` names the URL (password masked) and the setting.
    Redis answering but refusing the URL's database index or credentials is a
    :class:`ConfigError`, at once: no retry fixes it; so is a Redis that refuses Lua
    scripts, which kombu's visibility restore needs. A full Redis (maxmemory, noeviction)
    is waited for the same way, and named so: Celery's start failed on its refused
    writes with a traceback (exit 1). Celery's own reconnection after a connection lost
    later is left as it is. A SIGTERM meanwhile is logged (:func:`sigterm_logged`).
    """
    if not settings.broker_url.startswith(REDIS_SCHEMES):
        return
    with sigterm_logged("waiting for Redis"):
        _wait_for_broker(settings)


def _wait_for_broker(settings: Settings) -> None:
    url = mask_url(settings.broker_url)
    wait_s = settings.broker_start_wait_s
    deadline = time.monotonic() + wait_s
    pause = 0.5
    tries = 0
    while True:
        tries += 1
        # One try is one connection attempt (redis-py's own retries are off), cut short
        # by the time left, so the wait ends near its bound.
        try:
            probe_broker(settings, max(deadline - time.monotonic(), 0.1), needs_scripts=True)
            if tries > 1:
                log.info("Redis at %s answers (try %d)", url, tries)
            return
        except BrokerUnavailable as exc:
            reason = exc.__cause__ or exc
            full = redis_full(exc)  # up, but refusing writes: not "cannot reach"
        left = deadline - time.monotonic()
        tried = f"tried {tries} time(s) in {wait_s:g} s, {ENV_PREFIX}BROKER_START_WAIT_S"
        if left <= 0:
            if full:
                raise BrokerUnavailable(f"Redis at {url} is full (used memory above its "
                                        f"maxmemory; {tried}): free memory or raise its "
                                        f"maxmemory")
            raise BrokerUnavailable(f"cannot reach Redis at {url} ({tried}): {reason}")
        sleep = min(pause, left)
        what = (f"Redis at {url} is full (maxmemory)" if full
                else f"cannot reach Redis at {url}")
        log.warning("%s (%s); try %d failed, next in %.1f s, giving up in %.1f s "
                    "(%sBROKER_START_WAIT_S)", what, reason, tries, sleep, left, ENV_PREFIX)
        time.sleep(sleep)
        pause = min(pause * 2, BROKER_RETRY_MAX_S)


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
    """Load the configured model once for this process (assembled first, for the bundled
    one; warmed up, on a GPU). A SIGTERM meanwhile is logged (:func:`sigterm_logged`)."""
    if settings.model == NULL_MODEL:
        return NullRunner()
    with sigterm_logged("loading the model"):
        return _load_runner(settings, placement)


def _load_runner(settings: Settings, placement: Placement | None) -> Runner:
    placement = placement or resolve_placement(settings.device, settings.dtype)
    if placement.device.type == "cpu":
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        log.info("torch threads: %d (%s)", torch.get_num_threads(),
                 torch_threads_source(settings))
    path, name = resolve_model_dir(settings)

    def load(where: Placement) -> HFRunner:
        return HFRunner(path, where, name=name, max_length=settings.max_length,
                        neutral_below=settings.neutral_below)

    refused: str | None = None
    try:
        runner = load(placement)
    except NonFiniteScores as exc:
        # "auto" picked float16 (CUDA); a model that overflows there (weights or
        # activations past 65504, common for checkpoints trained in bfloat16) runs
        # in the wider type instead of refusing. An explicit dtype is the user's.
        if settings.dtype != "auto" or placement.dtype != torch.float16:
            raise
        refused = str(exc)
    if refused is not None:
        # Loaded again outside the except clause: the exception's traceback holds the
        # float16 model, which would stay on the GPU while the wider one loads.
        wider = wider_placement(placement)
        log.warning("%s; BERTSTREAM_DTYPE is auto, so it is loaded again in %s", refused,
                    str(wider.dtype).removeprefix("torch."))
        placement = wider
        runner = load(placement)
    # The directory too: fine-tunes each in a directory named ``model`` share a name.
    log.info("model %s (%s, rev %s) on %s, max_length %d, %d labels (%s%s)",
             runner.name, path, runner.revision, placement.describe(), runner.max_length,
             len(runner.labels), runner.output, ", padded on the left" * runner.pad_left)
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
    warn_max_wait(settings)
    warn_silent_database(settings)
    # The transport patch belongs to worker processes, never to an app importing the client.
    kombu_redis.install(atomic_receive=settings.atomic_receive)
    app = make_celery(settings, name="bertstream-worker")
    # The pid keeps two workers on one host apart (rows, heartbeats, Celery's
    # node names); containers differ by their host names already.
    name = hostname or f"bertstream-{os.getpid()}@{socket.gethostname()}"
    processor = FlushProcessor(runner, store, settings, worker_name=name, hold_windows=True)
    metrics = None
    if settings.metrics_port:
        from worker.metrics import Consuming, WorkerMetrics

        metrics = WorkerMetrics(runner.name, runner.revision)
        url = metrics.serve(settings.metrics_port, settings)
        metrics.watch_database(processor.outage, store)
        app.steps["consumer"].add(Consuming)  # worker_up: 1 only while the consumer consumes
        log.info("metrics on %s", url)  # the address bound, a host name's too
    task = register_tasks(app, processor, settings, metrics)
    # Items the transport cannot deliver: the task fails those whose ids it can read.
    kombu_redis.on_undeliverable(task.fail_undeliverable)
    # Enough prefetched messages to fill a flush; celery-batches needs them
    # unacked in the buffer, and solo concurrency is 1.
    app.conf.worker_prefetch_multiplier = max(settings.flush_every * 2, 4)
    # A Redis lost after the start is waited for as long as it takes: Celery's default of
    # 100 reconnection tries (up to 30 s apart) ended the worker with an "Unrecoverable
    # error" traceback and exit 1 when an outage outlasted them.
    app.conf.broker_connection_max_retries = None
    queues = [queue_name(settings.family, lane) for lane in (LANE_INTERACTIVE, LANE_BULK)]
    return WorkerApp(app, task, processor, queues)


def warn_eviction(settings: Settings) -> bool:
    """Log a warning when the broker Redis may evict the queues; True if so.

    Under ``maxmemory`` with an ``allkeys-*`` policy (managed services often ship one) a
    full Redis evicts keys, and a queue is one key: every task waiting in it is lost, and
    neither the producer nor a worker hears of it. Said once at start, loudly, with the
    fix (:meth:`contract.broker.EvictionPolicy.warning`); a ``volatile-*`` policy, which
    leaves the queues alone, gets a milder line (:meth:`~contract.broker.EvictionPolicy.note`).
    A Redis that refuses ``INFO`` (an ACL) or does not report the policy is said at info
    level, and the worker starts all the same. One that went silent since the wait for it
    is waited for up to its socket timeout, still "waiting for Redis" to a SIGTERM
    (:func:`sigterm_logged`), which otherwise ended the worker without a word.
    """
    client = redis_client(settings)
    if client is None:
        return False
    url = mask_url(settings.broker_url)
    try:
        with sigterm_logged("waiting for Redis"):
            policy = eviction_policy(client)
    except redis.RedisError as exc:
        log.info("Redis at %s: cannot read its maxmemory-policy (INFO memory: %s); make sure "
                 "it is noeviction, or queued tasks can be evicted", url, exc)
        return False
    finally:
        client.close()
    if policy is None:
        log.info("Redis at %s does not report its maxmemory-policy (INFO memory); make sure "
                 "it is noeviction, or queued tasks can be evicted", url)
        return False
    warning = policy.warning()
    if warning:
        log.warning("Redis at %s: %s", url, warning)
        return True
    note = policy.note()
    if note:
        log.info("Redis at %s: %s", url, note)
    return False


def warn_max_wait(settings: Settings) -> bool:
    """Log a warning when ``max_wait_ms`` is not below the visibility timeout; True if so.

    Allowed: the task renews buffered messages in kombu's unacked index every
    quarter of the timeout (worker/tasks.py). But then a buffered message stays
    unacked only through those renewals; one that fails (Redis slow or away)
    lets the visibility sweep deliver it again, counted towards ``max_attempts``.
    Below the timeout a message is flushed before the sweep could take it, renewed
    or not.
    """
    if settings.max_wait_ms < settings.visibility_timeout_s * 1000:
        return False
    log.warning("%sMAX_WAIT_MS=%d is not below %sVISIBILITY_TIMEOUT_S=%d (%d ms): a buffered "
                "message outlives the visibility timeout and is kept from redelivery only by "
                "this worker renewing it; a renewal that fails lets it be delivered again "
                "(counted towards %sMAX_ATTEMPTS). Keep the max wait well below the "
                "visibility timeout.", ENV_PREFIX, settings.max_wait_ms, ENV_PREFIX,
                settings.visibility_timeout_s, settings.visibility_timeout_s * 1000, ENV_PREFIX)
    return True


def unrenewed_span_s(settings: Settings) -> float:
    """The longest a delivery of a flush may wait unrenewed against a silent database.

    The task renews what it holds when a quarter of the visibility timeout has passed,
    checked before each database operation of a flush; one commit attempt in between may
    wait out the connect timeout and the statement guard twice (the store retries an
    operation once on a dead connection), plus the pause before the next attempt.
    """
    t = DbTimeouts.from_settings(settings)
    return settings.visibility_timeout_s / 4 + 2 * (t.connect_s + t.guard_s) + 2


def warn_silent_database(settings: Settings) -> bool:
    """Log a warning when a silent database could keep a flush's deliveries unrenewed
    past the visibility timeout (:func:`unrenewed_span_s`); True if so.

    Other workers' sweeps would then restore them and count the next delivery towards
    ``max_attempts`` though nothing failed. A database that answers, even with errors,
    is not concerned: only one that accepts connections and stays silent.
    """
    span = unrenewed_span_s(settings)
    if span < settings.visibility_timeout_s:
        return False
    log.warning("%sVISIBILITY_TIMEOUT_S=%d is short for the database timeouts (%sDB_CONNECT_"
                "TIMEOUT_S=%g, %sDB_STATEMENT_TIMEOUT_S=%g): against a database that accepts "
                "connections and stays silent, one commit attempt can keep a flush's messages "
                "unrenewed for %.0f s, and other workers would deliver them again (counted "
                "towards %sMAX_ATTEMPTS). Raise the visibility timeout above %.0f s or lower "
                "the database timeouts.", ENV_PREFIX, settings.visibility_timeout_s, ENV_PREFIX,
                settings.db_connect_timeout_s, ENV_PREFIX, settings.db_statement_timeout_s,
                span, ENV_PREFIX, (span - settings.visibility_timeout_s / 4) * 4 / 3)
    return True


def run_worker(wapp: WorkerApp, *, hostname: str | None = None, loglevel: str = "INFO",
               ready_file: str | None = None) -> None:
    """Consume until stopped.

    SIGTERM/SIGINT: warm shutdown. The flush running finishes and commits;
    buffered messages not yet flushed are unacked, and closing the channel
    puts them back on the queue at once (kombu restores a channel's unacked
    messages when it closes). ``ready_file`` is created once the worker
    consumes: how a supervisor (or a test) knows it is ready without
    Celery's remote control, which is off by default; its directory is made when
    missing, and one that cannot be raises :class:`ConfigError`. Redis that does not
    answer within ``broker_start_wait_s`` raises :class:`BrokerUnavailable`
    (:func:`wait_for_broker`). At the end the results store is closed (:func:`worker.process.close_store`): on SQLite
    the stopped worker's rows are then in the database file itself.
    """
    hostname = hostname or wapp.processor.worker_name
    # Here, once the model is loaded: a setting or a model to fix is said at once, whether
    # Redis is up or not. Celery's own retry at start would last for as long as it takes.
    try:
        if ready_file:
            prepare_ready_file(ready_file)
        wait_for_broker(wapp.processor.settings)
        warn_eviction(wapp.processor.settings)
    except BertstreamError:
        close_store(wapp.processor.store)
        raise
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
    # The revision tells apart two models of one name, as the rows' model_revision does.
    beat = Heartbeat(wapp.processor.settings, hostname, {
        "model": runner.name, "revision": runner.revision,
        "device": placement.describe() if placement else "none"},
        on_beat=wapp.task.metrics.beat if wapp.task.metrics is not None else None)
    beat.start()
    try:
        worker.start()
    finally:
        beat.stop()
        close_store(wapp.processor.store)
    code = getattr(worker, "exitcode", 0) or 0
    if code:
        raise SystemExit(code)
