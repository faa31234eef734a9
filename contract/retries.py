"""Retrying a failed or expired task under its own id.

A task id names one text. Sent again with that text after its row was
stored ``failed`` or ``expired``, the task is queued again and the new
attempt replaces the row (``attempts`` + 1). Until that attempt is stored,
the old row is still there: one marker per task in Redis (under
:data:`RETRYING_KEY_PREFIX`) names the row being replaced, so that a status
read says ``queued`` and a wait waits for the new attempt instead of
returning the old row. The HTTP API also queues each stored attempt's retry
once (a second send meanwhile is a duplicate); the Python client queues
whatever it is given, as for any task.
"""

from __future__ import annotations

from contract.constants import RETRYING_KEY_PREFIX, STATUS_DONE

#: Mark each row to retry unless it is marked already: ``SET <key> <value> EX <ttl>`` where
#: the key does not already hold that value. Keys and values travel NUL-separated (neither
#: holds NUL); the reply lists the 1-based indexes marked now. Standalone Redis: the keys
#: are not declared up front, as a cluster needs.
MARK_RETRIES = """
local ttl = ARGV[1]
local keys, values = {}, {}
for k in string.gmatch(ARGV[2], "[^%z]+") do keys[#keys + 1] = k end
for v in string.gmatch(ARGV[3], "[^%z]+") do values[#values + 1] = v end
local out = {}
for i = 1, #keys do
  if redis.call('GET', keys[i]) ~= values[i] then
    redis.call('SET', keys[i], values[i], 'EX', ttl)
    out[#out + 1] = i
  end
end
return out
"""


def retry_key(queue: str, task_id: str) -> str:
    """The Redis key of ``task_id``'s retry marker (one per task, whichever model)."""
    return f"{RETRYING_KEY_PREFIX}{queue}:{task_id}"


def retry_marker(attempts: int, model: str, target: str) -> str:
    """What the marker holds while a retry of the row (``attempts``, ``model``) is queued
    for the model named ``target`` ('' for the default model). The new attempt's row
    differs in one of the two: its attempts, or its model."""
    return f"{attempts}\t{model}\t{target}"


def retriable(status: str) -> bool:
    """Whether a row of this status is queued again when its id and text are sent again."""
    return status != STATUS_DONE


def is_retrying(marker: str | None, attempts: int, model: str, asked: str | None) -> bool:
    """Whether ``marker`` says a retry of the row (``attempts``, ``model``) is queued, for a
    read of model ``asked`` (None: the task's latest row).

    A retry sent to the default model is taken for the row's own model (the default
    model's stored name is its workers'); one sent to a named model counts for that
    model's reads only."""
    if marker is None:
        return False
    held_attempts, held_model, target = (marker.split("\t") + ["", ""])[:3]
    if held_attempts != str(attempts) or held_model != model:
        return False
    return asked is None or target in (asked, "")
