"""The API counts the live workers of every model family of its queue: ``/readyz``,
``/v1/live`` and ``bertstream_workers_alive`` with real heartbeats in the real Redis (a
real worker process serving a named model, and the workers' own Heartbeat class)."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import by_family
from contract.constants import WORKER_KEY_PREFIX
from contract.liveness import announce, family_workers
from contract.settings import Settings
from tests.polling import until
from worker.heartbeat import Heartbeat


@pytest.fixture
def lone_settings(redis_url: str, sqlite_url: str, tmp_path: Path) -> Settings:
    """One database is enough here: only Redis is read for liveness."""
    return Settings(broker_url=redis_url, database_url=sqlite_url,
                    queue=f"bst-live-{uuid.uuid4().hex[:8]}",
                    cache_dir=str(tmp_path / "cache"), max_wait_ms=20)


def _seen(http: httpx.Client) -> dict[str, Any]:
    """What each of the three views says about the workers."""
    ready = http.get("/readyz")
    live = http.get("/v1/live").json()
    gauges: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        if family.name in ("bertstream_workers_alive", "bertstream_family_workers_alive"):
            gauges[family.name] = {s.labels.get("family", ""): s.value for s in family.samples}
    return {"ready": ready.status_code, "check": ready.json()["checks"]["workers"],
            "alive": live["workers_alive"], "by_family": live.get("workers_by_family"),
            "families": sorted(w.get("family", "?") for w in live["workers"]),
            "total": gauges["bertstream_workers_alive"][""],
            "gauge": gauges.get("bertstream_family_workers_alive")}


@pytest.mark.slow
def test_workers_of_a_named_model_make_the_api_ready(lone_settings: Settings, api_factory: Any,
                                                      worker_factory: Any,
                                                      tiny_model_dir: Path) -> None:
    queue = lone_settings.queue
    named = f"{queue}-sentiment-v2"
    plain = api_factory(lone_settings)
    # An API whose own default is the named model submits to that family.
    own = api_factory(lone_settings.replace(model_name="sentiment-v2"))
    # Another deployment whose queue name merely starts with this one's is not counted.
    neighbour = Heartbeat(lone_settings.replace(queue=queue + "2"), "celery@neighbour",
                          {}).start()
    try:
        for api in (plain, own):
            with httpx.Client(base_url=api.url, timeout=10) as http:
                seen = _seen(http)
                assert seen["ready"] == 503 and seen["check"].startswith("none alive"), seen
                assert seen["alive"] == 0 and seen["total"] == 0

        worker = worker_factory(lone_settings.replace(model=str(tiny_model_dir),
                                                      model_name="sentiment-v2"))
        for api, mine in ((plain, queue), (own, named)):
            with httpx.Client(base_url=api.url, timeout=10) as http:
                seen = _seen(http)
                assert seen["ready"] == 200 and seen["check"] == "ok: 1 alive", seen
                assert seen["alive"] == 1 and seen["families"] == [named]
                assert seen["by_family"] == {named: 1} and seen["total"] == 1
                assert seen["gauge"] == {mine: 0, named: 1}

        default = Heartbeat(lone_settings, "celery@default-1", {"model": "m"}).start()
        try:
            with httpx.Client(base_url=plain.url, timeout=10) as http:
                until(lambda: _seen(http)["alive"] == 2)
                seen = _seen(http)
                assert seen["check"] == "ok: 2 alive" and seen["families"] == [queue, named]
                assert seen["by_family"] == {queue: 1, named: 1}
                assert seen["total"] == 2 and seen["gauge"] == {queue: 1, named: 1}
        finally:
            default.stop()

        worker.stop(timeout=15)  # a clean stop deletes its heartbeat
        for api, mine in ((plain, queue), (own, named)):
            with httpx.Client(base_url=api.url, timeout=10) as http:
                seen = _seen(http)
                assert seen["ready"] == 503 and seen["alive"] == 0 and seen["total"] == 0
                assert seen["by_family"] == {}
                # The API's own family is always reported, 0 while it has no worker.
                assert seen["gauge"] == {mine: 0}
    finally:
        neighbour.stop()


def test_only_keys_of_the_family_rule_count(redis_url: str) -> None:
    """``<queue>:<host>`` and ``<queue>-<model name>:<host>`` count; a longer queue name, a
    key that names no valid model, and glob characters in the queue name do not mislead."""
    client = redis.Redis.from_url(redis_url)
    base = Settings(broker_url=redis_url, queue=f"bst-[a]*{uuid.uuid4().hex[:6]}")
    queue = base.queue
    # dataclasses.replace: the settings' own check now refuses glob characters in a queue
    # name; the reader must still match such keys literally.
    beats = [Heartbeat(base, "celery@d", {"model": "m"}),
             Heartbeat(dataclasses.replace(base, model_name="v2.1"), "celery@n", {}),
             Heartbeat(dataclasses.replace(base, queue=queue + "2"), "celery@other", {}),
             Heartbeat(dataclasses.replace(base, queue=queue.replace("[a]*", "a")),
                       "celery@glob", {})]
    try:
        for beat in beats:
            beat.start()
        for junk in ("-", "-bad name", "-.dot"):
            announce(client, f"{queue}{junk}", "celery@junk", "{}")
        announce(client, queue, "celery@e", "not json")
        until(lambda: len(list(client.scan_iter(match=f"{WORKER_KEY_PREFIX}*"))) == 8)
        got = family_workers(client, queue)
        assert [(w["family"], w["hostname"]) for w in got] == [
            (queue, "celery@d"), (queue, "celery@e"), (f"{queue}-v2.1", "celery@n")]
        assert got[0]["model"] == "m"
        assert by_family(got) == {queue: 2, f"{queue}-v2.1": 1}
    finally:
        for beat in beats:
            beat.stop()
        client.close()


def test_readyz_with_heartbeats_of_a_named_model_only(lone_settings: Settings,
                                                      api_factory: Any) -> None:
    """The quick form of the test above (the workers' Heartbeat class, no model loaded)."""
    api = api_factory(lone_settings)
    beat = Heartbeat(lone_settings.replace(model_name="sentiment-v2"), "celery@n", {}).start()
    try:
        with httpx.Client(base_url=api.url, timeout=10) as http:
            until(lambda: http.get("/readyz").status_code == 200, timeout=5)
            assert http.get("/readyz").json()["checks"]["workers"] == "ok: 1 alive"
    finally:
        beat.stop()
