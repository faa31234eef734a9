"""``bertstream demo``: the whole pipeline on embedded defaults, in about a minute.

Starts a worker (a subprocess on Redis, or a thread on Celery's in-memory
transport when Redis is down), streams a few hundred labelled Chinese and
English sample texts through the producer, waits for every row, prints a
summary and a few rows, and stops everything it started.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import redis

from contract.broker import broker_error, redis_client
from contract.constants import DEFAULT_MODEL
from contract.errors import BertstreamError, ConfigError
from contract.liveness import glob_literal
from contract.results import ResultRecord, ResultStore
from contract.settings import REDIS_SCHEMES, Settings, mask_url
from producer.client import Client
from worker.process import WorkerProc, close_store

Echo = Callable[[str], None]

#: The demo's queue names: ``bertstream_demo.<hex>`` (:func:`demo_queue`).
DEMO_QUEUE_PREFIX = "bertstream_demo."


def demo_queue() -> str:
    """A queue of the demo's own, so a production worker on the same Redis leaves it alone.

    Not derived from ``BERTSTREAM_QUEUE``: ``<queue>-demo-<hex>`` passed the queue-name
    limit for a long queue (the demo stopped on a setting the user had not got wrong),
    and it was the family of a model named ``demo-<hex>``, so a production API on the
    same Redis counted the demo's worker as one of its own. Without a ``-`` this name
    is no model family (``<queue>-<name>``) of any queue, and it always fits.
    """
    return f"{DEMO_QUEUE_PREFIX}{uuid.uuid4().hex[:12]}"


class DemoWorkerFailed(BertstreamError):
    """The demo's worker process exited before it was ready; ``code`` is its exit code
    (2 bad settings or model, 3 Redis or the database unreachable), the demo's too."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def load_samples() -> list[dict[str, str]]:
    """The bundled labelled samples: ``{text, lang, label}`` (50 zh, 50 en)."""
    raw = resources.files("worker.data").joinpath("demo_texts.jsonl").read_text("utf-8")
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def redis_reachable(settings: Settings) -> bool:
    """True when a Redis server answers PING on the broker URL within a second.

    Raises :class:`ConfigError` when one answers but refuses the URL's database index
    or credentials (:func:`contract.broker.broker_error`): the demo said to start
    Redis and ran in memory instead, hiding a setting to fix.
    """
    url = settings.broker_url
    if not url.startswith(REDIS_SCHEMES):
        return False
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError as exc:
        error = broker_error(settings, exc)
        if isinstance(error, ConfigError):
            raise error from exc
        return False
    finally:
        client.close()


@contextmanager
def subprocess_worker(settings: Settings, echo: Echo, timeout: float = 300.0) -> Iterator[None]:
    """A ``python -m worker`` child on ``settings``; stopped (SIGTERM, then KILL) on exit."""
    log_path = Path(settings.cache_dir) / "demo-worker.log"
    proc = WorkerProc(settings, log_path, args=("--loglevel", "WARNING"), name="demo",
                      truncate_log=True)
    try:
        try:
            proc.wait_ready(timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise _worker_failure(proc, log_path, exc, timeout) from None
        echo(f"worker {proc.hostname} ready (pid {proc.pid}, log: {log_path})")
        yield
    finally:
        proc.stop(timeout=30)


def _worker_failure(proc: WorkerProc, log_path: Path, exc: Exception,
                    timeout: float) -> DemoWorkerFailed:
    """One line for a demo worker that did not start: its own ``error:`` line and exit code."""
    code = proc.proc.poll()
    if code is None:
        return DemoWorkerFailed(f"the demo worker was not ready after {timeout:.0f}s "
                                f"(log: {log_path})", 1)
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    reason = (errors or lines or ["(no output)"])[-1]
    reason = reason.removeprefix("error:").strip()
    return DemoWorkerFailed(f"the demo worker exited with code {code}: {reason} "
                            f"(log: {log_path})", code if code > 0 else 1)


class _NoHostnameNotice(logging.Filter):
    """Drops kombu's "No hostname was supplied" warning: a ``memory://`` URL has no host
    by nature, and the warning, printed between the demo's lines, read as a bad setting."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No hostname was supplied")


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Without the libraries' own output in the demo's terminal: kombu's host warning and
    transformers' weight-loading bar (a subprocess worker writes both to its log)."""
    from transformers.utils import logging as hf_logging

    kombu_log = logging.getLogger("kombu.connection")
    notice = _NoHostnameNotice()
    bars = hf_logging.is_progress_bar_enabled()
    kombu_log.addFilter(notice)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        kombu_log.removeFilter(notice)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def thread_worker(settings: Settings, echo: Echo) -> Iterator[None]:
    """The same worker, in a thread of this process (for the in-memory transport)."""
    from celery.contrib.testing.worker import start_worker

    from worker.app import build_runner, build_worker_app

    with _quiet_libraries():
        runner = build_runner(settings)
        store = ResultStore.from_settings(settings)
        try:
            wapp = build_worker_app(settings, runner, store=store)
            with start_worker(wapp.app, pool="solo", perform_ping_check=False,
                              queues=wapp.queues, hostname="demo@localhost",
                              loglevel="WARNING", shutdown_timeout=60):
                echo("in-process worker ready")
                yield
        finally:
            store.close()


def run_demo(settings: Settings, *, repeat: int = 3, echo: Echo = print) -> int:
    """Run the demo; gives the process exit code (0 when every text got a row)."""
    in_memory = not redis_reachable(settings)
    if in_memory:
        echo(f"Redis is not reachable at {mask_url(settings.broker_url)}: start it with "
             "`redis-server --daemonize yes` (or `docker compose up -d redis`), or set "
             "BERTSTREAM_BROKER_URL. Running the same pipeline in one process on Celery's "
             "in-memory transport instead.")
        settings = settings.replace(broker_url="memory://")
    settings = settings.replace(queue=demo_queue())
    from worker.app import resolve_model_dir

    echo("preparing the model (first use assembles and caches it) ...")
    try:
        resolve_model_dir(settings, progress=True)
    except OSError as exc:
        if settings.model != DEFAULT_MODEL:
            raise
        from worker.cli import _cache_error

        raise _cache_error(settings, exc) from exc
    echo(f"database: {mask_url(settings.database_url)}")
    samples = load_samples()
    items = [
        {"text": s["text"], "source": "demo", "meta": {"lang": s["lang"], "expected": s["label"]}}
        for _ in range(repeat) for s in samples
    ]
    worker = thread_worker(settings, echo) if in_memory else subprocess_worker(settings, echo)
    try:
        with worker, Client(settings) as client:
            t0 = time.time()
            report = client.submit_many(items)
            echo(f"submitted {report.accepted} texts ({len(samples)} distinct, each {repeat} "
                 f"times) in {report.messages} message(s)")
            rows = client.wait(report.ids, timeout=600)
            elapsed = time.time() - t0
    finally:
        if not in_memory:
            remove_queue_keys(settings)
        checkpoint(settings)
    print_summary([rows[i] for i in report.ids], elapsed, echo)
    return 0 if len(rows) == len(report.ids) else 1


def checkpoint(settings: Settings) -> None:
    """Fold an SQLite database's write-ahead log into the database file.

    The demo's workers are gone by now; one killed, or stopped while the database
    was busy, left rows in ``<db>-wal``: a copy of the database file alone would hold none.
    Other databases: nothing to do. A failure here is no reason to fail the demo.
    """
    if not settings.database_url.startswith("sqlite"):
        return
    try:
        store = ResultStore.from_settings(settings)
    except BertstreamError:
        return
    close_store(store)


def remove_queue_keys(settings: Settings) -> int:
    """Delete every key the demo's own queue left in Redis: kombu's exchange bindings,
    the lanes and their priority lists, the heartbeats of every family of the queue (a
    named model's, ``<queue>-<name>``, included), retry markers; gives how many went.
    The queue's name is the demo's own (:func:`demo_queue`), so every key holding it
    is the demo's. With the configured Redis timeouts: a Redis gone silent does not
    hold the demo's end for good."""
    client = redis_client(settings)
    if client is None:
        return 0  # memory://: nothing outlives the process
    try:
        with Client(settings) as producer:
            keys: set[Any] = {*producer.queue_names(), f"_kombu.binding.{settings.queue}",
                              f"_kombu.binding_permanent.{settings.queue}"}
        keys.update(client.scan_iter(match=f"*{glob_literal(settings.queue)}*", count=1_000))
        return int(client.delete(*keys))
    except redis.RedisError:
        return 0  # a leftover key is no reason to fail the demo
    finally:
        client.close()


def print_summary(rows: list[ResultRecord], elapsed: float, echo: Echo) -> None:
    """Counts per label, accuracy on the labelled samples, throughput, latency, a few rows."""
    labels = Counter(r.label or f"({r.status})" for r in rows)
    latencies = sorted(r.latency_s for r in rows if r.latency_s is not None)
    # The demo sends each sample several times: accuracy counts each distinct text once.
    by_lang: dict[str, dict[str, bool]] = {}
    for r in rows:
        meta: dict[str, Any] = r.meta or {}
        by_lang.setdefault(meta.get("lang", "?"), {})[r.text_sha256] = (
            r.label == meta.get("expected"))
    echo("")
    echo(f"{'label':<12}{'count':>8}")
    for label, n in labels.most_common():
        echo(f"{label:<12}{n:>8}")
    for lang, by_text in sorted(by_lang.items()):
        hits = list(by_text.values())
        echo(f"accuracy on the {lang} samples: {100.0 * sum(hits) / len(hits):.1f}% "
             f"({len(hits)} distinct texts)")
    echo(f"throughput: {len(rows) / elapsed:.1f} texts/s end to end ({len(rows)} texts in {elapsed:.1f}s)")
    if latencies:
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        echo(f"latency submit -> committed row: p50 {statistics.median(latencies) * 1000:.0f} ms, "
             f"p99 {p99 * 1000:.0f} ms")
    echo("")
    echo("a few rows from the database:")
    # Spread the sample over the distinct texts (the demo repeats its samples).
    for r in rows[: len(rows) // 3 or len(rows)][:: 17][:6]:
        text = (r.text or "")[:40]
        echo(f"  {r.id[:8]}  {r.label or r.status:<9} {r.score or 0:.3f}  {text}")
