"""The HTTP API's id claims last until the task's row is stored, not for their whole TTL.

Each task the API accepts claims its id in Redis; once a worker has committed the row,
the row answers resubmits and status reads, and the worker drops the claim (a week of
claims at a busy API's rate filled Redis). Real worker processes, the real API app, the
real Redis; a Redis refusing scripts on a private server with a real ACL user.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.submit import Submitter
from contract.constants import ACCEPTED_ANY_KEY_PREFIX, ACCEPTED_KEY_PREFIX
from contract.messages import text_sha256
from contract.results import ResultRecord, ResultStore
from contract.retries import retry_marker
from contract.settings import Settings
from producer.client import Client
from tests.polling import until
from tests.scriptless_redis import REFUSALS, Server, refusing_server
from worker.claims import ClaimDropper


def _claims(r: redis.Redis) -> list[str]:
    return sorted(k.decode() for k in r.keys(f"{ACCEPTED_KEY_PREFIX}*")
                  + r.keys(f"{ACCEPTED_ANY_KEY_PREFIX}*"))


def _done(task_id: str, text: str, model: str = "m") -> ResultRecord:
    return ResultRecord(id=task_id, text_sha256=text_sha256(text), text_chars=len(text),
                        model=model, status="done", label="positive", score=0.9,
                        finished_at=dt.datetime.now(dt.timezone.utc))


@pytest.mark.slow
def test_a_worker_drops_the_claims_of_the_rows_it_stores(
        settings: Settings, r: redis.Redis, worker_factory: Any, tiny_model_dir: Path) -> None:
    """Claims used to stay for their TTL (a week by default) after the rows were stored."""
    settings = settings.replace(model=str(tiny_model_dir))
    worker_factory(settings)
    texts = {f"t{i}": f"text number {i}, rather good" for i in range(40)}
    with TestClient(create_app(settings)) as http:
        got = http.post("/v1/tasks", json={"items": [{"id": k, "text": v}
                                                     for k, v in texts.items()]})
        assert got.status_code == 202 and got.json()["accepted"] == 40, got.text
        single = http.post("/v1/tasks", json={"text": "one alone", "id": "solo"})
        assert single.status_code == 202, single.text
        for task_id in [*texts, "solo"]:
            assert http.get(f"/v1/tasks/{task_id}?wait=20").json()["status"] == "done"
        until(lambda: not _claims(r), what="every claim dropped")

        # The stored rows answer now: a resubmit is a duplicate, another text a conflict,
        # and neither leaves a claim behind.
        again = http.post("/v1/tasks", json={"text": texts["t3"], "id": "t3"})
        assert again.status_code == 202 and again.json()["duplicate"] is True, again.text
        other = http.post("/v1/tasks", json={"text": "another text", "id": "t4"})
        assert other.status_code == 409, other.text
        assert http.get("/v1/tasks/t5").json()["status"] == "done"
        assert _claims(r) == []

    # A redelivered task whose row is done is not run again: its claim is dropped too.
    r.set(f"{ACCEPTED_KEY_PREFIX}{settings.family}:t7", text_sha256(texts["t7"]), ex=600)
    with Client(settings) as client:
        client.submit(texts["t7"], id="t7")
    until(lambda: not _claims(r), what="the claim of a task found done dropped")


def test_a_duplicate_answered_by_its_stored_row_keeps_no_claim(
        bsettings: Settings, r: redis.Redis) -> None:
    store = ResultStore.from_url(bsettings.database_url)
    try:
        store.create_schema()
        store.upsert([_done("kept", "the same text")])
    finally:
        store.close()
    with TestClient(create_app(bsettings)) as http:
        dup = http.post("/v1/tasks", json={"text": "the same text", "id": "kept"})
        assert dup.status_code == 202 and dup.json()["duplicate"] is True, dup.text
        clash = http.post("/v1/tasks", json={"items": [
            {"text": "the same text", "id": "kept"}, {"text": "new", "id": "new"}]})
        assert clash.json()["accepted"] == 1, clash.text
        # the new task waits for its worker: its claim stays
        assert _claims(r) == [f"{ACCEPTED_KEY_PREFIX}{bsettings.family}:new"]


def _status_raced(bsettings: Settings, monkeypatch: pytest.MonkeyPatch,
                  meanwhile: Callable[[Submitter, ResultStore, str], None],
                  ) -> tuple[Any, Any]:
    """``GET /v1/tasks/race`` and ``GET /v1/tasks/never-sent`` of a task submitted as
    "race", with ``meanwhile(submitter, store, task_id)`` run between the status read's
    row read and its claim read (what a worker storing the row at that moment does)."""
    store = ResultStore.from_url(bsettings.database_url)
    store.create_schema()
    looked_up = Submitter.accepted_for

    def raced(self: Submitter, task_id: str, model: str | None) -> str | None:
        if task_id == "race":
            meanwhile(self, store, task_id)
        return looked_up(self, task_id, model)

    try:
        with TestClient(create_app(bsettings)) as http:
            assert http.post("/v1/tasks", json={"text": "racing text",
                                                "id": "race"}).status_code == 202
            monkeypatch.setattr(Submitter, "accepted_for", raced)
            return http.get("/v1/tasks/race"), http.get("/v1/tasks/never-sent")
    finally:
        store.close()


def test_a_status_read_finds_a_row_stored_while_it_looked_for_the_claim(
        bsettings: Settings, r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The row is read first, then the claim: a worker committing the row and dropping
    the claim in between made the read a 404 for a task that was done."""
    def stored(_submitter: Submitter, store: ResultStore, task_id: str) -> None:
        store.upsert([_done(task_id, "racing text")])
        ClaimDropper(bsettings).drop([task_id])

    got, missing = _status_raced(bsettings, monkeypatch, stored)
    assert got.status_code == 200 and got.json()["status"] == "done", got.text
    assert missing.status_code == 404, missing.text


@pytest.mark.slow
def test_the_second_read_of_a_status_sees_a_queued_retry(
        bsettings: Settings, r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row found only by the status read's second read (stored, its claim dropped,
    between the two) is answered as the first read answers it: ``queued`` with
    ``retry_of`` while a retry of its failed attempt is queued, not the failed row."""
    def failed_and_retried(submitter: Submitter, store: ResultStore, task_id: str) -> None:
        failed = ResultRecord(id=task_id, text_sha256=text_sha256("racing text"),
                              text_chars=11, model="m", status="failed", error="it failed",
                              finished_at=dt.datetime.now(dt.timezone.utc))
        store.upsert([failed])
        ClaimDropper(bsettings).drop([task_id])
        r.set(submitter.retry_key(task_id), retry_marker(1, failed.model, ""), ex=600)

    got, _ = _status_raced(bsettings, monkeypatch, failed_and_retried)
    assert got.status_code == 200, got.text
    assert got.json()["status"] == "queued", got.json()
    assert got.json()["retry_of"]["status"] == "failed", got.json()


def test_only_this_models_claims_and_pointers_are_dropped(bsettings: Settings,
                                                           r: redis.Redis) -> None:
    named = bsettings.replace(model_name="m2")
    other = bsettings.replace(model_name="m3")
    any_key = f"{ACCEPTED_ANY_KEY_PREFIX}{bsettings.queue}:"
    r.set(f"{ACCEPTED_KEY_PREFIX}{named.family}:a", "h", ex=600)
    r.set(f"{any_key}a", named.family, ex=600)
    r.set(f"{ACCEPTED_KEY_PREFIX}{named.family}:b", "h", ex=600)
    r.set(f"{ACCEPTED_KEY_PREFIX}{other.family}:b", "h", ex=600)
    r.set(f"{any_key}b", other.family, ex=600)  # b was sent to m3 after m2
    r.set(f"{ACCEPTED_KEY_PREFIX}{bsettings.family}:a", "h", ex=600)
    ClaimDropper(named).drop(["a", "b", "", "c\0d"])
    assert _claims(r) == sorted([f"{ACCEPTED_KEY_PREFIX}{other.family}:b", f"{any_key}b",
                                 f"{ACCEPTED_KEY_PREFIX}{bsettings.family}:a"])


@pytest.fixture(params=REFUSALS)
def refusing(request: Any, tmp_path: Path) -> Iterator[tuple[Server, str]]:
    with refusing_server(request.param, tmp_path) as found:
        yield found


def test_claims_are_dropped_on_a_redis_that_refuses_scripts(
        refusing: tuple[Server, str], caplog: pytest.LogCaptureFixture) -> None:
    server, url = refusing
    settings = Settings(broker_url=url, queue=f"bst-drop-{uuid.uuid4().hex[:8]}",
                        model_name="m2")
    client = redis.Redis.from_url(url)
    any_key = f"{ACCEPTED_ANY_KEY_PREFIX}{settings.queue}:"
    client.set(f"{ACCEPTED_KEY_PREFIX}{settings.family}:a", "h", ex=600)
    client.set(any_key + "a", settings.family, ex=600)
    caplog.set_level(logging.WARNING, logger="worker.claims")
    dropper = ClaimDropper(settings)
    dropper.drop(["a"])
    assert not dropper.scripted
    client.set(f"{ACCEPTED_KEY_PREFIX}{settings.family}:b", "h", ex=600)
    client.set(any_key + "b", settings.family, ex=600)
    client.set(any_key + "c", f"{settings.queue}-other", ex=600)  # another model's claim
    dropper.drop(["b", "c"])
    # The claims are gone, and the pointers for reads without a model that named this
    # model (in a transaction, as the script does); another model's pointer stays.
    assert client.keys(f"{ACCEPTED_KEY_PREFIX}*") == []
    assert sorted(client.keys(f"{ACCEPTED_ANY_KEY_PREFIX}*")) == [(any_key + "c").encode()]
    refusals = [r for r in caplog.records if "refuses scripts" in r.getMessage()]
    assert len(refusals) == 1 and "WATCH/MULTI" in refusals[0].getMessage()
    assert len(caplog.records) == 1  # no failed drop
    client.close()
    dropper.close()


def test_a_redis_gone_at_the_drop_is_a_warning(redis_server: Any,
                                               caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(broker_url=redis_server.url, queue="bst-drop-gone",
                        redis_socket_timeout_s=1.0)
    dropper = ClaimDropper(settings)
    redis_server.stop()
    caplog.set_level(logging.WARNING, logger="worker.claims")
    dropper.drop(["a", "b"])  # no exception
    assert any("expire on their own" in m.getMessage() for m in caplog.records)
    dropper.close()


def test_a_status_without_a_model_reads_the_latest_row_on_a_server_of_a_named_model(
        bsettings: Settings, r: redis.Redis) -> None:
    """A server whose own model is named read only that model's rows for a status without
    ``?model=``: a task sent to another model said ``queued`` for good, and a 404 once
    its claim was dropped. Without a model, a status is the task's latest row."""
    settings = bsettings.replace(model_name="m1", api_models="m2")
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    try:
        with TestClient(create_app(settings)) as http:
            for task_id in ("x", "y"):
                sent = http.post("/v1/tasks", json={"text": f"for m2 {task_id}",
                                                    "id": task_id, "model": "m2"})
                assert sent.status_code == 202, sent.text
            assert http.get("/v1/tasks/x").json()["status"] == "queued"
            store.upsert([_done("x", "for m2 x", model="m2")])
            ClaimDropper(settings.replace(model_name="m2")).drop(["x"])
            got = http.get("/v1/tasks/x")
            assert got.status_code == 200, got.text
            assert (got.json()["status"], got.json()["model"]) == ("done", "m2")
            assert http.get("/v1/tasks/x?model=m1").status_code == 404
            # A long poll waits for the latest row too (stored while it waits).
            later = threading.Timer(0.5, store.upsert, [[_done("y", "for m2 y", model="m2")]])
            later.start()
            waited = http.get("/v1/tasks/y?wait=10")
            later.join()
            assert waited.json()["status"] == "done", waited.text
    finally:
        store.close()
