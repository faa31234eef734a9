"""A refusal that concerns some items fails those items only: a database outage fails the
coalesced submits whose caller id had to be compared with the stored rows (generated ids
need no database), and a bulk whose items all conflict is a 202 listing each conflict."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
from typing import Any

import httpx
import redis

from api.submit import ACCEPTED, DUPLICATE, Coalescer, Outcome, Submitter
from contract.errors import StoreUnavailable
from contract.messages import TaskItem, new_id, text_sha256
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from producer.client import Client
from worker.process import free_port


def _down(settings: Settings) -> Settings:
    return settings.replace(database_url=f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/x")


def test_a_database_outage_fails_only_the_caller_ids_of_a_coalesced_window(
        settings: Settings) -> None:
    down = _down(settings)
    raw = redis.Redis.from_url(settings.broker_url)
    with Client(down) as client:
        submitter = Submitter(down, client)
        # An id already claimed with this text: answered "duplicate" from Redis alone.
        submitter.submit([TaskItem(id="known", text="known text")], lane="interactive")
        coalescer = Coalescer(submitter, 0.3, 100)
        generated = new_id()

        async def one_window() -> list[Outcome | BaseException]:
            return list(await asyncio.gather(
                coalescer.submit(TaskItem(id="cid-1", text="a"), "interactive", caller_id=True),
                coalescer.submit(TaskItem(id=generated, text="b"), "interactive",
                                 caller_id=False),
                coalescer.submit(TaskItem(id="known", text="known text"), "interactive",
                                 caller_id=True),
                coalescer.submit(TaskItem(id="cid-1", text="a"), "interactive", caller_id=True),
                return_exceptions=True))

        got = asyncio.run(one_window())
        assert coalescer.messages == 1
        assert isinstance(got[0], StoreUnavailable) and isinstance(got[3], StoreUnavailable)
        assert isinstance(got[1], Outcome) and (got[1].id, got[1].status) == (generated,
                                                                              ACCEPTED)
        assert isinstance(got[2], Outcome) and got[2].status == DUPLICATE
        assert client.queue_length() == 2  # "known" earlier, the generated id now
        # The refused caller id keeps no claim: its retry is answered afresh.
        assert not raw.exists(submitter.key("cid-1"))
        assert raw.exists(submitter.key(generated))
        submitter.close()
    raw.close()


def test_concurrent_submits_with_and_without_an_id_while_the_database_is_down(
        settings: Settings, api_factory: Any) -> None:
    api = api_factory(_down(settings).replace(api_coalesce_ms=300))
    with httpx.Client(base_url=api.url, timeout=30) as http, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        with_id, without = pool.map(lambda body: http.post("/v1/tasks", json=body),
                                    [{"text": "with caller id", "id": "cid-1"},
                                     {"text": "generated id"}])
    assert with_id.status_code == 503, with_id.text
    assert with_id.json()["error"]["code"] == "database_unavailable"
    assert without.status_code == 202, without.text
    with Client(settings) as client:
        assert client.queue_length() == 1


def test_a_bulk_whose_items_all_conflict_lists_each_conflict(settings: Settings,
                                                            api_factory: Any) -> None:
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    store.upsert([ResultRecord(id="stored-1", text_sha256=text_sha256("stored text"),
                               text_chars=11, model="m", status="done", label="positive",
                               score=0.9, scores={"positive": 0.9},
                               finished_at=dt.datetime.now(dt.timezone.utc))])
    store.close()
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        assert http.post("/v1/tasks", json={"text": "one", "id": "c1"}).status_code == 202
        r = http.post("/v1/tasks", json={"items": [{"text": "two", "id": "c1"},
                                                   {"text": "other", "id": "stored-1"}]})
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["ids"] == [None, None] and body["accepted"] == body["duplicates"] == 0
        assert [(e["index"], e["id"]) for e in body["errors"]] == [(0, "c1"), (1, "stored-1")]
        assert "different text" in body["errors"][0]["reason"]
        assert "stored with a different text" in body["errors"][1]["reason"]
        # An invalid item next to a conflict: still a 202 with both errors.
        mixed = http.post("/v1/tasks", json={"items": [{"text": " "}, {"text": "two", "id": "c1"}]})
        assert mixed.status_code == 202, mixed.text
        assert [e["index"] for e in mixed.json()["errors"]] == [0, 1]
        # Only when every item is invalid is the bulk a 422.
        invalid = http.post("/v1/tasks", json={"items": [{"text": ""}, {"txt": "typo"}]})
        assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "invalid_input"
    with Client(settings) as client:
        assert client.queue_length() == 1  # "one" only
