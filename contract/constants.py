"""Names shared by every hop: one place for queue names, task names, tables."""

from __future__ import annotations

#: Celery task name of the micro-batched analysis task.
TASK_ANALYZE = "bertstream.analyze"

#: Default queue; the worker consumes it, the producer routes to it.
#: A lane suffix separates interactive from bulk traffic (DESIGN.md).
DEFAULT_QUEUE = "bertstream"
LANE_INTERACTIVE = "interactive"
LANE_BULK = "bulk"

#: The results table (our own, not Celery's result backend: DESIGN.md).
RESULTS_TABLE = "bertstream_results"

#: Redis key prefix of the per-message delivery counters (dead-lettering).
DELIVERY_KEY_PREFIX = "bertstream:deliveries:"

#: Redis key prefix of the ids the HTTP API accepted (value: the text's SHA-256).
ACCEPTED_KEY_PREFIX = "bertstream:accepted:"

#: Redis key prefix of worker heartbeats (one key per live worker, with a TTL).
WORKER_KEY_PREFIX = "bertstream:workers:"

#: The name the bundled model is referred to by in BERTSTREAM_MODEL.
DEFAULT_MODEL = "default"

#: Result statuses as stored.
STATUS_DONE = "done"
STATUS_FAILED = "failed"
STATUSES = (STATUS_DONE, STATUS_FAILED)

#: Environment variable prefix of every setting.
ENV_PREFIX = "BERTSTREAM_"


def queue_name(base: str, lane: str) -> str:
    """The Redis/Celery queue for ``lane`` of the queue family ``base``."""
    return f"{base}.{lane}"
