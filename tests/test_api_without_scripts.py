"""Submitting through the API, and taking back delivery counts in a worker, on a Redis
that refuses scripts: an ACL user without ``+@scripting``, or a server without Lua.

The API claims ids and marks retries with a script; where Redis refuses it, the same
steps run as a WATCH/MULTI transaction, with the same guarantees: every id of a request
claimed at once, a re-submit a duplicate, another text a conflict, each stored attempt
retried once. The switch is logged once. Private redis-servers, real ACL users, the real
API app.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.submit import ACCEPTED, CONFLICT, Submitter
from contract.constants import (
    ACCEPTED_ANY_KEY_PREFIX,
    DELIVERY_KEY_PREFIX,
    RETRYING_KEY_PREFIX,
)
from contract.messages import TaskItem, text_sha256
from contract.results import ResultRecord, ResultStore
from contract.retries import retry_key
from contract.settings import Settings
from producer.client import Client
from tests.scriptless_redis import REFUSALS, Server, refusing_server
from worker.deliveries import DeliveryCounter


@pytest.fixture(params=REFUSALS)
def refusing(request: Any, tmp_path: Path) -> Iterator[tuple[Server, str]]:
    """A private server and the URL of a user on it whose scripts Redis refuses."""
    with refusing_server(request.param, tmp_path) as found:
        yield found


def _failed(task_id: str, text: str) -> ResultRecord:
    return ResultRecord(id=task_id, text_sha256=text_sha256(text), text_chars=len(text),
                        model="m", status="failed", error="it failed",
                        finished_at=dt.datetime.now(dt.timezone.utc))


def _refusal_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "api.submit" and "refuses scripts" in r.getMessage()]


def test_submits_are_claimed_judged_and_retried_when_redis_refuses_scripts(
        refusing: tuple[Server, str], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Every submit used to be a 500 (NOPERM on EVALSHA, or EVALSHA unknown)."""
    server, url = refusing
    settings = Settings(broker_url=url, database_url=f"sqlite:///{tmp_path}/r.db",
                        queue=f"bst-noscript-{uuid.uuid4().hex[:8]}")
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    store.upsert([_failed("f1", "text f")])
    caplog.set_level(logging.INFO, logger="api.submit")
    with TestClient(create_app(settings), raise_server_exceptions=False) as http:
        first = http.post("/v1/tasks", json={"text": "hello", "id": "a"})
        assert first.status_code == 202 and first.json()["duplicate"] is False, first.text
        again = http.post("/v1/tasks", json={"text": "hello", "id": "a"})
        assert again.status_code == 202 and again.json()["duplicate"] is True, again.text
        other = http.post("/v1/tasks", json={"text": "not hello", "id": "a"})
        assert other.status_code == 409, other.text
        items = [{"text": "hello", "id": "a"}, {"text": "x", "id": "b"}, "y"]
        bulk = http.post("/v1/tasks", json={"items": items})
        assert bulk.status_code == 202, bulk.text
        assert (bulk.json()["accepted"], bulk.json()["duplicates"]) == (2, 1), bulk.text
        assert http.get("/v1/tasks/b").json()["status"] == "queued"
        # A stored failed row, sent again: queued once, then a duplicate of that retry.
        retry = http.post("/v1/tasks", json={"text": "text f", "id": "f1"})
        assert retry.status_code == 202 and retry.json()["duplicate"] is False, retry.text
        twice = http.post("/v1/tasks", json={"text": "text f", "id": "f1"})
        assert twice.status_code == 202 and twice.json()["duplicate"] is True, twice.text
        status = http.get("/v1/tasks/f1").json()
        assert status["status"] == "queued" and status["retry_of"]["attempts"] == 1, status
    assert server.admin.get(retry_key(settings.queue, "f1")) is not None
    with Client(settings) as client:
        assert client.queue_length() == 3  # a, the bulk message, f1's retry
    store.close()
    assert len(_refusal_logs(caplog)) == 1, _refusal_logs(caplog)


def test_the_transaction_answers_what_the_script_answers(tmp_path: Path) -> None:
    """The same submits, one submitter running the scripts and one refused them: the same
    outcomes, and the same keys (claims, a named model's family record, retry markers)
    with the same values. Repeats in one batch and stored rows included."""
    server = Server(tmp_path, [])
    plain = server.add_user_without_scripting()
    try:
        found = []
        for url, queue in ((server.url(), "bst-s"), (plain, "bst-p")):
            settings = Settings(broker_url=url, database_url=f"sqlite:///{tmp_path}/{queue}.db",
                                queue=queue, model_name="big")
            store = ResultStore.from_url(settings.database_url)
            store.create_schema()
            store.upsert([_failed("f1", "text f"), _failed("c1", "text c")])
            with Client(settings) as client:
                submitter = Submitter(settings, client)
                batches = [
                    [TaskItem(id="a", text="one"), TaskItem(id="b", text="two"),
                     TaskItem(id="a", text="one"), TaskItem(id="b", text="other")],
                    [TaskItem(id="a", text="one"), TaskItem(id="c", text="three"),
                     TaskItem(id="f1", text="text f"), TaskItem(id="c1", text="wrong")],
                    [TaskItem(id="f1", text="text f"), TaskItem(id="a", text="changed")],
                ]
                outcomes = []
                for items in batches:
                    ids = frozenset(i.id for i in items)
                    outcomes.append([(o.id, o.status, o.reason) for o in
                                     submitter.submit(items, lane="bulk", caller_ids=ids)])
                values = {k.decode().replace(queue, "Q"):
                          (server.admin.get(k) or b"").decode().replace(queue, "Q")
                          for k in server.admin.keys(f"bertstream:*{queue}*")}
                found.append((outcomes, values, client.queue_length()))
                assert submitter.scripted is (url == server.url())
                submitter.close()
            store.close()
        assert found[0] == found[1]
        assert found[0][2] == 2  # the first two batches' messages; the third queues none
        assert any(k.startswith(ACCEPTED_ANY_KEY_PREFIX) for k in found[0][1])
        assert any(k.startswith(RETRYING_KEY_PREFIX) for k in found[0][1])
    finally:
        server.stop()


def test_a_claim_made_meanwhile_is_not_overwritten(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Another request claims one of the ids between the transaction's read and its
    writes (injected there: a race too narrow to meet on purpose). The transaction reads
    again, so that id is answered by the claim made meanwhile, not accepted twice, and the
    other ids of the request are claimed as one."""
    server = Server(tmp_path, [])
    try:
        settings = Settings(broker_url=server.add_user_without_scripting(),
                            database_url=f"sqlite:///{tmp_path}/r.db", queue="bst-race")
        items = [TaskItem(id=f"t{i}", text=f"text {i}") for i in range(3)]
        with Client(settings) as client:
            submitter = Submitter(settings, client)
            submitter.submit([TaskItem(id="warm", text="up")], lane="bulk")  # the switch
            assert not submitter.scripted
            multi = redis.client.Pipeline.multi
            raced: list[str] = []

            def claimed_meanwhile(pipe: Any) -> None:
                if not raced:
                    raced.append(submitter.key("t1"))
                    server.admin.set(raced[0], text_sha256("another text"))
                multi(pipe)

            monkeypatch.setattr(redis.client.Pipeline, "multi", claimed_meanwhile)
            outcomes = submitter.submit(items, lane="bulk", caller_ids=frozenset({"t1"}))
            assert [(o.id, o.status) for o in outcomes] == [
                ("t0", ACCEPTED), ("t1", CONFLICT), ("t2", ACCEPTED)]
            assert server.admin.get(raced[0]) == text_sha256("another text").encode()
            assert client.queue_length() == 2  # warm's message, then t0 and t2's
            submitter.close()
    finally:
        server.stop()


def test_delivery_counts_are_taken_back_when_redis_refuses_scripts(
        refusing: tuple[Server, str]) -> None:
    """A held message's copy joining its original, a warm shutdown, an outage: each takes
    its deliveries back with :meth:`DeliveryCounter.undo`, which ran a script (on such a
    Redis it raised, and out of a flush where a copy joined its original)."""
    server, url = refusing
    counter = DeliveryCounter(Settings(broker_url=url))
    try:
        assert counter.incr(["m1", "m2", "m2", "m3", "m3", "m3"]) == [1, 1, 2, 1, 2, 3]
        counter.undo(["m1", "m2", "m3", "m3", "absent"])
        assert [server.admin.get(DELIVERY_KEY_PREFIX + m) for m in ("m1", "m2", "m3")] == [
            None, b"1", b"1"]
        assert not server.admin.exists(DELIVERY_KEY_PREFIX + "absent")
        assert server.admin.ttl(DELIVERY_KEY_PREFIX + "m2") > 0  # still expires
        counter.undo(["m2", "m2"])  # never below zero
        assert not server.admin.exists(DELIVERY_KEY_PREFIX + "m2")
    finally:
        counter.close()

