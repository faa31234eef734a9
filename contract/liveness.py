"""Worker liveness through Redis: each worker refreshes a key with a TTL; readers count them.

Celery's remote control (``ping``) is not relied on: it may be switched off,
and it would make every reader a broadcaster. A worker writes
``bertstream:workers:<queue>:<hostname>`` (its pid, model and device as JSON)
every ``HEARTBEAT_EVERY_S`` with a TTL of ``HEARTBEAT_TTL_S``; a worker that
dies stops refreshing and its key expires.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from contract.constants import WORKER_KEY_PREFIX

HEARTBEAT_EVERY_S = 5.0
HEARTBEAT_TTL_S = 15


def worker_key(queue: str, hostname: str) -> str:
    """The heartbeat key of worker ``hostname`` serving ``queue``."""
    return f"{WORKER_KEY_PREFIX}{queue}:{hostname}"


def live_workers(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The workers of ``queue`` whose heartbeat has not expired (their announced facts)."""
    keys = sorted(client.scan_iter(match=f"{WORKER_KEY_PREFIX}{queue}:*", count=500))
    if not keys:
        return []
    values = client.mget(keys)
    out = []
    for key, raw in zip(keys, values, strict=True):
        if raw is None:
            continue  # expired between SCAN and MGET
        try:
            facts = json.loads(raw)
        except ValueError:
            facts = {}
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        out.append({"hostname": name.rsplit(":", 1)[-1], **facts})
    return out
