"""``/metrics`` says whether Redis answered: the queue depth and live-worker gauges cannot be
read during a Redis outage (they are left out, not made up), so an alert on no live workers
would go quiet exactly then; ``bertstream_redis_up`` is always there."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from contract.settings import Settings
from worker.process import free_port


def _gauges(url: str) -> dict[str, list[float]]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {family.name: [s.value for s in family.samples]
            for family in text_string_to_metric_families(text)
            if family.name in ("bertstream_redis_up", "bertstream_workers_alive",
                               "bertstream_queue_depth")}


def test_redis_up_is_reported_with_redis_up_and_down(settings: Settings,
                                                     api_factory: Any) -> None:
    up = api_factory(settings)
    assert _gauges(up.url) == {"bertstream_redis_up": [1.0], "bertstream_workers_alive": [0.0],
                               "bertstream_queue_depth": [0.0, 0.0]}
    down = api_factory(settings.replace(broker_url=f"redis://127.0.0.1:{free_port()}/0"))
    assert _gauges(down.url) == {"bertstream_redis_up": [0.0]}
