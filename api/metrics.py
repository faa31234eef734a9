"""The API's Prometheus metrics: requests, submitted items, coalescing, queue depth, workers.

One registry per app (tests build several). Queue depth per lane and live
workers are read from Redis when Prometheus scrapes, not polled; whether that
read worked is ``bertstream_redis_up``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from contract.constants import LANE_BULK, LANE_INTERACTIVE
from contract.errors import BertstreamError
from contract.liveness import live_workers


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
            "bertstream_api_message_items", "Items per published message of coalesced "
            "single submits", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry)
        self.latency = Histogram(
            "bertstream_api_request_seconds", "Request handling time by route", ["route"],
            registry=self.registry)

    def watch(self, client: Any, redis_client: Any, queue: str) -> None:
        """Also report queue depth per lane and live workers, read at scrape time."""
        self.registry.register(_QueueCollector(client, redis_client, queue))


class _QueueCollector(Collector):
    def __init__(self, client: Any, redis_client: Any, queue: str) -> None:
        self.client, self.redis, self.queue = client, redis_client, queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Queue depth and live workers when Redis answers (no made-up 0 when it does not),
        and ``bertstream_redis_up`` always: an alert on no live workers goes quiet while
        Redis is down, so that outage needs its own signal."""
        depth = GaugeMetricFamily("bertstream_queue_depth",
                                  "Messages waiting in Redis per lane", labels=["lane"])
        workers = GaugeMetricFamily("bertstream_workers_alive",
                                    "Workers whose heartbeat has not expired")
        try:
            for lane in (LANE_INTERACTIVE, LANE_BULK):
                depth.add_metric([lane], self.client.queue_length(lane))
            workers.add_metric([], len(live_workers(self.redis, self.queue)))
            up = 1
        except (BertstreamError, OSError, Exception):  # noqa: BLE001 - a scrape never fails
            up = 0
        yield GaugeMetricFamily("bertstream_redis_up", "1 when this scrape could read the "
                                "queues and worker heartbeats from Redis, else 0", value=up)
        if up:
            yield depth
            yield workers
