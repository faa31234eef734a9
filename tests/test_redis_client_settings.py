"""Every Redis client takes the configured timeouts, keepalive and health checks
(``contract.broker.redis_client``): the API's claims, the worker's queue-depth gauge and the
demo's clean-up had fixed timeouts (or none: a silent Redis hung the demo at its end)."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import contract.settings
import producer.client
from api.submit import Submitter
from contract.settings import Settings
from producer.client import Client
from tests.conftest import REDIS_URL
from tests.tcpproxy import SilentListener
from worker.demo import remove_queue_keys
from worker.metrics import _QueueDepth

TIMEOUTS = {"redis_socket_timeout_s": 7.5, "redis_connect_timeout_s": 2.5,
            "redis_health_check_s": 11}


def _settings(tmp_path: Path, url: str = REDIS_URL) -> Settings:
    return Settings(broker_url=url, database_url=f"sqlite:///{tmp_path}/r.db",
                    queue=f"bst-{uuid.uuid4().hex[:8]}", **TIMEOUTS)  # type: ignore[arg-type]


def _assert_configured(kwargs: dict[str, object]) -> None:
    assert kwargs["socket_timeout"] == 7.5
    assert kwargs["socket_connect_timeout"] == 2.5
    assert kwargs["socket_keepalive"] is True
    assert kwargs["health_check_interval"] == 11


def test_the_api_and_the_queue_gauge_use_the_configured_timeouts(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with Client(settings) as client:
        submitter = Submitter(settings, client)
        try:
            _assert_configured(submitter.redis.connection_pool.connection_kwargs)
        finally:
            submitter.close()
    depth = _QueueDepth(settings)
    try:
        _assert_configured(depth.client.connection_pool.connection_kwargs)
    finally:
        depth.client.close()


def test_the_demo_clean_up_gives_up_on_a_silent_redis(tmp_path: Path) -> None:
    """Within the configured socket timeout, not redis-py's own default (or never)."""
    silent = SilentListener()
    try:
        settings = _settings(tmp_path, f"redis://127.0.0.1:{silent.port}/0").replace(
            redis_socket_timeout_s=0.5, redis_connect_timeout_s=0.5)
        removed: list[int] = []
        thread = threading.Thread(target=lambda: removed.append(remove_queue_keys(settings)),
                                  daemon=True)
        began = time.monotonic()
        thread.start()
        thread.join(timeout=15)
        assert not thread.is_alive(), "remove_queue_keys hung on a silent Redis"
        assert removed == [0]
        assert time.monotonic() - began < 3
    finally:
        silent.close()


def test_the_producer_shares_the_redis_schemes() -> None:
    assert producer.client.REDIS_SCHEMES is contract.settings.REDIS_SCHEMES
