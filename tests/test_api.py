"""The HTTP API over a real socket: a real ``bertstream serve``, real Redis, SQLite and
PostgreSQL, real workers."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from click.testing import CliRunner

from contract.messages import TaskItem
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from producer.cli import main
from producer.client import Client
from worker.process import free_port

SEED = "这家酒店的服务很好,房间也很干净。"


@pytest.fixture
def model_settings(settings: Settings, tiny_model_dir: Path) -> Settings:
    return settings.replace(model=str(tiny_model_dir))


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return dict(body["error"])


@pytest.mark.slow
def test_submit_status_and_long_poll_end_to_end(model_settings: Settings, api_factory: Any,
                                                worker_factory: Any) -> None:
    api = api_factory(model_settings)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        r = http.post("/v1/tasks", json={"text": SEED, "id": "web-1", "source": "web"})
        assert r.status_code == 202, r.text
        assert r.json() == {"id": "web-1", "status": "queued", "duplicate": False}
        assert http.get("/v1/tasks/web-1").json() == {"id": "web-1", "status": "queued"}
        bulk = http.post("/v1/tasks", json={"items": ["good one", {"text": "second", "id": "b-2"},
                                                      {"text": "  "}, {"txt": "typo"}, 7,
                                                      {"text": "dup", "id": "b-2"}]})
        assert bulk.status_code == 202, bulk.text
        body = bulk.json()
        assert body["accepted"] == 2 and body["duplicates"] == 0
        assert body["ids"][1] == "b-2" and body["ids"][0] and body["ids"][2:] == [None] * 4
        assert [e["index"] for e in body["errors"]] == [2, 3, 4, 5]
        assert "empty" in body["errors"][0]["reason"] and "duplicate" in body["errors"][3]["reason"]

        worker_factory(model_settings)
        done = http.get("/v1/tasks/web-1", params={"wait": 30}).json()
        assert done["status"] == "done" and done["label"] in ("negative", "positive")
        assert set(done["scores"]) == {"negative", "positive"} and 0.5 <= done["score"] <= 1
        assert done["model"] and done["source"] == "web"
        # Every bulk id reaches its row too; an unknown id is a JSON 404.
        for task_id in (i for i in body["ids"] if i):
            assert http.get(f"/v1/tasks/{task_id}", params={"wait": 30}).json()["status"] == "done"
        missing = http.get("/v1/tasks/never-submitted")
        assert missing.status_code == 404 and _error(missing)["code"] == "not_found"


def test_idempotency_conflict_and_validation(settings: Settings, api_factory: Any) -> None:
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=10) as http:
        first = http.post("/v1/tasks", json={"text": "same text", "id": "idem-1"})
        again = http.post("/v1/tasks", json={"text": "same text", "id": "idem-1"})
        assert first.status_code == again.status_code == 202
        assert again.json()["duplicate"] is True
        other = http.post("/v1/tasks", json={"text": "another text", "id": "idem-1"})
        assert other.status_code == 409 and _error(other)["code"] == "id_conflict"
        # Only one message was queued for the three calls.
        with Client(settings) as client:
            assert client.queue_length() == 1
        for bad, code in (({"text": ""}, "invalid_input"), ({"text": "x" * 20_001}, "invalid_input"),
                          ({"text": "ok", "extra": 1}, "invalid_request"),
                          ({"text": "ok", "meta": [1]}, "invalid_request"),
                          ({"text": "ok", "id": "x" * 500}, "invalid_input")):
            r = http.post("/v1/tasks", json=bad)
            assert r.status_code == 422 and _error(r)["code"] == code, (bad, r.text)
        broken = http.post("/v1/tasks", content=b"{not json", headers={"content-type": "application/json"})
        assert broken.status_code == 422 and "error" in broken.json()
        conflict_in_bulk = http.post("/v1/tasks", json={"items": [
            {"text": "different", "id": "idem-1"}, {"text": "fresh", "id": "idem-2"}]})
        assert conflict_in_bulk.status_code == 202
        assert conflict_in_bulk.json()["ids"] == [None, "idem-2"]
        assert "different text" in conflict_in_bulk.json()["errors"][0]["reason"]


def test_stored_row_with_other_text_is_a_conflict(settings: Settings, api_factory: Any) -> None:
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    store.upsert([_record("old-1", "positive", 0.9, text_sha256="0" * 64)])
    api = api_factory(settings)
    r = httpx.post(api.url + "/v1/tasks", json={"text": "new text", "id": "old-1"}, timeout=10)
    assert r.status_code == 409 and "stored with a different text" in _error(r)["message"]
    store.close()


def _record(task_id: str, label: str, score: float, *, source: str = "s",
            finished: dt.datetime | None = None, text_sha256: str = "a" * 64) -> ResultRecord:
    return ResultRecord(id=task_id, text_sha256=text_sha256, text_chars=4, model="m",
                        status="done", label=label, score=score, source=source,
                        finished_at=finished or dt.datetime.now(dt.timezone.utc),
                        scores={label: score})


def test_results_pages_are_stable_while_rows_are_added(settings: Settings,
                                                       api_factory: Any) -> None:
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    t0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    store.upsert([_record(f"r{i:02d}", "positive" if i % 3 else "negative", i / 40,
                          source="a" if i % 2 else "b", finished=t0 + dt.timedelta(minutes=i))
                  for i in range(25)])
    api = api_factory(settings)
    seen: list[str] = []
    cursor = None
    with httpx.Client(base_url=api.url, timeout=10) as http:
        for k in range(10):
            params: dict[str, Any] = {"limit": 10, "until": "2026-11-30T00:00:00"}
            if cursor:
                params["cursor"] = cursor
            body = http.get("/v1/results", params=params).json()
            seen += [row["id"] for row in body["items"]]
            # Rows written between pages (newer, and inside the filter) never shift them.
            store.upsert([_record(f"new{k}", "positive", 0.5, finished=t0 + dt.timedelta(days=2))])
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert seen[:25] == [f"r{i:02d}" for i in reversed(range(25))]
        assert len(seen) == len(set(seen))
        oldest = http.get("/v1/results", params={"order": "oldest", "limit": 3, "source": "a"})
        assert [r["id"] for r in oldest.json()["items"]] == ["r01", "r03", "r05"]
        bad = http.get("/v1/results", params={"cursor": "not-a-cursor"})
        assert bad.status_code == 422 and _error(bad)["code"] == "invalid_input"

        export = http.get("/v1/results", params={"format": "csv", "source": "b"})
        rows = list(csv.DictReader(io.StringIO(export.text)))
        assert export.headers["content-type"].startswith("text/csv")
        assert sorted(r["id"] for r in rows) == [f"r{i:02d}" for i in range(0, 25, 2)]
        lines = http.get("/v1/results", params={"format": "jsonl"}).text.splitlines()
        assert len(lines) == store.count() == 25 + len(seen) // 10 + 1
        assert all(json.loads(line)["status"] == "done" for line in lines)

        stats = http.get("/v1/stats", params={"by": "label", "until": "2026-11-02T00:00:00"}).json()
        counts = {g["label"]: g["count"] for g in stats["groups"]}
        assert counts == {"negative": 9, "positive": 16}
        hourly = http.get("/v1/stats", params={"by": "source", "bucket": "1h",
                                               "until": "2026-11-02T00:00:00"}).json()["groups"]
        assert {(g["bucket"], g["source"]): g["count"] for g in hourly} == {
            ("2026-11-01T00:00:00Z", "a"): 12, ("2026-11-01T00:00:00Z", "b"): 13}
        by_minute = http.get("/v1/stats", params={"bucket": "1m", "source": "a"}).json()["groups"]
        assert by_minute[0] == {"bucket": "2026-11-01T00:01:00Z", "label": "positive",
                                "count": 1, "mean_score": pytest.approx(1 / 40)}
    store.close()


def test_backpressure_answers_429(settings: Settings, api_factory: Any) -> None:
    tight = settings.replace(max_queue_length=2, api_coalesce_ms=0)
    api = api_factory(tight)
    with httpx.Client(base_url=api.url, timeout=10) as http:
        codes = []
        for i in range(4):
            codes.append(http.post("/v1/tasks", json={"text": f"t{i}"}).status_code)
        # The queue length is re-read every 0.2 s at most: wait until the 429 shows.
        deadline = dt.datetime.now() + dt.timedelta(seconds=5)
        while dt.datetime.now() < deadline:
            r = http.post("/v1/tasks", json={"text": "one more"})
            if r.status_code == 429:
                break
        assert codes[:3] == [202, 202, 202]
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert _error(r)["code"] == "busy"
        # While full: an invalid request is still a 422 (a retry cannot fix it), and the
        # repeat of a task already accepted is answered duplicate, not refused.
        assert http.post("/v1/tasks", json={"text": ""}).status_code == 422
        assert http.post("/v1/tasks", json={"items": [{"text": ""}]}).status_code == 422
        again = http.post("/v1/tasks", json={"text": "t-known", "id": "known"})
        assert again.status_code == 429  # not accepted before: the bound holds
        with Client(tight) as client:
            from api.submit import Submitter
            sub = Submitter(tight, client)  # another API process accepts it meanwhile
            sub.submit([TaskItem(id="known", text="t-known")], lane="interactive",
                       caller_ids=frozenset({"known"}))
            sub.close()
        dup = http.post("/v1/tasks", json={"text": "t-known", "id": "known"})
        assert dup.status_code == 202 and dup.json()["duplicate"] is True, dup.text


def test_invalid_submits_open_no_model_lane_and_refusals_show_only_caller_ids(
        settings: Settings, api_factory: Any) -> None:
    """Invalid requests for made-up models are 422s that open no lane, so they cannot use
    up the server's lanes for the models real submits go to; a refused bulk item shows
    its id only when the caller gave one (a generated id names nothing to ask about)."""
    api = api_factory(settings.replace(api_models="sentiment-v2"))  # no worker serves it
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for i in range(40):
            r = http.post("/v1/tasks", json={"text": "", "model": f"junk{i}"})
            assert r.status_code == 422, r.text
            b = http.post("/v1/tasks", json={"items": [{"text": ""}], "model": f"bulk{i}"})
            assert b.status_code == 422, b.text
        ok = http.post("/v1/tasks", json={"text": "hello", "model": "sentiment-v2"})
        assert ok.status_code == 202, ok.text
        bulk = http.post("/v1/tasks", json={"items": [{"text": "  "}, {"text": "", "id": "mine"},
                                                      {"text": "fine"}]})
        assert bulk.status_code == 202, bulk.text
        errors = {e["index"]: e["id"] for e in bulk.json()["errors"]}
        assert errors == {0: None, 1: "mine"}


def test_tokens_cors_and_body_limit(settings: Settings, api_factory: Any) -> None:
    guarded = settings.replace(api_tokens="s3cret,other-token", api_cors_origins="https://app.example",
                               api_max_body_bytes=2048)
    api = api_factory(guarded)
    with httpx.Client(base_url=api.url, timeout=10) as http:
        assert http.get("/healthz").status_code == 200  # open
        assert http.get("/openapi.json").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = http.post("/v1/tasks", json={"text": "hi"}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        ok = {"Authorization": "Bearer other-token"}
        assert http.post("/v1/tasks", json={"text": "hi"}, headers=ok).status_code == 202
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers=ok).status_code == 200
        big = http.post("/v1/tasks", json={"text": "x" * 4000}, headers=ok)
        assert big.status_code == 413 and _error(big)["code"] == "too_large"
        chunked = http.post("/v1/tasks", content=iter([b'{"text": "', b"y" * 3000, b'"}']),
                            headers={**ok, "content-type": "application/json"})
        assert chunked.status_code == 413
        # A valid request in the first chunk, then padding past the limit: refused, and
        # not carried out (the body used to end at the limit, and the submit ran).
        with Client(guarded) as client:
            before = client.queue_length()
            def slow_body() -> Iterator[bytes]:
                yield b'{"text": "kept out", "id": "p1"}'
                time.sleep(0.3)  # the server reads the first chunk alone
                yield b" " * 3000

            padded = http.post("/v1/tasks", content=slow_body(),
                               headers={**ok, "content-type": "application/json"})
            assert padded.status_code == 413 and _error(padded)["code"] == "too_large"
            assert client.queue_length() == before
        assert http.get("/v1/tasks/p1", headers=ok).status_code == 404
        pre = http.options("/v1/tasks", headers={"Origin": "https://app.example",
                                                 "Access-Control-Request-Method": "POST"})
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        # A browser app may read a 429's Retry-After only when it is exposed to it.
        cross = http.get("/v1/tasks/p1", headers={**ok, "Origin": "https://app.example"})
        assert "retry-after" in cross.headers["access-control-expose-headers"].lower()


def test_serve_refuses_an_open_public_bind() -> None:
    runner = CliRunner()
    open_public = runner.invoke(main, ["serve", "--host", "0.0.0.0"],
                                obj=Settings(api_tokens=""))
    assert open_public.exit_code == 2 and "without authentication" in open_public.output
    both = runner.invoke(main, ["serve", "--no-auth"], obj=Settings(api_tokens="t"))
    assert both.exit_code == 2 and "contradicts" in both.output


def test_outages_are_503_and_readyz_says_which(settings: Settings, api_factory: Any,
                                               tmp_path: Path, worker_factory: Any,
                                               tiny_model_dir: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    down = settings.replace(broker_url=dead,
                            database_url=f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/x")
    api = api_factory(down)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        r = http.post("/v1/tasks", json={"text": "hi"})
        assert r.status_code == 503 and _error(r)["code"] == "broker_unavailable"
        assert "Traceback" not in r.text
        r = http.get("/v1/results")
        assert r.status_code == 503 and _error(r)["code"] == "database_unavailable"
        ready = http.get("/readyz")
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert checks["redis"].startswith("unreachable") and checks["database"].startswith("unreachable")
    healthy = api_factory(settings)
    with httpx.Client(base_url=healthy.url, timeout=10) as http:
        assert http.get("/readyz").json()["checks"]["workers"].startswith("none alive")
        worker_factory(settings.replace(model=str(tiny_model_dir)))
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"redis": "ok", "database": "ok",
                                          "workers": "ok: 1 alive"}
        metrics = http.get("/metrics").text
        assert 'bertstream_queue_depth{lane="interactive"}' in metrics
        assert "bertstream_workers_alive 1.0" in metrics
        assert "bertstream_api_requests_total" in metrics


def test_a_database_outage_keeps_no_claim_so_a_retry_is_not_a_duplicate(
        settings: Settings, api_factory: Any) -> None:
    """Redis up, the database down: a submit with the caller's id cannot be compared with
    the stored rows, so it is refused (503) with nothing queued and no id kept; the
    retry the 503 asks for must meet the same answer, never "duplicate" for a task that
    was never queued."""
    down = settings.replace(
        database_url=f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/x")
    api = api_factory(down)
    r = redis.Redis.from_url(settings.broker_url)
    with httpx.Client(base_url=api.url, timeout=30) as http, Client(settings) as client:
        for _try in range(2):
            single = http.post("/v1/tasks", json={"text": "hi", "id": "r1"})
            assert single.status_code == 503, single.text
            assert _error(single)["code"] == "database_unavailable"
            # where the database is stays in the server's log
            assert "nobody" not in single.text and "127.0.0.1" not in single.text
            bulk = http.post("/v1/tasks", json={"items": [{"text": "a", "id": "b1"},
                                                          {"text": "b", "id": "b2"}]})
            assert bulk.status_code == 503, bulk.text
        assert client.queue_length() == 0
        assert not r.keys("bertstream:accepted:*")
        # Generated ids cannot collide with a stored row: they need no database.
        assert http.post("/v1/tasks", json={"text": "no id"}).status_code == 202
    r.close()


def _submit_cut_after_one_message(client: Client, submitter: Any, items: list[Any]) -> None:
    """Submit ``items`` (caller ids) while Redis "fails" at the second publish: the submit
    raises after one message was queued. Injected: a failure between two publishes
    cannot be timed for real."""
    from contract.errors import BrokerUnavailable

    real, calls = client.publish, []

    def failing_second(chunk: Any, **kw: Any) -> None:
        calls.append(len(chunk))
        if len(calls) == 2:
            raise BrokerUnavailable("injected: Redis went away")
        real(chunk, **kw)

    client.publish = failing_second  # type: ignore[method-assign,assignment]
    try:
        with pytest.raises(BrokerUnavailable):
            submitter.submit(items, lane="bulk", caller_ids=frozenset(i.id for i in items))
    finally:
        client.publish = real  # type: ignore[method-assign]


def test_an_outage_between_chunks_keeps_the_claims_of_the_chunks_queued(
        settings: Settings) -> None:
    """Redis fails after the first message of a submit was published: the submit raises
    (the API answers 503), the first chunk's ids keep their claims, so the retry of the
    whole request reads them as duplicates instead of queueing them twice, and the rest is
    queued by the retry. (The failure between two publishes is injected: it cannot be
    timed for real.)"""
    from api.submit import ACCEPTED, DUPLICATE, Submitter
    from contract.messages import TaskItem

    s = settings.replace(bulk_chunk_size=2)
    with Client(s) as client:
        submitter = Submitter(s, client)
        items = [TaskItem(id=f"c{i}", text=f"text {i}") for i in range(5)]
        _submit_cut_after_one_message(client, submitter, items)
        assert client.queue_length() == 1  # the first chunk's message
        retry = submitter.submit(items, lane="bulk", caller_ids=frozenset(i.id for i in items))
        assert [(o.id, o.status) for o in retry] == [
            ("c0", DUPLICATE), ("c1", DUPLICATE), ("c2", ACCEPTED), ("c3", ACCEPTED),
            ("c4", ACCEPTED)]
        assert client.queue_length() == 3
        submitter.close()


def test_an_outage_between_chunks_keeps_only_the_queued_retries(settings: Settings) -> None:
    """Retries of failed rows in a submit that Redis cuts after its first message: the
    retry in the queued chunk keeps its marker (sent again, it is a duplicate), the one in
    the chunk never sent loses it (sent again, it is queued). Injected, as above."""
    from api.submit import ACCEPTED, DUPLICATE, Submitter
    from contract.messages import TaskItem

    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    store.upsert([_failed("c1", "text 1"), _failed("c3", "text 3")])
    s = settings.replace(bulk_chunk_size=2)
    with Client(s) as client:
        submitter = Submitter(s, client)
        items = [TaskItem(id=f"c{i}", text=f"text {i}") for i in range(5)]
        ids = frozenset(i.id for i in items)
        _submit_cut_after_one_message(client, submitter, items)
        retry = submitter.submit(items, lane="bulk", caller_ids=ids)
        assert [(o.id, o.status) for o in retry] == [
            ("c0", DUPLICATE), ("c1", DUPLICATE), ("c2", ACCEPTED), ("c3", ACCEPTED),
            ("c4", ACCEPTED)]
        assert "retry" in retry[1].reason and retry[3].reason.startswith("queued again")
        assert client.queue_length() == 3
        submitter.close()
    store.close()


def test_an_id_repeated_in_one_batch_is_judged_against_its_stored_row(
        settings: Settings) -> None:
    """Two concurrent submits of a stored id land in one coalesced batch. Each copy is
    judged against the stored row: a different text is a conflict for both (the second
    used to be "duplicate" of the first copy's claim, which the stored row then refused,
    so that caller was told its text was accepted), the stored text is a duplicate."""
    from api.submit import CONFLICT, DUPLICATE, Submitter
    from contract.messages import TaskItem, text_sha256

    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    store.upsert([_record("stored-1", "positive", 0.9,
                          text_sha256=text_sha256("original text"))])
    with Client(settings) as client:
        submitter = Submitter(settings, client)
        other = [TaskItem(id="stored-1", text="different text") for _ in range(2)]
        out = submitter.submit(other, lane="interactive", caller_ids=frozenset({"stored-1"}))
        assert [o.status for o in out] == [CONFLICT, CONFLICT], out
        mixed = [TaskItem(id="stored-1", text="different text"),
                 TaskItem(id="stored-1", text="original text")]
        out = submitter.submit(mixed, lane="interactive", caller_ids=frozenset({"stored-1"}))
        assert [o.status for o in out] == [CONFLICT, DUPLICATE], out
        assert client.queue_length() == 0
        submitter.close()
    store.close()


def test_a_task_sent_to_a_named_model_is_queued_for_a_status_asked_without_one(
        settings: Settings, api_factory: Any) -> None:
    """``?model=`` is optional on a status: a task sent to a named model reads ``queued``
    without it, not 404. Status requests for unknown models open no submitting lane, so
    many of them (typos) never use up the server's lanes for real submits."""
    api = api_factory(settings.replace(api_models="beta,delta"))  # no workers
    with httpx.Client(base_url=api.url, timeout=30) as http:
        sent = http.post("/v1/tasks", json={"text": "for beta", "id": "n1", "model": "beta"})
        assert sent.status_code == 202, sent.text
        plain = http.post("/v1/tasks", json={"text": "for the default", "id": "n2"})
        assert plain.status_code == 202, plain.text
        for query in ("", "?model=beta"):
            status = http.get(f"/v1/tasks/n1{query}")
            assert status.status_code == 200 and status.json()["status"] == "queued", status.text
        assert http.get("/v1/tasks/n2").json()["status"] == "queued"
        assert http.get("/v1/tasks/n1?model=gamma").status_code == 404  # not sent to gamma
        assert http.get("/v1/tasks/n2?model=beta").status_code == 404
        assert http.get("/v1/tasks/never").status_code == 404
        for i in range(40):
            assert http.get(f"/v1/tasks/n1?model=typo{i}").status_code == 404
        late = http.post("/v1/tasks", json={"text": "a new model", "model": "delta"})
        assert late.status_code == 202, late.text


def test_a_queued_default_task_is_found_under_its_stored_model_name(
        settings: Settings, api_factory: Any) -> None:
    """A done result shows the model its rows are stored under (the default model's own
    name); a client that passes that name back as ``?model=`` while the task is still
    queued reads ``queued``, not 404, as long as a worker of the default model announces
    that name. Another name, or no live worker, is still a 404."""
    from worker.heartbeat import Heartbeat

    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        sent = http.post("/v1/tasks", json={"text": "for the default", "id": "d1"})
        assert sent.status_code == 202, sent.text
        assert http.get("/v1/tasks/d1?model=stored-default").status_code == 404  # no worker
        beat = Heartbeat(settings, "w1@test", {"model": "stored-default"}).start()
        try:
            deadline = time.monotonic() + 10
            while http.get("/v1/tasks/d1?model=stored-default").status_code == 404:
                assert time.monotonic() < deadline, "the heartbeat never showed"
                time.sleep(0.1)
            status = http.get("/v1/tasks/d1?model=stored-default")
            assert status.json() == {"id": "d1", "status": "queued"}, status.text
            assert http.get("/v1/tasks/d1?model=other").status_code == 404
            assert http.get("/v1/tasks/never?model=stored-default").status_code == 404
        finally:
            beat.stop()
        assert http.get("/v1/tasks/d1?model=stored-default").status_code == 404


def test_ids_with_a_slash_are_read_back(settings: Settings, api_factory: Any) -> None:
    """An id may hold "/" (a post's URL, "orders/17"): its status and windows are read
    back with the slash as it is or encoded (both were a 404 route miss)."""
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        task_id = "https://example.com/posts/17"
        assert http.post("/v1/tasks", json={"text": "slash id", "id": task_id}).status_code == 202
        for path in (f"/v1/tasks/{task_id}", "/v1/tasks/" + task_id.replace("/", "%2F")):
            r = http.get(path)
            assert r.status_code == 200 and r.json() == {"id": task_id, "status": "queued"}, r.text
        store = ResultStore.from_url(settings.database_url)
        store.create_schema()
        store.upsert([_record("orders/17", "positive", 0.9)])
        store.close()
        r = http.get("/v1/tasks/orders/17")
        assert r.status_code == 200 and r.json()["id"] == "orders/17", r.text
        w = http.get("/v1/tasks/orders/17/windows")
        assert w.status_code == 200 and w.json()["id"] == "orders/17", w.text
        assert http.get("/v1/tasks/nope/windows").status_code == 404


def test_coalescing_puts_concurrent_submits_in_one_message(settings: Settings,
                                                           api_factory: Any) -> None:
    import concurrent.futures

    api = api_factory(settings.replace(api_coalesce_ms=200))
    with httpx.Client(base_url=api.url, timeout=10) as http, \
            concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: http.post("/v1/tasks", json={"text": f"text {i}"}),
                                range(8)))
    assert all(a.status_code == 202 for a in answers)
    with Client(settings) as client:
        assert client.queue_length() < 8  # fewer messages than texts
    raw = redis.Redis.from_url(settings.broker_url)
    key = f"{settings.queue}.interactive"
    bodies = [json.loads(m) for m in raw.lrange(key, 0, -1)]
    raw.close()
    assert sum(len(json.loads(__import__("base64").b64decode(b["body"]))[0][0])
               for b in bodies) == 8


def _failed(task_id: str, text: str, status: str = "failed") -> ResultRecord:
    from contract.messages import text_sha256

    return ResultRecord(id=task_id, text_sha256=text_sha256(text), text_chars=len(text),
                        model="m", status=status, error=f"it {status}",
                        finished_at=dt.datetime.now(dt.timezone.utc))


def test_a_failed_or_expired_task_sent_again_is_queued_once_per_attempt(
        settings: Settings, api_factory: Any) -> None:
    """The same id and text again, after its row was stored ``failed`` or ``expired``, is
    queued again (it used to be answered ``duplicate`` for good, so a web app could never
    retry it); its status reads ``queued`` until the new attempt is stored. A second send
    of the same attempt is a duplicate, a done row stays final, another text a conflict."""
    import concurrent.futures

    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    done = _failed("d1", "text d")
    done.status, done.label, done.score, done.error = "done", "positive", 0.9, None
    store.upsert([_failed("f1", "text f"), _failed("e1", "text e", "expired"), done])
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=30) as http, Client(settings) as client:
        first = http.post("/v1/tasks", json={"text": "text f", "id": "f1"})
        assert first.status_code == 202 and first.json()["duplicate"] is False, first.text
        again = http.post("/v1/tasks", json={"text": "text f", "id": "f1"})
        assert again.status_code == 202 and again.json()["duplicate"] is True, again.text
        other = http.post("/v1/tasks", json={"text": "other text", "id": "f1"})
        assert other.status_code == 409, other.text
        status = http.get("/v1/tasks/f1").json()
        assert status == {"id": "f1", "status": "queued",
                          "retry_of": {"status": "failed", "reason": "it failed", "attempts": 1}}
        items = [{"text": "text e", "id": "e1"}, {"text": "text d", "id": "d1"}]
        bulk = http.post("/v1/tasks", json={"items": items}).json()
        assert (bulk["accepted"], bulk["duplicates"]) == (1, 1), bulk
        bulk = http.post("/v1/tasks", json={"items": items}).json()
        assert (bulk["accepted"], bulk["duplicates"]) == (0, 2), bulk
        assert http.get("/v1/tasks/e1").json()["status"] == "queued"
        assert http.get("/v1/tasks/d1").json()["status"] == "done"
        assert client.queue_length() == 2  # f1's single submit, e1's bulk

        # The new attempt fails too: the status shows it, and the id may be retried again.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(http.get, "/v1/tasks/f1", params={"wait": 20})
            time.sleep(0.5)  # the long poll sees the old row and keeps waiting
            assert not waiting.done()
            store.upsert([_failed("f1", "text f")])
            second = waiting.result(timeout=25).json()
        assert (second["status"], second["attempts"]) == ("failed", 2), second
        retry = http.post("/v1/tasks", json={"text": "text f", "id": "f1"})
        assert retry.json()["duplicate"] is False, retry.text
        assert http.get("/v1/tasks/f1").json()["retry_of"]["attempts"] == 2
    store.close()


@pytest.mark.slow
def test_a_web_app_and_the_client_retry_an_expired_and_a_failed_task_end_to_end(
        settings: Settings, poison_model_dir: Path, api_factory: Any,
        worker_factory: Any) -> None:
    """Real worker: a task that expired in the queue, and one the model failed, are sent
    again through the API under their ids; each long poll returns the new attempt. So
    does the Python client's wait after its own retry."""
    model_settings = settings.replace(model=str(poison_model_dir))
    api = api_factory(model_settings)
    with Client(model_settings) as client:
        client.submit("late but fine", id="x1", ttl_s=0.05)
    time.sleep(0.3)
    with httpx.Client(base_url=api.url, timeout=60) as http:
        assert http.post("/v1/tasks", json={"text": "a poisonpill here",
                                            "id": "p1"}).status_code == 202
        worker_factory(model_settings)
        with Client(model_settings) as client:  # not sent through the API: no claim to wait on
            client.wait(["x1"], timeout=30)
        expired = http.get("/v1/tasks/x1").json()
        failed = http.get("/v1/tasks/p1", params={"wait": 30}).json()
        assert expired["status"] == "expired" and failed["status"] == "failed", (expired, failed)
        for task_id, text in (("x1", "late but fine"), ("p1", "a poisonpill here")):
            r = http.post("/v1/tasks", json={"text": text, "id": task_id})
            assert r.status_code == 202 and r.json()["duplicate"] is False, r.text
        done = http.get("/v1/tasks/x1", params={"wait": 30}).json()
        assert (done["status"], done["attempts"]) == ("done", 2), done
        again = http.get("/v1/tasks/p1", params={"wait": 30}).json()
        assert (again["status"], again["attempts"]) == ("failed", 2), again
    # The Python client's retry is waited for the same way.
    with Client(model_settings) as client:
        assert client.submit("a poisonpill here", id="p1") == "p1"
        third = client.wait(["p1"], timeout=30)["p1"]
        assert (third.status, third.attempts) == ("failed", 3)
