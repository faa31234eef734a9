"""The API's ``/metrics`` answers quickly while its broker Redis is paused.

The gauges read from Redis at scrape time (queue depths, bound queues, live workers,
``bertstream_redis_up``) were read in the scrape itself, with the configured socket
timeout (10 s by default): with Redis paused (SIGSTOP, ``DEBUG SLEEP``, a partition that
leaves TCP open) each scrape took that long, as long as Prometheus's default scrape
timeout, so the API's whole series went missing instead of ``bertstream_redis_up``
reading 0, and concurrent scrapes each held a Redis connection for that long. Now a
scrape waits for the read :data:`api.metrics.REDIS_READ_WAIT_S` at most, one read at a
time per server process. A real ``bertstream serve`` (one process, and two sharing their
counts) on a private redis-server paused for real.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import ApiMetrics
from bench.faults import RedisServer
from contract.broker import lane_queue
from contract.constants import LANE_BULK, LANE_INTERACTIVE
from contract.settings import Settings
from tests.test_worker_scrape_paused_redis import _connections_to

#: Well under Prometheus's default scrape timeout and the default socket timeout (10 s).
BOUND_S = 5.0
#: The families read from Redis, left out while it does not answer (no made-up 0).
READ_FAMILIES = {"bertstream_queue_depth", "bertstream_family_queue_depth",
                 "bertstream_bound_queues", "bertstream_bound_queues_unexamined",
                 "bertstream_workers_alive", "bertstream_family_workers_alive"}


class Scrape:
    def __init__(self, url: str) -> None:
        began = time.monotonic()
        self.text = httpx.get(url + "/metrics", timeout=30).text
        self.took = time.monotonic() - began
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}

    def value(self, name: str) -> float:
        return float(self.families[name].samples[0].value)

    def depths(self) -> dict[str, float] | None:
        family = self.families.get("bertstream_queue_depth")
        return None if family is None else {s.labels["lane"]: s.value for s in family.samples}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_scrape_answers_quickly_while_redis_is_paused(redis_server: RedisServer,
                                                       api_factory: Any, tmp_path: Path,
                                                       workers: int) -> None:
    """``bertstream serve`` (one process, and two in multiprocess mode) with its Redis
    SIGSTOP'd: a scrape answers within the bound with ``bertstream_redis_up`` 0 and the
    Redis-read families absent, concurrent scrapes do not pile up connections, and the
    depths come back after SIGCONT (each scrape waited the 10 s socket timeout)."""
    assert redis_server.proc is not None
    settings = Settings(broker_url=redis_server.url, database_url=f"sqlite:///{tmp_path}/r.db",
                        queue=f"bst-pause-{uuid.uuid4().hex[:8]}",
                        redis_socket_timeout_s=10, redis_connect_timeout_s=5)
    admin = redis.Redis.from_url(redis_server.url)
    try:
        admin.rpush(lane_queue(settings, False), "a", "b")
        admin.rpush(lane_queue(settings, True), "c")
    finally:
        admin.close()
    expected = {LANE_INTERACTIVE: 2.0, LANE_BULK: 1.0}
    api = api_factory(settings, *(("--workers", str(workers)) if workers > 1 else ()))
    for _ in range(2 * workers):  # each process scraped once, likely
        scrape = Scrape(api.url)
        assert scrape.value("bertstream_redis_up") == 1.0, scrape.text
        assert scrape.depths() == expected, scrape.text
    before = _connections_to(redis_server.port)

    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        scrape = Scrape(api.url)
        assert scrape.took < BOUND_S, f"a scrape took {scrape.took:.1f}s with Redis paused"
        assert scrape.value("bertstream_redis_up") == 0.0, scrape.text
        assert scrape.value("bertstream_broker_misconfigured") == 0.0, scrape.text
        assert not READ_FAMILIES & set(scrape.families), scrape.text  # absent, not 0
        assert "bertstream_database_up" in scrape.families, scrape.text  # the rest answers
        assert "bertstream_api_requests" in scrape.families, scrape.text
        # concurrent scrapes answer in time too, and share a read (a connection) per process
        results: list[Scrape] = []
        threads = [threading.Thread(target=lambda: results.append(Scrape(api.url)))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert len(results) == 4
        for scrape in results:
            assert scrape.took < BOUND_S, (f"a concurrent scrape took {scrape.took:.1f}s "
                                           f"with Redis paused")
            assert scrape.value("bertstream_redis_up") == 0.0, scrape.text
            assert not READ_FAMILIES & set(scrape.families), scrape.text
        assert _connections_to(redis_server.port) <= before + workers
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)

    deadline = time.monotonic() + BOUND_S
    while True:  # back with Redis: the reads under way answer, the next scrapes read again
        scrape = Scrape(api.url)
        if scrape.value("bertstream_redis_up") == 1.0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert scrape.value("bertstream_redis_up") == 1.0, scrape.text
    assert scrape.depths() == expected, scrape.text


def test_a_redis_slower_than_the_wait_still_reads_as_up(redis_server: RedisServer,
                                                        tmp_path: Path) -> None:
    """A Redis that answers every read, but only after the scrape's wait: the read that
    answered too late for its scrape serves the next one whose own read is late, once.
    Each scrape's read was thrown away when its scrape gave up, so such a Redis read as
    down (``bertstream_redis_up`` 0, no depths) at every scrape although every read
    succeeded."""
    assert redis_server.proc is not None
    settings = Settings(broker_url=redis_server.url, database_url=f"sqlite:///{tmp_path}/r.db",
                        queue=f"bst-slow-{uuid.uuid4().hex[:8]}",
                        redis_socket_timeout_s=10, redis_connect_timeout_s=5)
    admin = redis.Redis.from_url(redis_server.url)
    client = redis.Redis.from_url(redis_server.url, socket_timeout=10, socket_connect_timeout=5)
    metrics = ApiMetrics()
    metrics.watch(client, settings)

    def scrape() -> tuple[float, dict[str, float] | None]:
        families = {f.name: f for f in text_string_to_metric_families(
            generate_latest(metrics.registry).decode())}
        depth = families.get("bertstream_queue_depth")
        return (families["bertstream_redis_up"].samples[0].value,
                None if depth is None else {s.labels["lane"]: s.value for s in depth.samples})

    def late_scrape() -> tuple[float, dict[str, float] | None]:
        """A scrape whose read Redis answers only after the scrape gave up on it."""
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            began = time.monotonic()
            got = scrape()
            assert time.monotonic() - began < BOUND_S
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 15
        while any(t.name == "bertstream-redis-gauges" for t in threading.enumerate()):
            assert time.monotonic() < deadline, "the read still runs"
            time.sleep(0.05)
        return got

    try:
        assert scrape() == (1.0, {LANE_INTERACTIVE: 0.0, LANE_BULK: 0.0})
        admin.rpush(lane_queue(settings, False), "a", "b")
        assert late_scrape() == (0.0, None)  # no earlier read answered late
        admin.rpush(lane_queue(settings, True), "c")  # read by the next read, not served yet
        assert late_scrape() == (1.0, {LANE_INTERACTIVE: 2.0, LANE_BULK: 0.0})  # the late one's
        assert late_scrape() == (1.0, {LANE_INTERACTIVE: 2.0, LANE_BULK: 1.0})
        assert scrape() == (1.0, {LANE_INTERACTIVE: 2.0, LANE_BULK: 1.0})  # in time again
        redis_server.proc.send_signal(signal.SIGSTOP)  # the late reading served once only
        try:
            assert scrape() == (0.0, None)
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
    finally:
        admin.close()
        client.close()


def test_a_read_thread_that_cannot_start_does_not_wedge_the_gauges(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread to be had for a scrape's read (``can't start new thread``: a pids limit):
    that scrape reads Redis as down, and the next one reads it again. The read was left
    marked as under way with no thread to end it, so every later scrape waited for it the
    whole wait and read ``bertstream_redis_up`` 0, for good; the first scrape failed
    outright."""
    settings = Settings(broker_url=redis_url, queue=f"bst-nothread-{uuid.uuid4().hex[:8]}")
    client = redis.Redis.from_url(redis_url)
    metrics = ApiMetrics()
    metrics.watch(client, settings)
    start = threading.Thread.start

    def refused(thread: threading.Thread) -> None:
        if thread.name.startswith("bertstream-"):
            raise RuntimeError("can't start new thread")
        start(thread)

    def redis_up() -> float:
        families = text_string_to_metric_families(generate_latest(metrics.registry).decode())
        return next(f for f in families if f.name == "bertstream_redis_up").samples[0].value

    try:
        monkeypatch.setattr(threading.Thread, "start", refused)
        assert redis_up() == 0.0
        monkeypatch.setattr(threading.Thread, "start", start)
        began = time.monotonic()
        assert redis_up() == 1.0
        assert time.monotonic() - began < BOUND_S / 2
    finally:
        client.close()
