"""Task deadlines (``ttl_s``) over the HTTP API: single and bulk submits, real Redis, a real
``bertstream serve`` and a real worker (the ``null`` model).

A task still queued past its deadline is stored ``expired`` without reaching the model,
as the Python client's and the CLI's ``ttl_s`` make it; the deadline is stamped on the
Redis server's clock (the API publishes through ``Client.publish``). A bad ``ttl_s`` is
refused as the client refuses it, with the API's 422.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from api.app import create_app
from contract.broker import lane_queue
from contract.clock import server_time
from contract.constants import STATUS_DONE, STATUS_EXPIRED
from contract.settings import Settings
from tests.producer_helpers import broker_settings, lane_messages
from tests.served_app import served

#: A deadline no worker start meets; one every worker start meets.
TINY_TTL_S = 0.001
LONG_TTL_S = 600.0


@pytest.fixture
def null_settings(redis_url: str, pg_url: str, tmp_path: Path) -> Settings:
    """The ``null`` model on the test Redis and PostgreSQL, with a queue of its own."""
    return Settings(broker_url=redis_url, database_url=pg_url, model="null",
                    queue=f"bst-ttl-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                    max_wait_ms=20)


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return dict(body["error"])


def _deadlines(settings: Settings, bulk: bool) -> dict[str, float]:
    """Each queued item's ``expires_at``, by id, on the lane."""
    return {item["id"]: item["expires_at"]
            for message in lane_messages(settings.broker_url, lane_queue(settings, bulk))
            for item in message["items"] if "expires_at" in item}


@pytest.mark.slow
def test_ttl_tasks_done_in_time_and_expired_past_their_deadline(
        null_settings: Settings, api_factory: Any, worker_factory: Any) -> None:
    """Single and bulk submits with deadlines, all queued before a worker starts: the
    ones whose deadline passed first are stored ``expired`` and shown so, with the
    reason; the others are done. In a bulk submit an item's ``ttl_s`` wins over the
    body's, either way."""
    api = api_factory(null_settings)
    plain = redis.Redis.from_url(null_settings.broker_url)
    try:
        before = server_time(plain)
        with httpx.Client(base_url=api.url, timeout=60) as http:
            for task_id, ttl in (("ttl-late", TINY_TTL_S), ("ttl-ok", LONG_TTL_S)):
                r = http.post("/v1/tasks", json={"text": f"text of {task_id}", "id": task_id,
                                                 "ttl_s": ttl})
                assert r.status_code == 202, r.text
            short_body = http.post("/v1/tasks", json={"ttl_s": TINY_TTL_S, "items": [
                {"text": "body deadline", "id": "b-late"},
                {"text": "own deadline", "id": "b-own-ok", "ttl_s": LONG_TTL_S}]})
            long_body = http.post("/v1/tasks", json={"ttl_s": LONG_TTL_S, "items": [
                {"text": "body deadline too", "id": "b-ok"},
                {"text": "own short deadline", "id": "b-own-late", "ttl_s": TINY_TTL_S}]})
            assert short_body.status_code == long_body.status_code == 202, long_body.text
            assert short_body.json()["errors"] == long_body.json()["errors"] == []

            # Stamped on the Redis server's clock: the server's time at publishing + ttl.
            after = server_time(plain)
            deadlines = {**_deadlines(null_settings, False), **_deadlines(null_settings, True)}
            assert set(deadlines) == {"ttl-late", "ttl-ok", "b-late", "b-own-ok", "b-ok",
                                      "b-own-late"}
            for task_id, at in deadlines.items():
                ttl = TINY_TTL_S if task_id.endswith("late") else LONG_TTL_S
                assert before + ttl <= at <= after + ttl, (task_id, before, at, after)
            assert after > max(at for task_id, at in deadlines.items() if task_id.endswith("late"))

            worker_factory(null_settings)
            for task_id in sorted(deadlines):
                got = http.get(f"/v1/tasks/{task_id}", params={"wait": 30}).json()
                if task_id.endswith("late"):
                    assert got["status"] == STATUS_EXPIRED, got
                    assert "expired" in got["reason"] and "before it reached the model" in \
                        got["reason"], got
                    assert got["label"] is None, got
                else:
                    assert got["status"] == STATUS_DONE, got
            expired = http.get("/v1/results", params={"status": "expired"}).json()["items"]
            assert sorted(row["id"] for row in expired) == ["b-late", "b-own-late", "ttl-late"]
    finally:
        plain.close()


@pytest.mark.parametrize("skew", [-120.0, 120.0])
def test_a_skewed_api_host_stamps_deadlines_on_the_server_clock(
        redis_url: str, sqlite_url: str, monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    """An API host whose clock is two minutes off: a coalesced single submit and a bulk
    one send ``expires_at`` = the Redis server's clock + ttl (the host's clock is
    patched, a fault one host cannot cause for real)."""
    s = broker_settings(redis_url, sqlite_url)
    ttl = 60.0
    plain = redis.Redis.from_url(redis_url)
    real = time.time
    try:
        with served(create_app(s)) as url, httpx.Client(base_url=url, timeout=10) as http:
            before = server_time(plain)
            with monkeypatch.context() as patch:
                patch.setattr(time, "time", lambda: real() + skew)
                single = http.post("/v1/tasks", json={"text": "one", "id": "s", "ttl_s": ttl})
                bulk = http.post("/v1/tasks", json={"items": [{"text": "two", "id": "b"}],
                                                    "ttl_s": ttl})
            after = server_time(plain)
        assert single.status_code == bulk.status_code == 202, (single.text, bulk.text)
    finally:
        plain.close()
    deadlines = {**_deadlines(s, False), **_deadlines(s, True)}
    assert set(deadlines) == {"s", "b"}
    for task_id, at in deadlines.items():
        # One second of slack for the round trips, far below the skew.
        assert before + ttl - 1 <= at <= after + ttl + 1, (task_id, at - before - ttl)


#: ``ttl_s`` values the client refuses, as JSON; each must be a 422 naming ttl_s.
BAD_TTLS: list[Any] = [0, -1, -0.5, "NaN", "30", 1e12, 10**400, True, False, [30], {"s": 30}]


@pytest.mark.parametrize("ttl", BAD_TTLS, ids=repr)
def test_a_bad_ttl_is_a_422_naming_ttl_s(module_api: Any, ttl: Any) -> None:
    """Single, bulk body-level and a lone bulk item's: refused, nothing queued."""
    with httpx.Client(base_url=module_api.url, timeout=10) as http:
        for body in ({"text": "some text", "ttl_s": ttl},
                     {"items": ["one", "two"], "ttl_s": ttl},
                     {"items": [{"text": "one", "ttl_s": ttl}]}):
            r = http.post("/v1/tasks", json=body)
            assert r.status_code == 422, (body, r.text)
            error = _error(r)
            assert error["code"] == "invalid_input" and "ttl_s" in error["message"], (body, error)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_json_ttl_is_a_422(module_api: Any, token: str) -> None:
    """NaN and infinities written as JSON numbers, which Python's JSON reader takes."""
    body = f'{{"text": "some text", "ttl_s": {token}}}'.encode()
    r = httpx.post(module_api.url + "/v1/tasks", content=body,
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 422, r.text
    assert _error(r)["code"] in ("invalid_input", "invalid_request")


def test_a_bad_item_ttl_refuses_that_item_only(module_api: Any) -> None:
    """As any bad item of a bulk submit: the others are accepted."""
    r = httpx.post(module_api.url + "/v1/tasks", timeout=10, json={"ttl_s": 30, "items": [
        {"text": "good", "id": "ttl-item-good"},
        {"text": "bad", "id": "ttl-item-bad", "ttl_s": -3}]})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["ids"] == ["ttl-item-good", None] and body["accepted"] == 1
    assert [(e["index"], e["id"]) for e in body["errors"]] == [(1, "ttl-item-bad")]
    assert "ttl_s" in body["errors"][0]["reason"]


def test_a_null_ttl_is_no_deadline(module_api: Any) -> None:
    """``"ttl_s": null`` is as if absent; an item's null leaves the body's."""
    with httpx.Client(base_url=module_api.url, timeout=10) as http:
        single = http.post("/v1/tasks", json={"text": "no deadline", "ttl_s": None})
        bulk = http.post("/v1/tasks", json={"ttl_s": None, "items": [
            {"text": "none either", "ttl_s": None}]})
        assert single.status_code == bulk.status_code == 202, (single.text, bulk.text)


def test_openapi_describes_ttl_s(module_api: Any) -> None:
    schema = httpx.get(module_api.url + "/openapi.json", timeout=10).json()["components"]["schemas"]
    for model in ("TaskIn", "BulkIn"):
        field = schema[model]["properties"]["ttl_s"]
        text = json.dumps(field)
        assert "number" in text and "expired" in field["description"], (model, field)
    assert "ttl_s" in schema["BulkIn"]["properties"]["items"]["description"]


def test_an_unknown_item_key_is_refused_listing_ttl_s_among_the_allowed(
        module_api: Any) -> None:
    """A bulk item's ``ttl_s`` is taken, so the refusal of a mistyped key lists it with the
    others: it said ``expected ['id', 'meta', 'source', 'text']``, sending a caller who
    wrote ``ttl`` to drop the deadline rather than spell it ``ttl_s``. Refused as before:
    that item only, and ``ttl_s`` itself stays accepted."""
    r = httpx.post(module_api.url + "/v1/tasks", timeout=10, json={"items": [
        {"text": "typo", "ttl": 30}, {"text": "kept", "ttl_s": 30}]})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["accepted"] == 1 and [e["index"] for e in body["errors"]] == [0], body
    assert body["errors"][0]["reason"] == (
        "unknown field(s) ['ttl']; expected ['id', 'meta', 'source', 'text', 'ttl_s']")
