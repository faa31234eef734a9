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

Readers do not SCAN the database for these keys (it also holds a claim per item the API
accepted, millions of keys): in the same transaction as its key, a heartbeat lists the key
in a sorted set per queue, ``bertstream:workers-index:<queue>`` (score: when the key
expires, by the Redis server's clock), in the index of every queue its family is a family of
(:func:`index_queues`), so the index of ``q`` lists what :func:`family_workers` counts for
``q``. A reader takes the index's members and reads their keys in one MGET: two round
trips whatever else the database holds. The keys stay the truth: a member whose key
expired is skipped, so a worker that dies disappears when its key expires, as before.
Writers prune members expired for over :data:`INDEX_GRACE_S` and keep the index under the
heartbeat's TTL, so it goes away soon after the last worker it lists.

Scores and pruning use the server's clock (``TIME``), never the writer's: workers run on
several hosts whose clocks drift apart, and a writer pruning by its own clock removed the
members of a host whose clock was behind by more than ``INDEX_GRACE_S`` plus the TTL, so
readers saw that live worker come and go between its beats.

The index is the only way in: a key that no index lists is not a worker (a reader that
fell back to a SCAN where a queue has no index would pay the whole database's price
exactly when no worker is alive, on every scrape and readiness probe).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import redis

from contract.clock import server_time
from contract.constants import MODEL_NAME_PATTERN, WORKER_KEY_PREFIX

HEARTBEAT_EVERY_S = 5.0
HEARTBEAT_TTL_S = 15
#: Key prefix of the index of a queue's heartbeats (a sorted set, see above). Not under
#: ``WORKER_KEY_PREFIX``: a pattern over the heartbeat keys must not take it for one.
INDEX_KEY_PREFIX = "bertstream:workers-index:"
#: A writer prunes members whose key expired more than this long ago (by the server's
#: clock, as their scores): room for a beat that is late (a slow or paused writer).
INDEX_GRACE_S = 4 * HEARTBEAT_TTL_S

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


def index_key(queue: str) -> str:
    """The key of the index of the heartbeats that count for ``queue``."""
    return f"{INDEX_KEY_PREFIX}{queue}"


def index_queues(family: str) -> list[str]:
    """The queues whose :func:`family_workers` count a worker of ``family``, so whose
    index lists it: ``family`` itself and each queue it is a model family of
    (``q-v2.1`` counts for ``q-v2.1`` and ``q``), by :func:`is_family_of`. Derived from
    the name, as the key readers matched it, so the index answers what a SCAN did."""
    return [family] + [family[:at] for at, char in enumerate(family)
                       if char == "-" and at and is_family_of(family, family[:at])]


def announce(client: redis.Redis, family: str, hostname: str, value: str) -> None:
    """Write ``hostname``'s heartbeat key (``value``, TTL :data:`HEARTBEAT_TTL_S`) and
    list it in its queues' indexes, pruning them, all in one transaction; two round trips
    (the server's ``TIME``, then the transaction: see the module's docstring)."""
    key, now = worker_key(family, hostname), server_time(client)
    with client.pipeline(transaction=True) as pipe:
        pipe.set(key, value, ex=HEARTBEAT_TTL_S)
        for queue in index_queues(family):
            pipe.zadd(index_key(queue), {key: now + HEARTBEAT_TTL_S})
            pipe.zremrangebyscore(index_key(queue), "-inf", f"({now - INDEX_GRACE_S}")
            # Every beat sets the same TTL: the index lasts as long as its freshest key.
            pipe.expire(index_key(queue), HEARTBEAT_TTL_S)
        pipe.execute()


def withdraw(client: redis.Redis, family: str, hostname: str) -> None:
    """Delete ``hostname``'s heartbeat key and its index members in one transaction (an
    index left empty goes with its last member)."""
    key = worker_key(family, hostname)
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        for queue in index_queues(family):
            pipe.zrem(index_key(queue), key)
        pipe.execute()


def family_workers(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The live workers of every model family of ``queue``, each with its ``family``: the
    default model's (``<queue>``) and each named model's (``<queue>-<name>``), in
    (family, host) order.

    Every family counts, not only the caller's own: a deployment may serve named models
    only. The key must follow the family rule exactly, so another deployment's queue that
    merely starts with ``queue`` (``<queue>2``) is not counted. Two round trips
    whatever else the database holds (see the module's docstring).
    """
    prefix = f"{WORKER_KEY_PREFIX}{queue}"
    found = []
    for key in _indexed(client, queue):
        text = _text(key)
        if not text.startswith(prefix):
            continue
        rest = text[len(prefix):]
        if rest.startswith(":"):  # the default model's: <queue>:<host>
            found.append((queue, rest[1:], key))
            continue
        if not rest.startswith("-"):
            continue
        name, sep, host = rest[1:].partition(":")  # a named model's: <queue>-<name>:<host>
        if sep and re.fullmatch(MODEL_NAME_PATTERN, name):
            found.append((f"{queue}-{name}", host, key))
    return _read(client, found)


def live_workers(client: redis.Redis, family: str) -> list[dict[str, Any]]:
    """The live workers of the one queue family ``family`` (as ``Settings.family`` names
    it), each with its ``family`` and their announced facts, in host order. Read from
    the index of the queue ``family`` (it lists that family's workers among others), as
    :func:`family_workers`."""
    prefix = f"{WORKER_KEY_PREFIX}{family}:"
    return _read(client, [(family, text[len(prefix):], key) for key in _indexed(client, family)
                          if (text := _text(key)).startswith(prefix)])


def _indexed(client: redis.Redis, queue: str) -> list[Any]:
    """The keys ``queue``'s index lists (none where it has no index: no worker)."""
    return list(client.zrange(index_key(queue), 0, -1))


def _read(client: redis.Redis, found: Iterable[tuple[str, str, Any]]) -> list[dict[str, Any]]:
    """The facts under each ``(family, host, key)``, skipping keys that expired (an index
    member outlives its key a while); a value that is not a
    JSON object counts as a worker that announced nothing.
    The family and host come from the key, whatever the value says."""
    found = sorted(found)
    values = client.mget([key for _, _, key in found]) if found else []
    out = []
    for (family, host, _key), raw in zip(found, values, strict=True):
        if raw is None:
            continue  # expired, or deleted by a clean stop
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
