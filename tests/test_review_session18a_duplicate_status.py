"""A duplicate submit says the task's status as it is, not ``queued`` for good.

``POST /v1/tasks`` answered a duplicate with ``"status": "queued"`` whatever the task had
become: a web app re-posting after a timeout was told its finished task was queued. A
duplicate's ``status`` is now what ``GET /v1/tasks/{id}`` says of the task.
"""
from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from contract.messages import text_sha256
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from producer.client import Client


@pytest.mark.slow
def test_a_duplicate_of_a_task_a_worker_finished_says_done(
        settings: Settings, tiny_model_dir: Path, api_factory: Any,
        worker_factory: Any) -> None:
    """Real worker: sent, scored, sent again. The first answer is ``queued``; the repeat,
    once the row is stored, says ``done`` as the status read does."""
    model_settings = settings.replace(model=str(tiny_model_dir))
    api = api_factory(model_settings)
    task = {"text": "这家酒店的服务很好", "id": "dup-done-1", "source": "web"}
    with httpx.Client(base_url=api.url, timeout=60) as http:
        first = http.post("/v1/tasks", json=task)
        assert first.json() == {"id": "dup-done-1", "status": "queued", "duplicate": False}
        queued = http.post("/v1/tasks", json=task)
        assert queued.json() == {"id": "dup-done-1", "status": "queued", "duplicate": True}
        worker_factory(model_settings)
        assert http.get("/v1/tasks/dup-done-1", params={"wait": 30}).json()["status"] == "done"
        again = http.post("/v1/tasks", json=task)
        assert again.status_code == 202, again.text
        assert again.json() == {"id": "dup-done-1", "status": "done", "duplicate": True}


def test_a_duplicate_says_the_stored_status_also_while_the_queue_is_full(
        settings: Settings, api_factory: Any) -> None:
    """A ``done`` row stored (its claim long dropped) answers a repeat ``done``, through
    the normal path and through the full queue's; a retry of a failed row already queued
    stays ``queued``, as its status read says."""
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    now = dt.datetime.now(dt.timezone.utc)
    store.upsert([
        ResultRecord(id="stored-done", text_sha256=text_sha256("text d"), text_chars=6,
                     model="m", status="done", label="positive", score=0.9,
                     scores={"positive": 0.9, "negative": 0.1}, finished_at=now),
        ResultRecord(id="stored-failed", text_sha256=text_sha256("text f"), text_chars=6,
                     model="m", status="failed", error="it failed", finished_at=now)])
    store.close()
    tight = settings.replace(max_queue_length=1, api_coalesce_ms=0)
    api = api_factory(tight)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        done = http.post("/v1/tasks", json={"text": "text d", "id": "stored-done"})
        assert done.json() == {"id": "stored-done", "status": "done", "duplicate": True}
        retry = http.post("/v1/tasks", json={"text": "text f", "id": "stored-failed"})
        assert retry.json() == {"id": "stored-failed", "status": "queued", "duplicate": False}
        again = http.post("/v1/tasks", json={"text": "text f", "id": "stored-failed"})
        assert again.json() == {"id": "stored-failed", "status": "queued", "duplicate": True}
        # Fill the queue past its bound: a repeat is still answered, with its status.
        for i in range(3):
            http.post("/v1/tasks", json={"text": f"filler {i}"})
        with Client(tight) as client:
            assert client.queue_length() > 1
        deadline = time.monotonic() + 5  # the queue length is re-read every 0.2 s at most
        while http.post("/v1/tasks", json={"text": "one more"}).status_code != 429:
            assert time.monotonic() < deadline, "the queue bound never showed"
        full = http.post("/v1/tasks", json={"text": "text d", "id": "stored-done"})
        assert full.json() == {"id": "stored-done", "status": "done", "duplicate": True}
