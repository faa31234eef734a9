"""A broker Redis whose eviction policy may drop the queues, as an operator meets it.

The README asks for ``maxmemory-policy noeviction``: under ``allkeys-*`` a full Redis
evicts keys, and a queue is one key, so every task waiting in it goes at once, with no
error to the producer or the worker. Managed services often ship ``allkeys-lru`` or
``volatile-lru``, and nothing checked: a worker started on such a Redis said nothing.
It now warns once at start (the policy, the maxmemory, the loss, the fix), ``/readyz``
carries the warning while staying ready, and ``volatile-*`` (which leaves the queues
alone: they have no TTL) gets a milder info line. A Redis that refuses ``INFO`` (an ACL
user without ``+info``) starts the worker all the same. Private redis-servers with
real policies and a real ACL user; the shared test Redis is never reconfigured.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from contract.constants import STATUS_DONE
from contract.settings import Settings
from producer.client import Client
from tests.polling import until
from tests.scriptless_redis import Server
from tests.served_app import served
from worker.heartbeat import Heartbeat

#: What the worker's warning says of an ``allkeys-*`` policy, whatever the policy.
LOST = "the tasks queued there are lost without an error to anyone"
FIX = "`CONFIG SET maxmemory-policy noeviction`"
#: What the milder ``volatile-*`` line says.
SAFE = "queued tasks are safe (their keys have no TTL)"


@pytest.fixture
def policy_server(tmp_path: Path) -> Iterator[Callable[[str, str], Server]]:
    """Start private redis-servers with ``--maxmemory LIMIT --maxmemory-policy POLICY``;
    all are stopped at teardown."""
    started: list[Server] = []

    def start(policy: str, limit: str) -> Server:
        workdir = tmp_path / f"redis-{len(started)}"
        workdir.mkdir()
        server = Server(workdir, ["--maxmemory", limit, "--maxmemory-policy", policy])
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _settings(url: str, sqlite_url: str, tmp_path: Path) -> Settings:
    return Settings(broker_url=url, database_url=sqlite_url, model="null",
                    queue=f"bst-evict-{uuid.uuid4().hex[:8]}", max_wait_ms=20,
                    cache_dir=str(tmp_path / "cache"))


def _lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


@pytest.mark.slow
def test_an_allkeys_redis_loses_queued_tasks_and_the_worker_says_so_at_start(
        policy_server: Callable[[str, str], Server], sqlite_url: str, tmp_path: Path,
        worker_factory: Any) -> None:
    server = policy_server("allkeys-lru", "2mb")
    settings = _settings(server.url(), sqlite_url, tmp_path)
    # The hazard itself: the producer is told nothing, and the queue empties at once.
    peak = lost_at = 0
    with Client(settings) as client:
        for n in range(1, 3001):
            client.submit("x" * 900 + f" {n}")
            queued = client.queue_length()
            if queued < peak:
                lost_at = n
                break
            peak = queued
    assert lost_at, "the queue never lost a task"
    assert queued <= 1 < peak, (queued, peak)  # the whole list went, one key
    worker = worker_factory(settings)
    said = _lines(worker.log(), "maxmemory-policy is allkeys-lru")
    assert len(said) == 1, worker.log()
    assert " WARNING " in said[0], said
    for part in ("with maxmemory 2.00M", LOST, FIX, "maxmemory-policy parameter of a managed "
                 "service", server.url()):
        assert part in said[0], (part, said)


@pytest.mark.parametrize(("policy", "limit", "level", "says"), [
    ("allkeys-lru", "64mb", logging.WARNING, LOST),
    ("allkeys-lfu", "64mb", logging.WARNING, LOST),
    ("allkeys-random", "64mb", logging.WARNING, LOST),
    ("volatile-lru", "64mb", logging.INFO, SAFE),
    ("volatile-ttl", "64mb", logging.INFO, SAFE),
    ("noeviction", "64mb", None, None),
    ("allkeys-lru", "0", None, None),  # no limit: nothing is ever evicted
], ids=["allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-ttl",
        "noeviction", "allkeys-lru-no-maxmemory"])
def test_what_the_worker_says_of_each_policy(
        policy: str, limit: str, level: int | None, says: str | None,
        policy_server: Callable[[str, str], Server], sqlite_url: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    from worker.app import warn_eviction

    server = policy_server(policy, limit)
    caplog.set_level(logging.INFO, logger="worker.app")
    warned = warn_eviction(_settings(server.url(), sqlite_url, tmp_path))
    lines = [r for r in caplog.records if "maxmemory" in r.getMessage()]
    assert warned == (level == logging.WARNING)
    if says is None:
        assert lines == [], [r.getMessage() for r in lines]
        return
    [record] = lines
    text = record.getMessage()
    assert record.levelno == level and says in text, text
    assert f"maxmemory-policy is {policy} with maxmemory 64.00M" in text, text
    assert "CONFIG SET maxmemory-policy noeviction" in text, text


@pytest.mark.slow
def test_a_redis_that_refuses_info_starts_the_worker_all_the_same(
        policy_server: Callable[[str, str], Server], sqlite_url: str, tmp_path: Path,
        worker_factory: Any) -> None:
    server = policy_server("allkeys-lru", "64mb")
    server.admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all",
                                 "-info")
    settings = _settings(server.url("app:pw@"), sqlite_url, tmp_path)
    worker = worker_factory(settings)
    with Client(settings) as client:
        [task_id] = client.submit_many(["served all the same"]).ids
        row = client.wait([task_id], timeout=60)[task_id]
    assert row.status == STATUS_DONE
    [said] = _lines(worker.log(), "cannot read its maxmemory-policy")
    assert " INFO " in said and "no permissions to run the 'info'" in said and "make sure it is noeviction" in said, said
    with served(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/readyz").json()["checks"]["redis"] == "ok"


@pytest.mark.parametrize(("policy", "warns"), [
    ("allkeys-lru", True), ("volatile-lru", False), ("noeviction", False)])
def test_readyz_carries_the_warning_and_stays_ready(
        policy: str, warns: bool, policy_server: Callable[[str, str], Server],
        sqlite_url: str, tmp_path: Path) -> None:
    """The Redis serves until it fills and no restart mends the policy: ready (200),
    ``checks.redis`` "ok: " and the worker's warning, as "ok: 1 alive" reads for workers;
    the workers are still counted."""
    settings = _settings(policy_server(policy, "64mb").url(), sqlite_url, tmp_path)
    beat = Heartbeat(settings, "celery@eviction-test", {}).start()
    try:
        with served(create_app(settings)) as url, \
                httpx.Client(base_url=url, timeout=30) as http:
            until(lambda: http.get("/readyz").json()["checks"]["workers"] == "ok: 1 alive",
                  timeout=10)
            ready = http.get("/readyz")
    finally:
        beat.stop()
    body = ready.json()
    assert ready.status_code == 200 and body["ready"] is True, body
    assert body["checks"]["workers"] == "ok: 1 alive", body
    redis_check = body["checks"]["redis"]
    if not warns:
        assert redis_check == "ok", body
        return
    assert redis_check.startswith(f"ok: maxmemory-policy is {policy} with maxmemory 64.00M"), body
    assert LOST in redis_check and FIX in redis_check, body
