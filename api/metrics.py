"""The API's Prometheus metrics: requests, submitted items, coalescing, queue depth, workers.

One registry per app (tests build several). Queue depth per lane and live
workers are read from Redis when Prometheus scrapes, not polled; whether that
read worked is ``bertstream_redis_up``.
"""

from __future__ import annotations

import json
import re
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from contract.constants import (
    LANE_BULK,
    LANE_INTERACTIVE,
    MODEL_NAME_PATTERN,
    WORKER_KEY_PREFIX,
    model_family,
)
from contract.errors import BertstreamError
from contract.settings import Settings

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def family_workers(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The live workers of every model family of ``queue``, each with its ``family``: the
    default model's (``<queue>``) and each named model's (``<queue>-<name>``, see
    :func:`contract.constants.model_family`), read from their heartbeat keys.

    Every family counts, not only the API's default one: a deployment may serve named
    models only. The key must follow the family rule exactly, so another deployment's
    queue that merely starts with ``queue`` (``<queue>2``) is not counted.
    """
    prefix = f"{WORKER_KEY_PREFIX}{queue}"
    found: list[tuple[str, str, Any]] = []
    for key in client.scan_iter(match=_GLOB_SPECIAL.sub(r"\\\1", prefix) + "[-:]*",
                                count=500):
        rest = (key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key))[
            len(prefix):]
        if rest.startswith(":"):  # the default model's: <queue>:<host>
            found.append((queue, rest[1:], key))
            continue
        name, sep, host = rest[1:].partition(":")  # a named model's: <queue>-<name>:<host>
        if sep and re.fullmatch(MODEL_NAME_PATTERN, name):
            found.append((model_family(queue, name), host, key))
    found.sort()
    values = client.mget([key for _, _, key in found]) if found else []
    out = []
    for (family, host, _key), raw in zip(found, values, strict=True):
        if raw is None:
            continue  # expired between SCAN and MGET
        try:
            facts = json.loads(raw)
        except ValueError:
            facts = {}
        out.append({"hostname": host, "family": family,
                    **(facts if isinstance(facts, dict) else {})})
    return out


def by_family(workers: list[dict[str, Any]]) -> dict[str, int]:
    """Live workers per queue family, in name order."""
    return dict(sorted(Tally(w["family"] for w in workers).items()))


class ApiMetrics:
    """The counters and histograms the routes update, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bertstream_api_requests", "HTTP requests by route and status code",
            ["route", "status"], registry=self.registry)
        self.items = Counter(
            "bertstream_api_items", "Submitted items by lane and outcome "
            "(accepted, duplicate, conflict, invalid)", ["lane", "outcome"],
            registry=self.registry)
        self.message_items = Histogram(
            "bertstream_api_message_items", "Items per broker message published (coalesced "
            "single submits and bulks) by lane", ["lane"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.latency = Histogram(
            "bertstream_api_request_seconds", "Request handling time by route", ["route"],
            registry=self.registry)

    def published(self, lane: str, items: int) -> None:
        """One broker message of ``items`` items was published on ``lane``."""
        self.message_items.labels(lane).observe(items)

    def watch(self, client: Any, redis_client: Any, settings: Settings) -> None:
        """Also report queue depth per lane and live workers, read at scrape time."""
        self.registry.register(_QueueCollector(client, redis_client, settings))


class _QueueCollector(Collector):
    def __init__(self, client: Any, redis_client: Any, settings: Settings) -> None:
        self.client, self.redis, self.settings = client, redis_client, settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Queue depth and live workers when Redis answers (no made-up 0 when it does not),
        and ``bertstream_redis_up`` always: an alert on no live workers goes quiet while
        Redis is down, so that outage needs its own signal."""
        depth = GaugeMetricFamily("bertstream_queue_depth",
                                  "Messages waiting in Redis per lane", labels=["lane"])
        workers = GaugeMetricFamily("bertstream_workers_alive",
                                    "Workers of every model whose heartbeat has not expired")
        per_family = GaugeMetricFamily(
            "bertstream_family_workers_alive", "Workers whose heartbeat has not expired per "
            "queue family (<queue>, or <queue>-<name> for a named model; this server's own "
            "family always, 0 while it has none)", labels=["family"])
        try:
            for lane in (LANE_INTERACTIVE, LANE_BULK):
                depth.add_metric([lane], self.client.queue_length(lane))
            alive = family_workers(self.redis, self.settings.queue)
            workers.add_metric([], len(alive))
            counts = {self.settings.family: 0, **by_family(alive)}
            for family, count in sorted(counts.items()):
                per_family.add_metric([family], count)
            up = 1
        except (BertstreamError, OSError, Exception):  # noqa: BLE001 - a scrape never fails
            up = 0
        yield GaugeMetricFamily("bertstream_redis_up", "1 when this scrape could read the "
                                "queues and worker heartbeats from Redis, else 0", value=up)
        if up:
            yield depth
            yield workers
            yield per_family
