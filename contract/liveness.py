"""Worker liveness through Redis: each worker refreshes a key with a TTL; readers count them.

Celery's remote control (``ping``) is not relied on: it may be switched off,
and it would make every reader a broadcaster. A worker writes
``bertstream:workers:<family>:<hostname>`` (its pid, model and device as JSON)
every ``HEARTBEAT_EVERY_S`` with a TTL of ``HEARTBEAT_TTL_S``; a worker that
dies stops refreshing and its key expires. ``<family>`` is the queue family the
worker serves (``<queue>``, or ``<queue>-<name>`` for a named model, see
:func:`contract.constants.model_family`).

The host is whatever follows the family and its ``:``, colons included: a node
name given with ``worker --hostname`` may hold one. Queue names are matched
literally, so glob characters in them (``*``, ``?``, ``[``) match nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import redis

from contract.constants import MODEL_NAME_PATTERN, WORKER_KEY_PREFIX

HEARTBEAT_EVERY_S = 5.0
HEARTBEAT_TTL_S = 15

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def worker_key(queue: str, hostname: str) -> str:
    """The heartbeat key of worker ``hostname`` serving ``queue``."""
    return f"{WORKER_KEY_PREFIX}{queue}:{hostname}"


def glob_literal(text: str) -> str:
    """``text`` as a Redis ``SCAN MATCH`` pattern that matches only itself."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def is_family_of(family: str, queue: str) -> bool:
    """True when ``family`` is a queue family of ``queue``: ``queue`` itself (the default
    model's) or ``<queue>-<name>`` with a valid model name (a named model's)."""
    if family == queue:
        return True
    head, name = family[:len(queue) + 1], family[len(queue) + 1:]
    return head == queue + "-" and re.fullmatch(MODEL_NAME_PATTERN, name) is not None


def family_workers(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The live workers of every model family of ``queue``, each with its ``family``: the
    default model's (``<queue>``) and each named model's (``<queue>-<name>``), in
    (family, host) order.

    Every family counts, not only the caller's own: a deployment may serve named models
    only. The key must follow the family rule exactly, so another deployment's queue that
    merely starts with ``queue`` (``<queue>2``) is not counted.
    """
    prefix = f"{WORKER_KEY_PREFIX}{queue}"
    found = []
    for key in client.scan_iter(match=glob_literal(prefix) + "[-:]*", count=500):
        rest = _text(key)[len(prefix):]
        if rest.startswith(":"):  # the default model's: <queue>:<host>
            found.append((queue, rest[1:], key))
            continue
        name, sep, host = rest[1:].partition(":")  # a named model's: <queue>-<name>:<host>
        if sep and re.fullmatch(MODEL_NAME_PATTERN, name):
            found.append((f"{queue}-{name}", host, key))
    return _read(client, found)


def live_workers(client: redis.Redis, family: str) -> list[dict[str, Any]]:
    """The live workers of the one queue family ``family`` (as ``Settings.family`` names
    it), each with its ``family`` and their announced facts, in host order."""
    prefix = f"{WORKER_KEY_PREFIX}{family}:"
    keys = client.scan_iter(match=glob_literal(prefix) + "*", count=500)
    return _read(client, [(family, _text(key)[len(prefix):], key) for key in keys])


def _read(client: redis.Redis, found: Iterable[tuple[str, str, Any]]) -> list[dict[str, Any]]:
    """The facts under each ``(family, host, key)``, skipping keys that expired since the
    SCAN; a value that is not a JSON object counts as a worker that announced nothing.
    The family and host come from the key, whatever the value says."""
    found = sorted(found)
    values = client.mget([key for _, _, key in found]) if found else []
    out = []
    for (family, host, _key), raw in zip(found, values, strict=True):
        if raw is None:
            continue  # expired between SCAN and MGET
        try:
            facts = json.loads(raw)
        except ValueError:
            facts = None
        worker = {"hostname": host, "family": family,
                  **(facts if isinstance(facts, dict) else {})}
        worker.update(hostname=host, family=family)
        out.append(worker)
    return out


def _text(key: bytes | str) -> str:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
