"""A worker's ``/metrics`` answers quickly while its broker Redis is paused.

The queue-depth gauge read Redis in the scrape itself, with the configured socket timeout
(10 s by default): with Redis paused (SIGSTOP, ``DEBUG SLEEP``, a partition that leaves
TCP open) each scrape took that long, as long as Prometheus's default scrape timeout, so
the whole worker series went missing instead of ``bertstream_queue_depth`` alone. And
concurrent scrapes each held a connection of their own for that long. Now a scrape waits
for the read :data:`worker.metrics.DEPTH_WAIT_S` at most, one read at a time. A private
redis-server paused for real.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from bench.faults import RedisServer
from contract.broker import lane_queue
from contract.constants import LANE_BULK, LANE_INTERACTIVE
from contract.settings import Settings
from tests.test_metrics import _samples
from worker.metrics import WorkerMetrics, _QueueDepth
from worker.process import free_port

#: Well under Prometheus's default scrape timeout and the default socket timeout (10 s).
BOUND_S = 5.0


def _scrape(port: int) -> tuple[float, dict[str, float] | None, str]:
    """Seconds the scrape took, its depths by lane (None when absent), its text."""
    began = time.monotonic()
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    took = time.monotonic() - began
    depths = {dict(labels)["lane"]: value for (name, labels), value in _samples(text).items()
              if name == "bertstream_queue_depth"}
    return took, depths or None, text


def _connections_to(port: int) -> int:
    """Established TCP connections to 127.0.0.1:``port`` on this host (client side)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port and fields[3] == "01":
            count += 1
    return count


def test_a_scrape_answers_quickly_while_redis_is_paused(redis_server: RedisServer,
                                                       tmp_path: Path) -> None:
    """A worker's metrics endpoint with its Redis SIGSTOP'd: a scrape answers within the
    bound with the depth absent and ``bertstream_worker_up`` there, concurrent scrapes
    share one read and one connection, and the depth comes back after SIGCONT (each
    scrape waited the 10 s socket timeout)."""
    assert redis_server.proc is not None
    settings = Settings(broker_url=redis_server.url, database_url=f"sqlite:///{tmp_path}/r.db",
                        queue=f"bst-pause-{uuid.uuid4().hex[:8]}", model="null",
                        redis_socket_timeout_s=10, redis_connect_timeout_s=5)
    admin = redis.Redis.from_url(redis_server.url)
    try:
        admin.rpush(lane_queue(settings, False), "a", "b")
        admin.rpush(lane_queue(settings, True), "c")
    finally:
        admin.close()
    expected = {LANE_INTERACTIVE: 2.0, LANE_BULK: 1.0}
    metrics = WorkerMetrics("null")
    metrics.consuming(True)
    metrics.beat(True)
    port = free_port()
    metrics.serve(port, settings)
    took, depths, text = _scrape(port)
    assert depths == expected, text

    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        took, depths, text = _scrape(port)
        assert took < BOUND_S, f"a scrape took {took:.1f}s with Redis paused"
        assert depths is None, text  # absent, not a made-up 0
        assert 'bertstream_model_info{model="null"' in text, text  # the rest answers
        metrics.beat(False)  # the heartbeat's failure, as the worker's own would report it
        # concurrent scrapes answer in time too, and share one read (one connection)
        results: list[tuple[float, dict[str, float] | None, str]] = []
        threads = [threading.Thread(target=lambda: results.append(_scrape(port)))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert len(results) == 4
        for took, depths, text in results:
            assert took < BOUND_S, f"a concurrent scrape took {took:.1f}s with Redis paused"
            assert depths is None, text
            assert "bertstream_worker_up 0.0" in text, text
        assert _connections_to(redis_server.port) <= 1
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)

    deadline = time.monotonic() + BOUND_S
    while True:  # back with Redis: the read under way answers, the next scrape reads again
        took, depths, text = _scrape(port)
        if depths is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert depths == expected, text


def _read_ended(name: str) -> None:
    """Wait until no thread ``name`` (a collector's Redis read) runs."""
    deadline = time.monotonic() + 15
    while any(t.name == name for t in threading.enumerate()):
        assert time.monotonic() < deadline, f"{name} still runs"
        time.sleep(0.05)


def test_a_redis_slower_than_the_wait_still_gives_the_depth(redis_server: RedisServer,
                                                            tmp_path: Path) -> None:
    """A Redis that answers every read, but only after the scrape's wait: the read that
    answered too late for its scrape serves the next one whose own read is late, once.
    Each scrape's read was thrown away when its scrape gave up, so every scrape of such a
    Redis lacked the depth although every read succeeded."""
    assert redis_server.proc is not None
    settings = Settings(broker_url=redis_server.url, database_url=f"sqlite:///{tmp_path}/r.db",
                        queue=f"bst-slow-{uuid.uuid4().hex[:8]}", model="null",
                        redis_socket_timeout_s=10, redis_connect_timeout_s=5)
    admin = redis.Redis.from_url(redis_server.url)
    metrics = WorkerMetrics("null")
    port = free_port()
    metrics.serve(port, settings)
    try:
        assert _scrape(port)[1] == {LANE_INTERACTIVE: 0.0, LANE_BULK: 0.0}
        admin.rpush(lane_queue(settings, False), "a", "b")

        def late_scrape() -> dict[str, float] | None:
            """A scrape whose read Redis answers only after the scrape gave up on it."""
            redis_server.proc.send_signal(signal.SIGSTOP)
            try:
                took, depths, text = _scrape(port)
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
            assert took < BOUND_S, text
            _read_ended("bertstream-queue-depth")
            return depths

        assert late_scrape() is None  # no earlier read answered late
        admin.rpush(lane_queue(settings, True), "c")  # read by the next read, not served yet
        assert late_scrape() == {LANE_INTERACTIVE: 2.0, LANE_BULK: 0.0}  # the late one's
        assert late_scrape() == {LANE_INTERACTIVE: 2.0, LANE_BULK: 1.0}
        assert _scrape(port)[1] == {LANE_INTERACTIVE: 2.0, LANE_BULK: 1.0}  # in time again
        redis_server.proc.send_signal(signal.SIGSTOP)  # the late depths served once only
        try:
            assert _scrape(port)[1] is None
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
    finally:
        admin.close()


def test_a_read_thread_that_cannot_start_does_not_wedge_the_depth(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread to be had for a scrape's read (``can't start new thread``: a pids limit):
    that scrape shows no depth, and the next one reads it again. The read was left marked
    as under way with no thread to end it, so every later scrape waited for it the whole
    wait and showed no depth, for good; the first scrape failed outright."""
    settings = Settings(broker_url=redis_url, database_url=f"sqlite:///{tmp_path}/r.db",
                        queue=f"bst-nothread-{uuid.uuid4().hex[:8]}", model="null")
    collector = _QueueDepth(settings)
    start = threading.Thread.start

    def refused(thread: threading.Thread) -> None:
        if thread.name.startswith("bertstream-"):
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refused)
    assert list(collector.collect()) == []
    monkeypatch.setattr(threading.Thread, "start", start)
    began = time.monotonic()
    families = list(collector.collect())
    assert time.monotonic() - began < BOUND_S / 2
    assert {s.labels["lane"]: s.value for s in families[0].samples} == {
        LANE_INTERACTIVE: 0, LANE_BULK: 0}
