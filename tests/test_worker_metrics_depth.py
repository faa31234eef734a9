"""The worker's ``bertstream_queue_depth`` counts what the producer's ``queue_length``
counts: the lane's list and its priority-step lists, where kombu's Redis transport puts
a message sent with a priority other than the default."""

from __future__ import annotations

import uuid

import httpx
import redis

from contract.broker import lane_keys, lane_queue, make_celery
from contract.constants import LANE_BULK, LANE_INTERACTIVE, TASK_ANALYZE
from contract.settings import Settings
from producer.client import Client
from tests.test_metrics import _samples
from worker.metrics import WorkerMetrics
from worker.process import free_port


def _depths(port: int) -> dict[str, float]:
    samples = _samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
    return {dict(labels)["lane"]: value for (name, labels), value in samples.items()
            if name == "bertstream_queue_depth"}


def test_queue_depth_counts_the_priority_lists_of_each_lane(redis_url: str) -> None:
    settings = Settings(broker_url=redis_url, database_url="sqlite://",
                        queue=f"bst-prio-{uuid.uuid4().hex[:8]}", model_name="v2")
    app = make_celery(settings)
    try:  # through Celery and kombu, as any caller setting a priority sends them
        for priority, lane in ((5, LANE_BULK), (9, LANE_BULK), (3, LANE_INTERACTIVE)):
            app.send_task(TASK_ANALYZE, args=[[{"id": f"p{priority}", "text": "x"}]],
                          queue=lane_queue(settings, lane == LANE_BULK), priority=priority)
    finally:
        app.close()
    r = redis.Redis.from_url(redis_url)
    try:
        bulk = lane_queue(settings, True)
        assert r.llen(bulk) == 0  # every message above is in a priority-step list
        assert sum(r.llen(key) for key in lane_keys(bulk)[1:]) == 2
    finally:
        r.close()
    with Client(settings) as client:
        client.submit("plain")  # the default priority: the lane's own list
        expected = {LANE_INTERACTIVE: client.queue_length(LANE_INTERACTIVE),
                    LANE_BULK: client.queue_length(LANE_BULK)}
    assert expected == {LANE_INTERACTIVE: 2, LANE_BULK: 2}
    port = free_port()
    WorkerMetrics("m").serve(port, settings)
    assert _depths(port) == expected
