"""The API's Prometheus metrics: requests, submitted items, coalescing, queue depth, workers.

One registry per app (tests build several). Queue depth per lane (of this
server's queue family, and of every family of its queue) and live workers are
read from Redis when Prometheus scrapes, not polled; whether that read worked
is ``bertstream_redis_up``.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from kombu.transport.redis import Channel as RedisChannel
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from contract.broker import lane_keys
from contract.constants import LANE_BULK, LANE_INTERACTIVE, queue_name
from contract.errors import BertstreamError
from contract.liveness import family_workers, is_family_of
from contract.settings import Settings

LANES = (LANE_INTERACTIVE, LANE_BULK)

#: Queue families ``bertstream_family_queue_depth`` has a label for at most; the
#: shallowest of the rest are summed under ``other`` (clients may name made-up models).
MAX_DEPTH_FAMILIES = 100


def by_family(workers: list[dict[str, Any]]) -> dict[str, int]:
    """Live workers per queue family, in name order."""
    return dict(sorted(Tally(w["family"] for w in workers).items()))


def bound_families(client: redis.Redis, queue: str) -> set[str]:
    """The queue families of ``queue`` whose lanes kombu has bound: every family's lanes
    are bound to one exchange named after ``queue`` (:func:`contract.broker.make_celery`)
    by whoever declared them, a producer publishing or a worker consuming.

    kombu delivers a message only to a queue bound to its exchange, so every family with
    messages waiting is among them, whether or not a worker serves it; the set is read
    without walking the keyspace. Bindings outlive their queues: a family found here
    may be empty.
    """
    out = set()
    for member in client.smembers(RedisChannel.keyprefix_queue % (queue,)):
        text = member.decode("utf-8", "replace") if isinstance(member, bytes) else str(member)
        family, _, lane = text.rpartition(RedisChannel.sep)[2].rpartition(".")
        if lane in LANES and is_family_of(family, queue):
            out.add(family)
    return out


def family_depths(client: redis.Redis, families: Iterable[str]) -> dict[str, dict[str, int]]:
    """Messages waiting per lane of each of ``families``, read in one round trip."""
    lists = [(family, lane, lane_keys(queue_name(family, lane)))
             for family in sorted(set(families)) for lane in LANES]
    with client.pipeline(transaction=False) as pipe:
        for _, _, keys in lists:
            for key in keys:
                pipe.llen(key)
        sizes = iter(pipe.execute())
    out: dict[str, dict[str, int]] = {}
    for family, lane, keys in lists:
        out.setdefault(family, {})[lane] = sum(int(next(sizes)) for _ in keys)
    return out


def shown_depths(depths: dict[str, dict[str, int]], always: Iterable[str],
                 limit: int = MAX_DEPTH_FAMILIES) -> dict[str, dict[str, int]]:
    """The families ``bertstream_family_queue_depth`` reports: those in ``always`` (this
    server's own, those with live workers) even when empty, and every other one with
    messages waiting (an empty family without workers is a leftover binding). Past
    ``limit`` families the shallowest are summed under ``other``, so that the total
    stays right."""
    total = {family: sum(lanes.values()) for family, lanes in depths.items()}
    keep = sorted(f for f in set(always) if f in depths)
    rest = sorted((f for f in depths if f not in keep and total[f]),
                  key=lambda f: (-total[f], f))
    room = max(limit - len(keep), 0)
    out = {f: depths[f] for f in keep + rest[:room]}
    if rest[room:]:
        out["other"] = {lane: sum(depths[f][lane] for f in rest[room:]) for lane in LANES}
    return out


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

    def watch(self, redis_client: Any, settings: Settings) -> None:
        """Also report queue depth per lane and live workers, read at scrape time."""
        self.registry.register(_QueueCollector(redis_client, settings))


class _QueueCollector(Collector):
    def __init__(self, redis_client: Any, settings: Settings) -> None:
        self.redis, self.settings = redis_client, settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Queue depth and live workers when Redis answers (no made-up 0 when it does not),
        and ``bertstream_redis_up`` always: an alert on no live workers goes quiet while
        Redis is down, so that outage needs its own signal.

        Queue depth per family covers this server's own family, every family with live
        workers and every family with messages waiting (:func:`bound_families`): tasks
        sent to a model no worker serves show up there."""
        depth = GaugeMetricFamily("bertstream_queue_depth", "Messages waiting in Redis per "
                                  "lane of this server's queue family", labels=["lane"])
        per_family_depth = GaugeMetricFamily(
            "bertstream_family_queue_depth", "Messages waiting in Redis per queue family "
            "(<queue>, or <queue>-<name> for a named model) and lane: this server's own "
            "family and every family with live workers always, any other while it holds "
            "messages", labels=["family", "lane"])
        workers = GaugeMetricFamily("bertstream_workers_alive",
                                    "Workers of every model whose heartbeat has not expired")
        per_family = GaugeMetricFamily(
            "bertstream_family_workers_alive", "Workers whose heartbeat has not expired per "
            "queue family (<queue>, or <queue>-<name> for a named model; this server's own "
            "family always, 0 while it has none)", labels=["family"])
        own, queue = self.settings.family, self.settings.queue
        try:
            alive = family_workers(self.redis, queue)
            served = {own, *(w["family"] for w in alive)}
            depths = family_depths(self.redis, served | bound_families(self.redis, queue))
            for lane in LANES:
                depth.add_metric([lane], depths[own][lane])
            for family, lanes in sorted(shown_depths(depths, served).items()):
                for lane in LANES:
                    per_family_depth.add_metric([family, lane], lanes[lane])
            workers.add_metric([], len(alive))
            counts = {own: 0, **by_family(alive)}
            for family, count in sorted(counts.items()):
                per_family.add_metric([family], count)
            up = 1
        except (BertstreamError, OSError, Exception):  # noqa: BLE001 - a scrape never fails
            up = 0
        yield GaugeMetricFamily("bertstream_redis_up", "1 when this scrape could read the "
                                "queues and worker heartbeats from Redis, else 0", value=up)
        if up:
            yield depth
            yield per_family_depth
            yield workers
            yield per_family
