"""Review of the claims dropped at commit and of the model gate: answers that were right
before those changes. Real Redis, real worker processes, the real API app."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import MODEL_LIVENESS_TTL_S, create_app
from api.submit import QUEUE_LENGTH_TTL_S
from contract.broker import lane_queue
from contract.constants import ACCEPTED_ANY_KEY_PREFIX, ACCEPTED_KEY_PREFIX, STATUS_FAILED
from contract.messages import text_sha256
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from producer.client import Client
from tests.polling import until
from tests.test_undeliverable import untagged


@pytest.fixture
def base(redis_url: str, sqlite_url: str, tmp_path: Path, tiny_model_dir: Path) -> Settings:
    """One queue of its own, one SQLite file the API and the workers share."""
    return Settings(broker_url=redis_url, database_url=sqlite_url,
                    queue=f"bst-rv-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                    model=str(tiny_model_dir), max_wait_ms=20, api_coalesce_ms=0)


def _claims(r: redis.Redis) -> list[str]:
    return sorted(k.decode() for k in r.keys(f"{ACCEPTED_KEY_PREFIX}*")
                  + r.keys(f"{ACCEPTED_ANY_KEY_PREFIX}*"))


@pytest.mark.slow
def test_a_stored_task_sent_again_while_the_queue_is_full_is_still_a_duplicate(
        base: Settings, r: redis.Redis, worker_factory: Any) -> None:
    """Over the queue bound, the repeat of a task accepted with the same text is answered
    ``duplicate`` (README), read off its claim. Once the worker dropped the claim of the
    stored task, the repeat was a 429 ``busy``: a client retrying its accepted task then
    waits for a queue that has nothing to do with it."""
    settings = base.replace(max_queue_length=1)
    worker = worker_factory(settings)
    with TestClient(create_app(settings)) as http:
        assert http.post("/v1/tasks", json={"text": "kept text", "id": "kept"}).status_code == 202
        assert http.get("/v1/tasks/kept?wait=30").json()["status"] == "done"
        until(lambda: not _claims(r), what="the stored task's claim dropped")
        worker.stop()
        for i in range(2):  # no worker now: the queue passes its bound of 1 message
            assert http.post("/v1/tasks", json={"text": f"filler {i}"}).status_code == 202
        time.sleep(QUEUE_LENGTH_TTL_S + 0.05)
        assert http.post("/v1/tasks", json={"text": "new", "id": "new"}).status_code == 429
        again = http.post("/v1/tasks", json={"text": "kept text", "id": "kept"})
        assert again.status_code == 202 and again.json()["duplicate"] is True, again.text
        # another text under that id is no duplicate: busy, as before
        other = http.post("/v1/tasks", json={"text": "another", "id": "kept"})
        assert other.status_code == 429, other.text


@pytest.mark.slow
def test_a_named_model_whose_worker_restarts_is_not_refused_meanwhile(
        base: Settings, worker_factory: Any) -> None:
    """A warm stop withdraws the heartbeat at once and the next worker beats only once its
    model is loaded: a rolling restart of a named model's worker made every submit to it
    a 404 ``unknown_model`` meanwhile, though its queue is served again a moment later
    (before the gate, such a task waited queued and was scored)."""
    named = base.replace(model_name="m2")
    first = worker_factory(named)
    with TestClient(create_app(base)) as http:
        seen = http.post("/v1/tasks", json={"text": "before", "id": "b", "model": "m2"})
        assert seen.status_code == 202, seen.text
        first.stop()  # a deploy, a restart: its heartbeat is withdrawn
        time.sleep(MODEL_LIVENESS_TTL_S + 0.1)
        during = http.post("/v1/tasks", json={"text": "sent meanwhile", "id": "gap",
                                              "model": "m2"})
        assert during.status_code == 202, during.text
        worker_factory(named)
        got = http.get("/v1/tasks/gap", params={"model": "m2", "wait": 30}).json()
        assert got["status"] == "done", got
        # a name never served is refused all the same
        typo = http.post("/v1/tasks", json={"text": "x", "model": "m3"})
        assert typo.status_code == 404, typo.text


@pytest.mark.slow
def test_the_claims_of_a_parked_items_tasks_are_dropped_once_their_rows_are_stored(
        base: Settings, r: redis.Redis, worker_factory: Any) -> None:
    """A list item kombu cannot deliver gets its tasks' ``failed`` rows from the worker
    (``fail_undeliverable``), outside a flush: their claims stayed for the TTL, though the
    README says only the tasks whose row never got stored keep theirs."""
    worker_factory(base)
    ids = ["parked-1", "parked-2"]
    texts = ["the hotel is good", "the room is dirty"]
    for task_id, text in zip(ids, texts, strict=True):  # as the API claims them
        r.set(f"{ACCEPTED_KEY_PREFIX}{base.family}:{task_id}", text_sha256(text), ex=600)
    queue = lane_queue(base, bulk=False)
    r.lpush(queue, untagged(queue, base.queue, "celery-1", [
        {"id": i, "text": t} for i, t in zip(ids, texts, strict=True)]))
    with Client(base) as client:
        rows = client.wait(ids, timeout=30)
    assert all(rows[i].status == STATUS_FAILED for i in ids), rows
    until(lambda: not _claims(r), what="the parked tasks' claims dropped")


def test_a_named_models_resubmit_answered_by_its_stored_row_leaves_no_pointer(
        base: Settings, r: redis.Redis) -> None:
    """A fresh claim for a named model also writes the pointer reads without a model use
    (``accepted-any``); the claim of a resubmit its stored row answered (duplicate or
    conflict) is released, but the pointer stayed for the whole TTL: one key per such
    resubmit, where the README counts only the claims of tasks not stored yet."""
    settings = base.replace(api_models="*")
    store = ResultStore.from_url(settings.database_url)
    try:
        store.create_schema()
        store.upsert([ResultRecord(id="x", text_sha256=text_sha256("same"), text_chars=4,
                                   model="m2", status="done", label="positive", score=0.9,
                                   finished_at=dt.datetime.now(dt.timezone.utc))])
    finally:
        store.close()
    with TestClient(create_app(settings)) as http:
        dup = http.post("/v1/tasks", json={"id": "x", "text": "same", "model": "m2"})
        assert dup.status_code == 202 and dup.json()["duplicate"] is True, dup.text
        bulk = http.post("/v1/tasks", json={"items": [{"id": "x", "text": "same"}],
                                            "model": "m2"})
        assert bulk.status_code == 202 and bulk.json()["duplicates"] == 1, bulk.text
        clash = http.post("/v1/tasks", json={"id": "x", "text": "other", "model": "m2"})
        assert clash.status_code == 409, clash.text
        assert _claims(r) == []
        # a new task keeps its claim and pointer until its row is stored
        new = http.post("/v1/tasks", json={"id": "y", "text": "new", "model": "m2"})
        assert new.status_code == 202, new.text
        family = settings.replace(model_name="m2").family
        assert _claims(r) == [f"{ACCEPTED_ANY_KEY_PREFIX}{settings.queue}:y",
                              f"{ACCEPTED_KEY_PREFIX}{family}:y"]
        assert http.get("/v1/tasks/y").json()["status"] == "queued"
