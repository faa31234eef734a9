"""A duplicate submit is answered while the database is down, as before its status read.

A repeat whose claim Redis still holds is judged a duplicate without the database (the
queue-full path says so: "a database that cannot be read" does not stop it). Reading
the task's status for the answer made that repeat a 503 ``database_unavailable`` while
the database was down, though the task is queued: a client re-posting after a timeout
was told its accepted task was not. The status is read when it can be; else ``queued``.
"""
from __future__ import annotations

import time
from typing import Any

import httpx

from contract.settings import Settings
from tests.tcpproxy import proxied_pg


def test_a_duplicate_is_answered_queued_while_the_database_is_down(
        redis_url: str, pg_url: str, api_factory: Any) -> None:
    proxy, url = proxied_pg(pg_url)
    try:
        settings = Settings(broker_url=redis_url, database_url=url, api_coalesce_ms=0,
                            max_queue_length=1)
        api = api_factory(settings)
        task = {"text": "the same text", "id": "dup-outage-1"}
        with httpx.Client(base_url=api.url, timeout=60) as http:
            first = http.post("/v1/tasks", json=task)
            assert first.json() == {"id": "dup-outage-1", "status": "queued",
                                    "duplicate": False}
            proxy.down()
            again = http.post("/v1/tasks", json=task)
            assert again.status_code == 202, again.text
            assert again.json() == {"id": "dup-outage-1", "status": "queued",
                                    "duplicate": True}
            # The full queue's path too (it judges the repeat on the Redis claim alone).
            for i in range(3):
                http.post("/v1/tasks", json={"text": f"filler {i}"})
            deadline = time.monotonic() + 5  # the queue length is re-read every 0.2 s
            while http.post("/v1/tasks", json={"text": "one more"}).status_code != 429:
                assert time.monotonic() < deadline, "the queue bound never showed"
            full = http.post("/v1/tasks", json=task)
            assert full.status_code == 202, full.text
            assert full.json() == {"id": "dup-outage-1", "status": "queued",
                                   "duplicate": True}
    finally:
        proxy.close()
