"""A submit naming a model nobody serves is refused (404 ``unknown_model``) before any lane,
claim or message: such a name (a typo, ``sentimnet``) was accepted, its tasks stayed
``queued`` for good, and each made-up name left a lane list and kombu binding members in
Redis for good. ``BERTSTREAM_API_MODELS`` lists the models accepted before their workers
start, or ``*`` for any name. The real API app, the real Redis, heartbeats written with
``contract.liveness.announce`` as workers write them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

import api.app
from api.app import SHOWN_MODELS, create_app
from contract.constants import ENV_PREFIX
from contract.errors import ConfigError
from contract.liveness import announce, worker_key
from contract.settings import MAX_API_MODELS, Settings

TYPO = "sentimnet"
REAL = "sentiment"


@pytest.fixture
def base(redis_url: str, sqlite_url: str, tmp_path: Path) -> Settings:
    return Settings(broker_url=redis_url, database_url=sqlite_url,
                    queue=f"bst-um-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The queues whose live workers the API read (``family_workers`` calls), in order."""
    calls: list[str] = []
    real = api.app.family_workers

    def counted(client: Any, queue: str) -> list[dict[str, Any]]:
        calls.append(queue)
        return real(client, queue)

    monkeypatch.setattr(api.app, "family_workers", counted)
    return calls


@pytest.fixture
def http(base: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(base)) as client:
        yield client


def _beat(r: redis.Redis, settings: Settings, model: str, host: str = "celery@w1") -> str:
    """A heartbeat of a worker serving ``model`` (as worker/heartbeat.py writes it); its key."""
    family = settings.replace(model_name=model).family
    announce(r, family, host, json.dumps({"pid": 1, "model": model, "device": "cpu"}))
    return worker_key(family, host)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _keys(r: redis.Redis) -> set[str]:
    return {_text(k) for k in r.keys("*")}


def _lanes(r: redis.Redis, settings: Settings, model: str) -> set[str]:
    """The keys of ``model``'s lanes, kombu's bindings and the API's claims for it."""
    family = settings.replace(model_name=model).family
    return {k for k in _keys(r) if family + "." in k or f":{family}:" in k
            or k.startswith("_kombu.binding") and any(
                family + "." in _text(m) for m in r.smembers(k))}


def _refused(answer: Any, model: str) -> str:
    assert answer.status_code == 404, answer.text
    error = answer.json()["error"]
    assert error["code"] == "unknown_model" and repr(model) in error["message"], error
    assert f"{ENV_PREFIX}API_MODELS" in error["message"], error
    return str(error["message"])


def test_a_typo_is_refused_and_leaves_nothing_in_redis(base: Settings, plain: redis.Redis,
                                                       http: TestClient) -> None:
    """Single and bulk, with and without a caller id: 404 naming the model, the served
    models and the setting; no lane, binding, claim or message; the id never accepted."""
    _beat(plain, base, REAL)
    before = _keys(plain)
    for body in ({"text": "great", "model": TYPO}, {"text": "great", "id": "t1", "model": TYPO},
                 {"items": ["a", {"text": "b", "id": "t2"}], "model": TYPO},
                 {"items": ["c"], "model": TYPO, "lane": "interactive"},
                 {"items": [], "model": TYPO}):
        message = _refused(http.post("/v1/tasks", json=body), TYPO)
        assert f"models served now: {REAL}" in message, message
    assert _keys(plain) == before, _keys(plain) - before
    assert _lanes(plain, base, TYPO) == set()
    for task_id in ("t1", "t2"):
        answer = http.get(f"/v1/tasks/{task_id}", params={"model": TYPO})
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
    assert _keys(plain) == before  # a status read opens no lane either
    # Validation still comes first: an invalid request is a 422 whatever its model.
    assert http.post("/v1/tasks", json={"text": "", "model": TYPO}).status_code == 422
    assert http.post("/v1/tasks", json={"items": [""], "model": TYPO}).status_code == 422
    assert _keys(plain) == before


def test_a_model_with_a_live_worker_is_accepted(base: Settings, plain: redis.Redis,
                                                http: TestClient) -> None:
    _beat(plain, base, REAL)
    one = http.post("/v1/tasks", json={"text": "great", "id": "a1", "model": REAL})
    many = http.post("/v1/tasks", json={"items": ["x", "y"], "model": REAL})
    assert one.status_code == 202 and many.status_code == 202, (one.text, many.text)
    assert many.json()["accepted"] == 2
    family = base.replace(model_name=REAL).family
    assert plain.llen(f"{family}.interactive") == 1 and plain.llen(f"{family}.bulk") == 1
    assert http.get("/v1/tasks/a1", params={"model": REAL}).json()["status"] == "queued"


def test_the_default_model_always_passes(base: Settings, plain: redis.Redis,
                                         http: TestClient, reads: list[str]) -> None:
    """No worker at all: the default model by no name, by ``default``, and a server whose
    own model is a named one (its default), each without a liveness read."""
    for body in ({"text": "fine"}, {"text": "fine", "model": "default"},
                 {"items": ["fine"]}, {"items": ["fine"], "model": "default"}):
        assert http.post("/v1/tasks", json=body).status_code == 202, body
    own = base.replace(model_name="v9")
    with TestClient(create_app(own)) as named:
        assert named.post("/v1/tasks", json={"text": "fine"}).status_code == 202
        assert named.post("/v1/tasks", json={"items": ["a"], "model": "v9"}).status_code == 202
    assert reads == []
    assert plain.llen(f"{base.queue}.interactive") == 2
    assert plain.llen(f"{base.queue}-v9.interactive") == 1


def test_liveness_is_read_once_per_period_and_an_expired_heartbeat_refuses_again(
        base: Settings, plain: redis.Redis, http: TestClient, reads: list[str]) -> None:
    """A burst of submits reads the heartbeats once; a worker whose heartbeat expires is
    refused once the read is older than the cache period, and accepted again when a
    worker beats again (after the period too: a refusal is remembered as long)."""
    gate = http.app.state.services.models  # type: ignore[attr-defined]
    gate.ttl_s = 600.0  # the burst stays within one period however slow the host is
    gate.grace_s = 0.0  # no grace after the last sighting: the dead worker's model refused
    key = _beat(plain, base, REAL)
    for i in range(20):
        assert http.post("/v1/tasks", json={"text": f"t{i}", "model": REAL}).status_code == 202
    assert http.post("/v1/tasks", json={"items": ["b"], "model": REAL}).status_code == 202
    assert reads == [base.queue]
    plain.pexpire(key, 1)  # the heartbeat's TTL runs out, as a dead worker's does
    time.sleep(0.05)
    assert plain.exists(key) == 0
    cached = http.post("/v1/tasks", json={"text": "cached", "model": REAL})
    assert cached.status_code == 202, cached.text  # the read is within its period
    assert reads == [base.queue]
    gate.ttl_s = 0.2  # the period ends: the next submit reads the heartbeats again
    time.sleep(0.3)
    message = _refused(http.post("/v1/tasks", json={"text": "late", "model": REAL}), REAL)
    assert "models served now: none" in message, message
    _refused(http.post("/v1/tasks", json={"items": ["late"], "model": REAL}), REAL)
    _beat(plain, base, REAL, host="celery@w2")
    time.sleep(0.3)
    assert http.post("/v1/tasks", json={"text": "back", "model": REAL}).status_code == 202


def test_the_refusal_lists_a_bounded_number_of_served_models(
        base: Settings, plain: redis.Redis, http: TestClient) -> None:
    for i in range(SHOWN_MODELS + 3):
        _beat(plain, base, f"m{i:02d}")
    _beat(plain, base, "")  # the default model's worker
    message = _refused(http.post("/v1/tasks", json={"text": "x", "model": TYPO}), TYPO)
    names = ", ".join(sorted(["default", *(f"m{i:02d}" for i in range(SHOWN_MODELS + 3))])
                      [:SHOWN_MODELS])
    assert f"models served now: {names} (and 4 more)" in message, message


def test_an_allow_list_accepts_its_models_without_workers(
        base: Settings, plain: redis.Redis, reads: list[str]) -> None:
    settings = Settings.from_env({f"{ENV_PREFIX}API_MODELS": " alpha, beta,"},
                                 broker_url=base.broker_url, database_url=base.database_url,
                                 queue=base.queue, cache_dir=base.cache_dir)
    _beat(plain, base, "gamma")  # alive, but not listed: refused all the same
    with TestClient(create_app(settings)) as http:
        assert http.post("/v1/tasks", json={"text": "a", "model": "alpha"}).status_code == 202
        assert http.post("/v1/tasks", json={"items": ["b"], "model": "beta"}).status_code == 202
        assert http.post("/v1/tasks", json={"text": "c"}).status_code == 202
        before = _keys(plain)
        for model in (TYPO, "gamma"):
            for body in ({"text": "x", "id": "i1", "model": model},
                         {"items": ["y"], "model": model}):
                message = _refused(http.post("/v1/tasks", json=body), model)
                assert "(alpha, beta)" in message, message
        assert _keys(plain) == before
    assert reads == []  # a listed or refused name costs no liveness read
    assert plain.llen(f"{base.queue}-alpha.interactive") == 1
    assert plain.llen(f"{base.queue}-beta.bulk") == 1


def test_any_name_is_accepted_with_a_star(base: Settings, plain: redis.Redis,
                                          reads: list[str]) -> None:
    settings = base.replace(api_models="*")
    with TestClient(create_app(settings)) as http:
        assert http.post("/v1/tasks", json={"text": "x", "model": TYPO}).status_code == 202
        assert http.post("/v1/tasks", json={"items": ["y"], "model": "other"}).status_code == 202
    assert reads == []
    assert plain.llen(f"{base.queue}-{TYPO}.interactive") == 1


def test_redis_unreachable_during_the_liveness_read_is_a_503(base: Settings) -> None:
    """Never accepted blindly, never a 500: the API's outage answer."""
    down = base.replace(broker_url="redis://127.0.0.1:1/0", redis_connect_timeout_s=0.5)
    with TestClient(create_app(down)) as http:
        for body in ({"text": "x", "model": REAL}, {"items": ["y"], "model": REAL}):
            answer = http.post("/v1/tasks", json=body)
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "broker_unavailable"
            assert "Retry-After" in answer.headers


def test_the_setting_is_validated() -> None:
    assert Settings().api_model_list() == []
    assert Settings(api_models=" a ,b.c,, d-1 ").api_model_list() == ["a", "b.c", "d-1"]
    assert Settings(api_models="*").api_model_list() == ["*"]
    cases = {"good,b@d": "'b@d' is no model name", "-lead": "'-lead' is no model name",
             "a,*": "stands alone", "x" * 101: "is no model name",
             ",".join(f"m{i}" for i in range(MAX_API_MODELS + 1)):
                 f"lists {MAX_API_MODELS + 1} models, over the limit of {MAX_API_MODELS}"}
    for raw, said in cases.items():
        with pytest.raises(ConfigError) as refused:
            Settings.from_env({f"{ENV_PREFIX}API_MODELS": raw})
        assert f"{ENV_PREFIX}API_MODELS" in str(refused.value) and said in str(refused.value)
        assert len(str(refused.value)) < 300
    assert len(Settings.from_env({f"{ENV_PREFIX}API_MODELS": ",".join(
        f"m{i}" for i in range(MAX_API_MODELS))}).api_model_list()) == MAX_API_MODELS


def test_the_openapi_schema_documents_the_refusal(http: TestClient) -> None:
    responses = http.get("/openapi.json").json()["paths"]["/v1/tasks"]["post"]["responses"]
    assert "unknown_model" in responses["404"]["description"]


def test_the_default_models_stored_name_is_refused_with_the_way_to_send_to_it(
        base: Settings, plain: redis.Redis, http: TestClient) -> None:
    """A web app reads ``"model": "<name>"`` off the default model's results and sends it
    back: no worker serves a model of that name, so it is refused, saying to leave the
    model out (or send ``default``) instead of listing ``default`` as if unrelated."""
    announce(plain, base.family, "celery@w1",
             json.dumps({"pid": 1, "model": "sentiment-small", "device": "cpu"}))
    answer = http.post("/v1/tasks", json={"text": "great", "model": "sentiment-small"})
    assert answer.status_code == 404, answer.text
    message = answer.json()["error"]["message"]
    assert "the default model's results are stored under" in message, message
    assert '"model": "default"' in message, message
    assert http.post("/v1/tasks", json={"text": "great", "model": "default"}).status_code == 202
    other = http.post("/v1/tasks", json={"text": "great", "model": TYPO})
    assert "stored under" not in _refused(other, TYPO)
