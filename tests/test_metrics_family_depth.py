"""``bertstream_family_queue_depth``: the API's queue depth of every model family of its
queue, scraped from a real ``bertstream serve`` over the real Redis. Tasks sent to a
model no worker serves are the case it exists for."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import bound_families, family_depths, shown_depths
from contract.broker import lane_keys
from contract.settings import Settings
from producer.client import Client
from tests.polling import until
from worker.heartbeat import Heartbeat


@pytest.fixture
def lone_settings(redis_url: str, sqlite_url: str, tmp_path: Path) -> Settings:
    return Settings(broker_url=redis_url, database_url=sqlite_url,
                    queue=f"bst-depth-{uuid.uuid4().hex[:8]}",
                    cache_dir=str(tmp_path / "cache"))


def _depths(http: httpx.Client) -> dict[str, Any]:
    """The two depth gauges: per lane (this server's family), per (family, lane)."""
    out: dict[str, Any] = {"lane": {}, "family": {}}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            if family.name == "bertstream_queue_depth":
                assert set(s.labels) == {"lane"}  # the series it always had
                out["lane"][s.labels["lane"]] = s.value
            elif family.name == "bertstream_family_queue_depth":
                out["family"][(s.labels["family"], s.labels["lane"])] = s.value
    return out


def _zero(family: str) -> dict[tuple[str, str], float]:
    return {(family, "interactive"): 0.0, (family, "bulk"): 0.0}


def test_tasks_of_a_model_no_worker_serves_are_seen(lone_settings: Settings,
                                                    api_factory: Any) -> None:
    queue = lone_settings.queue
    api = api_factory(lone_settings.replace(api_models="*"))  # "nobody" accepted
    own_named = api_factory(lone_settings.replace(model_name="v9"))
    r = redis.Redis.from_url(lone_settings.broker_url)
    try:
        with httpx.Client(base_url=api.url, timeout=10) as http:
            assert _depths(http) == {"lane": {"interactive": 0.0, "bulk": 0.0},
                                     "family": _zero(queue)}
            for body in ({"text": "one", "model": "nobody"},
                         {"items": ["two", "three"], "model": "nobody"},
                         {"text": "four"}):
                assert http.post("/v1/tasks", json=body).status_code == 202
            # Another deployment's queue, whose name merely starts with this one's.
            with Client(lone_settings.replace(queue=queue + "2")) as other:
                other.submit("five")
            until(lambda: _depths(http)["lane"]["interactive"] == 1)
            seen = _depths(http)
            # The old series keep meaning this server's own family.
            assert seen["lane"] == {"interactive": 1.0, "bulk": 0.0}
            assert seen["family"] == {(queue, "interactive"): 1.0, (queue, "bulk"): 0.0,
                                      (f"{queue}-nobody", "interactive"): 1.0,
                                      (f"{queue}-nobody", "bulk"): 1.0}

            # A family with a live worker shows while empty; one emptied without
            # workers goes (its binding stays in Redis).
            beat = Heartbeat(lone_settings.replace(model_name="idle"), "celery@i", {}).start()
            try:
                r.delete(*lane_keys(f"{queue}-nobody.interactive"),
                         *lane_keys(f"{queue}-nobody.bulk"))
                until(lambda: (f"{queue}-idle", "bulk") in _depths(http)["family"])
                assert _depths(http)["family"] == {
                    (queue, "interactive"): 1.0, (queue, "bulk"): 0.0, **_zero(f"{queue}-idle")}
            finally:
                beat.stop()

        with httpx.Client(base_url=own_named.url, timeout=10) as http:
            seen = _depths(http)
            assert seen["lane"] == {"interactive": 0.0, "bulk": 0.0}
            assert seen["family"] == {(queue, "interactive"): 1.0, (queue, "bulk"): 0.0,
                                      **_zero(f"{queue}-v9")}
    finally:
        r.close()


def test_bound_families_and_their_depth(lone_settings: Settings) -> None:
    """Every family a producer published to is bound to the queue's exchange; the depth
    counts kombu's priority lists too."""
    queue = lone_settings.queue
    with Client(lone_settings.replace(model_name="m.1")) as named, \
            Client(lone_settings) as plain:
        named.submit_many(["a", "b"])
        plain.submit("c")
    r = redis.Redis.from_url(lone_settings.broker_url)
    try:
        assert bound_families(r, queue) == {queue, f"{queue}-m.1"}
        assert bound_families(r, queue + "2") == set()
        r.rpush(lane_keys(f"{queue}-m.1.bulk")[-1], "x")  # a priority step's list
        assert family_depths(r, [queue, f"{queue}-m.1", f"{queue}-none"]) == {
            queue: {"interactive": 1, "bulk": 0},
            f"{queue}-m.1": {"interactive": 0, "bulk": 2},
            f"{queue}-none": {"interactive": 0, "bulk": 0}}
    finally:
        r.close()


def test_past_the_limit_the_shallowest_families_are_summed_as_other() -> None:
    depths = {"q": {"interactive": 0, "bulk": 0}, "q-w": {"interactive": 0, "bulk": 0},
              "q-a": {"interactive": 5, "bulk": 0}, "q-b": {"interactive": 1, "bulk": 1},
              "q-c": {"interactive": 0, "bulk": 1}, "q-gone": {"interactive": 0, "bulk": 0}}
    assert shown_depths(depths, ["q", "q-w"], limit=10) == {
        f: depths[f] for f in ("q", "q-w", "q-a", "q-b", "q-c")}
    assert shown_depths(depths, ["q", "q-w"], limit=3) == {
        "q": depths["q"], "q-w": depths["q-w"], "q-a": depths["q-a"],
        "other": {"interactive": 1, "bulk": 2}}
