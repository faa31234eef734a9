"""Review of ``/v1/live``'s kept per-minute trend and of the status reads that do not
depend on the server's own model: answers the README gives that these commits missed.
Real SQLite and PostgreSQL, real Redis, the real API app."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import uuid
from itertools import count
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.dashboard import TrendCache, trend
from api.submit import Submitter
from contract.constants import ACCEPTED_ANY_KEY_PREFIX, ACCEPTED_KEY_PREFIX
from contract.liveness import announce
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from producer.client import Client
from tests.scriptless_redis import REFUSALS, refusing_server

_ids = count()


def _rows(*finished: dt.datetime) -> list[ResultRecord]:
    return [ResultRecord(id=f"r{next(_ids):06d}", text_sha256="a" * 64, text_chars=4,
                         model="m", status="done", label="positive", score=0.75,
                         finished_at=when) for when in finished]


def test_a_step_back_over_a_minute_start_keeps_the_windows_first_minute(
        store: ResultStore) -> None:
    """``now`` a second behind the last call's, across the start of a minute (two threads'
    reads of the clock in the other order): the half hour then starts a minute earlier,
    and that minute was never read. The answer lacked it where a whole read counts it."""
    now = dt.datetime(2026, 12, 6, 10, 0, 0, 500_000, tzinfo=dt.timezone.utc)
    first_minute = now - dt.timedelta(minutes=30, seconds=1)  # 09:29:59.5
    store.upsert(_rows(first_minute, *(now - dt.timedelta(seconds=s)
                                       for s in range(0, 1790, 30))))
    cache = TrendCache()
    assert cache.trend(store, now) == trend(store, now)
    back = now - dt.timedelta(seconds=1)
    expected = trend(store, back)
    assert expected[0] == {"bucket": "2026-12-06T09:29:00Z", "count": 1}
    assert cache.trend(store, back) == expected
    assert cache.full_refreshes == 1  # that minute alone is read, not the half hour
    # and on again past the minute: the kept minutes still answer as a whole read
    later = now + dt.timedelta(seconds=5)
    assert cache.trend(store, later) == trend(store, later)


def _default_beat(r: redis.Redis, settings: Settings, stored_name: str) -> None:
    """A heartbeat of a default-model worker whose rows carry ``stored_name``."""
    announce(r, settings.queue, "celery@dflt",
             json.dumps({"pid": 1, "model": stored_name, "device": "cpu"}))


def test_a_task_sent_to_the_default_model_reads_queued_on_a_server_of_a_named_model(
        bsettings: Settings, r: redis.Redis) -> None:
    """A server whose own model is named accepts ``"model": "default"`` (the default model
    always passes); its status without ``?model=`` looked for a claim of the server's
    own model, then a pointer a default-model claim never writes: a 404 ("no task was
    accepted") for a task queued, where the README says the task's latest (queued
    until its row is stored), and ``?wait=`` gave up at once."""
    settings = bsettings.replace(model_name="m1", api_coalesce_ms=0)
    with TestClient(create_app(settings)) as http:
        sent = http.post("/v1/tasks", json={"text": "for the default", "id": "d1",
                                            "model": "default"})
        assert sent.status_code == 202, sent.text
        got = http.get("/v1/tasks/d1")
        assert got.status_code == 200 and got.json()["status"] == "queued", got.text
        waited = http.get("/v1/tasks/d1?wait=0.3")
        assert waited.status_code == 200 and waited.json()["status"] == "queued", waited.text
        assert http.get("/v1/tasks/never").status_code == 404


def test_the_default_models_stored_name_finds_its_queued_task_on_a_server_of_a_named_model(
        bsettings: Settings, r: redis.Redis) -> None:
    """"The default model's stored name (the ``model`` its results show) also finds a
    queued default-model task, while one of its workers is alive" (README): on a server of
    a named model that name was a 404, ``default`` itself a ``queued``."""
    settings = bsettings.replace(model_name="m1", api_coalesce_ms=0)
    _default_beat(r, settings, "bert-x")
    with TestClient(create_app(settings)) as http:
        sent = http.post("/v1/tasks", json={"text": "for the default", "id": "d2",
                                            "model": "default"})
        assert sent.status_code == 202, sent.text
        assert http.get("/v1/tasks/d2?model=default").json()["status"] == "queued"
        got = http.get("/v1/tasks/d2?model=bert-x")
        assert got.status_code == 200 and got.json()["status"] == "queued", got.text
        # the server's own model did not take that task: still a 404
        assert http.get("/v1/tasks/d2?model=m1").status_code == 404


@pytest.mark.parametrize("kind", ["script", *REFUSALS])
def test_the_api_releases_a_named_models_claims_with_its_own_pointers_only(
        kind: str, redis_url: str, sqlite_url: str, tmp_path: Path) -> None:
    """The API's release of a named model's claims (``DROP_CLAIMS``, or its transaction
    where Redis refuses scripts) drops them and the pointers naming that model; a pointer
    naming another model (the id sent there since) stays, as does that model's claim."""
    with contextlib.ExitStack() as stack:
        url = redis_url
        if kind != "script":
            url = stack.enter_context(refusing_server(kind, tmp_path))[1]
        settings = Settings(broker_url=url, database_url=sqlite_url, model_name="m2",
                            queue=f"bst-rel-{uuid.uuid4().hex[:8]}")
        other = settings.replace(model_name="m3")
        admin = stack.enter_context(contextlib.closing(redis.Redis.from_url(url)))
        any_key = f"{ACCEPTED_ANY_KEY_PREFIX}{settings.queue}:"
        admin.set(f"{ACCEPTED_KEY_PREFIX}{settings.family}:a", "h", ex=600)
        admin.set(f"{any_key}a", settings.family, ex=600)
        admin.set(f"{ACCEPTED_KEY_PREFIX}{settings.family}:b", "h", ex=600)
        admin.set(f"{ACCEPTED_KEY_PREFIX}{other.family}:b", "h", ex=600)
        admin.set(f"{any_key}b", other.family, ex=600)
        client = stack.enter_context(Client(settings))
        submitter = Submitter(settings, client)
        stack.callback(submitter.close)
        submitter._release(["a", "b", "a"])
        left = sorted(k.decode() for k in admin.keys("*accepted*"))
        assert left == sorted([f"{ACCEPTED_KEY_PREFIX}{other.family}:b", f"{any_key}b"])
        assert submitter.scripted is (kind == "script")
