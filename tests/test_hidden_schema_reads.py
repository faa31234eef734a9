"""Reads by a role that lost USAGE on the schema holding the results.

PostgreSQL leaves a schema the role may not use out of its search path: the tables
look missing, so ``Client.get`` gave None, ``GET /v1/tasks/{id}`` of a stored task a
404 "no task was accepted" and ``GET /v1/results`` an empty page, while ``/readyz``
already named the GRANT. Such reads now fail with that GRANT: ``StoreRefused`` from
the client, a 503 ``database_misconfigured`` from the API. Real PostgreSQL roles on
the test database.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from api.app import create_app
from contract.errors import StoreRefused
from contract.results import ResultStore
from contract.settings import Settings
from producer import Client
from tests import test_db_refusals
from tests.producer_helpers import record
from tests.served_app import served
from tests.test_db_refusals import WorkerRole

#: A login role allowed to read and write the results tables only.
worker_role = test_db_refusals.worker_role


@contextmanager
def _without_usage(role: WorkerRole) -> Iterator[str]:
    """The role may not use schema public within (given back after); yields the GRANT
    the errors must name."""
    role.sql("REVOKE USAGE ON SCHEMA public FROM PUBLIC")
    try:
        yield f"GRANT USAGE ON SCHEMA public TO {role.name}"
    finally:
        role.sql("GRANT USAGE ON SCHEMA public TO PUBLIC")


def _settings(role: WorkerRole, redis_url: str) -> Settings:
    return Settings(broker_url=redis_url, database_url=role.url,
                    queue=f"bst-hidden-{uuid.uuid4().hex[:8]}")


def _stored(pg_url: str, *ids: str) -> None:
    store = ResultStore.from_url(pg_url)
    try:
        store.upsert([record(i) for i in ids])
    finally:
        store.close()


@pytest.mark.parametrize("first_read", ["before", "after"])
def test_client_reads_of_a_hidden_schema_raise_the_grant(
        worker_role: WorkerRole, pg_url: str, redis_url: str, first_read: str) -> None:
    """A stored task is not "not stored yet": get, get_many, query and wait raise
    StoreRefused naming the GRANT, whether the client had read the tables before the
    REVOKE (its schema check cached) or reads first after it."""
    _stored(pg_url, "a")
    with Client(_settings(worker_role, redis_url)) as client:
        if first_read == "before":
            assert client.get("a") is not None
        with _without_usage(worker_role) as grant:
            for read in (lambda: client.get("a"), lambda: client.get_many(["a"]),
                         lambda: client.query(ids=["a"]),
                         lambda: client.wait(["a"], timeout=5)):
                with pytest.raises(StoreRefused) as refused:
                    read()
                assert grant in refused.value.problem, refused.value
        assert client.get("a") is not None


def test_api_reads_of_a_hidden_schema_answer_503_misconfigured(
        worker_role: WorkerRole, pg_url: str, redis_url: str) -> None:
    """The task's status and the results listing answer 503 ``database_misconfigured``
    naming the GRANT (a 404 and an empty page before), and read again once it is run."""
    _stored(pg_url, "a")
    with served(create_app(_settings(worker_role, redis_url))) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/v1/tasks/a").status_code == 200
        with _without_usage(worker_role) as grant:
            answers = [http.get(path) for path in ("/v1/tasks/a", "/v1/results")]
        back = [http.get(path) for path in ("/v1/tasks/a", "/v1/results")]
    for answer in answers:
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["code"] == "database_misconfigured", error
        assert grant in error["message"] and "Retry-After" not in answer.headers, answer
    assert [b.status_code for b in back] == [200, 200], [b.text for b in back]
    assert [r["id"] for r in back[1].json()["items"]] == ["a"]


def test_a_hidden_schema_behind_an_empty_schema_of_the_role_s_own_is_named(
        worker_role: WorkerRole, pg_url: str, redis_url: str) -> None:
    """A schema named after the role ("$user", first in the default search path) that
    holds nothing: the tables in public, which the role may not use, were not looked
    for behind it, so the reads found no rows and ``/readyz`` said "no schema yet"."""
    name = worker_role.name
    _stored(pg_url, "a")
    worker_role.sql(f"CREATE SCHEMA {name} AUTHORIZATION {name}")
    try:
        with Client(_settings(worker_role, redis_url)) as client, \
                _without_usage(worker_role) as grant:
            with pytest.raises(StoreRefused) as refused:
                client.get("a")
        assert grant in refused.value.problem, refused.value
    finally:
        worker_role.sql(f"DROP SCHEMA {name} CASCADE")


@pytest.mark.parametrize("first_read", ["before", "after"])
def test_a_single_submit_whose_caller_id_meets_a_hidden_schema_answers_503_misconfigured(
        worker_role: WorkerRole, pg_url: str, redis_url: str, first_read: str) -> None:
    """``POST /v1/tasks`` of one task with its own id, which must be compared with the
    stored rows, answers 503 ``database_misconfigured`` naming the GRANT, as a bulk
    does, whether the API had read the tables before the REVOKE or not. The coalescing
    window turned the error into a plain outage: 503 ``database_unavailable`` with
    ``Retry-After``. Nothing is kept: sent again once the GRANT is run, the task is
    queued afresh."""
    _stored(pg_url, "a")
    settings = _settings(worker_role, redis_url).replace(api_models="*")
    one, bulk = {"id": "b", "text": "hi"}, {"items": [{"id": "b", "text": "hi"}]}
    with served(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        if first_read == "before":
            assert http.get("/v1/tasks/a").status_code == 200
        with _without_usage(worker_role) as grant:
            answers = [http.post("/v1/tasks", json=body) for body in (one, bulk)]
        back = http.post("/v1/tasks", json=one)
    for answer in answers:
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["code"] == "database_misconfigured", error
        assert grant in error["message"] and "Retry-After" not in answer.headers, answer
    assert back.status_code == 202 and back.json()["duplicate"] is False, back.text
