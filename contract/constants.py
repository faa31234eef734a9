"""Names shared by every hop: one place for queue names, task names, tables."""

from __future__ import annotations

#: Celery task name of the micro-batched analysis task.
TASK_ANALYZE = "bertstream.analyze"

#: Default queue; the worker consumes it, the producer routes to it.
#: A lane suffix separates interactive from bulk traffic.
DEFAULT_QUEUE = "bertstream"
LANE_INTERACTIVE = "interactive"
LANE_BULK = "bulk"

#: The results table (our own, not Celery's result backend).
RESULTS_TABLE = "bertstream_results"
#: Per-window scores of texts scored in windows (long texts), child of the results table.
WINDOWS_TABLE = "bertstream_windows"
#: ``BERTSTREAM_LONG_TEXTS``: score a text past the model's maximum in windows, or cut it.
LONG_TEXTS_CHUNK = "chunk"
LONG_TEXTS_TRUNCATE = "truncate"
LONG_TEXT_MODES = (LONG_TEXTS_CHUNK, LONG_TEXTS_TRUNCATE)
#: Language codes stored per row.
LANGS = ("zh", "en", "mixed", "other")
#: Alembic's revision table (its own name, so a shared database's alembic_version is left alone).
MIGRATIONS_TABLE = "bertstream_alembic_version"

#: Redis key prefix of the per-message delivery counters (dead-lettering).
DELIVERY_KEY_PREFIX = "bertstream:deliveries:"

#: Redis key prefix of the ids the HTTP API accepted (value: the text's SHA-256).
ACCEPTED_KEY_PREFIX = "bertstream:accepted:"
#: ... and of the same ids whichever model they went to (value: that model's queue
#: family), so that a status asked without a model finds a task sent to a named one.
ACCEPTED_ANY_KEY_PREFIX = "bertstream:accepted-any:"
#: Redis key prefix of the retry markers of tasks whose failed or expired row was queued
#: again (see :mod:`contract.retries`).
RETRYING_KEY_PREFIX = "bertstream:retrying:"

#: Redis key prefix of worker heartbeats (one key per live worker, with a TTL).
WORKER_KEY_PREFIX = "bertstream:workers:"

#: The name the bundled model is referred to by in BERTSTREAM_MODEL.
DEFAULT_MODEL = "default"

#: Characters the ``id`` and ``source`` columns hold. Every id and source
#: tag is checked against it on both sides; a larger
#: ``BERTSTREAM_MAX_ID_CHARS`` is refused at start.
ID_COLUMN_CHARS = 128

#: Prefix of the row key an item gets when its own id cannot be stored.
MALFORMED_PREFIX = "malformed-"

#: Result statuses as stored. ``expired``: the task's deadline passed before
#: it reached the model, so it was never run.
STATUS_DONE = "done"
STATUS_FAILED = "failed"
STATUS_EXPIRED = "expired"
STATUSES = (STATUS_DONE, STATUS_FAILED, STATUS_EXPIRED)

#: Environment variable prefix of every setting.
ENV_PREFIX = "BERTSTREAM_"
#: prometheus_client's setting, the directory where every process writes its counts:
#: ``serve --workers N``'s (api/metrics.py); a worker ignores it (worker/cli.py). The
#: lower-case spelling is its deprecated one, which it still reads.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MULTIPROC_ENV_OLD = "prometheus_multiproc_dir"


#: What a model name may look like (``worker --model NAME=PATH``, ``submit --model NAME``).
MODEL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"


def served_name(model: str | None) -> str:
    """The name a task's model goes by in settings and queues: "" (the default model) for
    None, "" and :data:`DEFAULT_MODEL`, as ``worker --model default=PATH`` reads it, so
    that a producer naming ``default`` sends to the queue family that worker serves."""
    return "" if not model or model == DEFAULT_MODEL else model


def model_family(base: str, model_name: str) -> str:
    """The queue family of the model named ``model_name`` ("": the default model's, ``base``)."""
    return f"{base}-{model_name}" if model_name else base


def queue_name(base: str, lane: str) -> str:
    """The Redis/Celery queue for ``lane`` of the queue family ``base``."""
    return f"{base}.{lane}"
