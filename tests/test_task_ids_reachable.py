"""Ids that ``GET /v1/tasks/{id}`` could never reach are refused when a task is submitted:
an id ending in ``/windows`` (the windows route takes it) and one with a ``.`` or ``..``
path segment (clients and browsers resolve those away before sending)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from contract.errors import InvalidInput
from contract.messages import id_problem, item_from_wire
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from producer.cli import main
from producer.client import Client

UNREACHABLE = ["orders/windows", "/windows", "a/b/windows", ".", "..", "a/./b", "a/..", "../a",
               "./a", "a/.", "a/../b/"]
REACHABLE = ["a.b", "...", ".a", "a.", "a/.b/c", "a/..b", "x/windows2", "windows", "x/window",
             "x/windows/y", "x/Windows.", "https://example.com/posts/17"]


def test_id_problem_refuses_unreachable_ids_only_for_new_tasks() -> None:
    for task_id in UNREACHABLE:
        problem = id_problem(task_id, new=True)
        assert problem is not None and ("'/windows'" in problem or "path segment" in problem), (
            task_id, problem)
        # A read or a delete of a row stored before the rule still takes the id.
        assert id_problem(task_id) is None, task_id
    for task_id in REACHABLE:
        assert id_problem(task_id, new=True) is None, task_id


def test_unreachable_ids_are_refused_by_the_api_the_client_the_cli_and_the_worker(
        settings: Settings, api_factory: Any) -> None:
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=30) as http, Client(settings) as client:
        for task_id in UNREACHABLE:
            r = http.post("/v1/tasks", json={"text": "never readable", "id": task_id})
            assert r.status_code == 422, (task_id, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_input" and error["message"].startswith("id "), error
        bulk = http.post("/v1/tasks", json={"items": [{"text": "a", "id": "orders/windows"},
                                                      {"text": "b", "id": "orders/17"},
                                                      {"text": "c", "id": ".."}]})
        assert bulk.status_code == 202, bulk.text
        body = bulk.json()
        assert body["ids"] == [None, "orders/17", None]
        assert [(e["index"], e["id"]) for e in body["errors"]] == [(0, "orders/windows"),
                                                                   (2, "..")]
        assert "'/windows'" in body["errors"][0]["reason"]
        assert "path segment" in body["errors"][1]["reason"]
        # The Python client refuses before sending anything.
        for task_id in ("orders/windows", "a/../b"):
            with pytest.raises(InvalidInput, match="^id "):
                client.submit("text", id=task_id)
        report = client.submit_many([{"text": "x", "id": "q/windows"}, {"text": "y", "id": "q"}])
        assert [e.index for e in report.errors] == [0] and report.ids == ["q"]
        assert client.queue_length() == 2  # the bulk's "orders/17" and the client's "q"
        result = CliRunner().invoke(main, ["submit", "--id", "orders/windows", "text"],
                                    obj=settings)
        assert result.exit_code != 0 and "'/windows'" in result.output, result.output
        assert client.queue_length() == 2
    # A message from any producer: the worker fails the item with the reason.
    with pytest.raises(InvalidInput, match="no valid id .*path segment"):
        item_from_wire({"id": "a/./b", "text": "t"}, settings)


def test_a_row_stored_under_such_an_id_stays_readable(settings: Settings) -> None:
    """The rule is for new tasks: a row stored before it is still read by the client."""
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    store.upsert([ResultRecord(id="legacy/windows", text_sha256="a" * 64, text_chars=1,
                               model="m", status="done", label="positive", score=0.9,
                               scores={"positive": 0.9},
                               finished_at=dt.datetime.now(dt.timezone.utc))])
    store.close()
    with Client(settings) as client:
        row = client.get("legacy/windows")
        assert row is not None and row.label == "positive"
