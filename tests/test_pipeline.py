"""End to end: producer → real Redis → real Celery worker → SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
import torch

from contract.broker import lane_queue, make_celery
from contract.constants import (
    DELIVERY_KEY_PREFIX,
    RESULTS_TABLE,
    STATUS_DONE,
    STATUS_FAILED,
    TASK_ANALYZE,
)
from contract.messages import make_item
from contract.results import ResultStore
from contract.settings import Settings
from producer.client import Client

pytestmark = pytest.mark.slow

MIXED = [
    "the hotel is very good",
    "这家酒店的服务很好,房间也很干净。",
    "bad",
    "the movie was boring and the room was dirty but the service was great " * 3,
    "电影很差",
    "i love this film, it is fun and happy, we love it, they love it " * 10,  # long: truncated
    "a",
    "这家酒店的服务很好,房间也很干净。这家酒店的服务很好。",
]


@pytest.fixture
def tiny_settings(settings: Settings, tiny_model_dir: Path) -> Settings:
    """Settings on the test services with the tiny random BERT."""
    return settings.replace(model=str(tiny_model_dir))


def publish_raw(settings: Settings, args: list[Any], task_id: str | None = None) -> None:
    """Publish a message body as-is, bypassing the producer's validation."""
    app = make_celery(settings)
    try:
        app.send_task(TASK_ANALYZE, args=args, queue=lane_queue(settings, bulk=True),
                      task_id=task_id)
    finally:
        app.close()


def wait_rows(store: ResultStore, ids: list[str], timeout: float = 60.0) -> dict[str, Any]:
    """Poll the store until every id has a row (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        found = store.get_many(ids)
        if len(found) == len(ids):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(ids) - len(found)} of {len(ids)} rows missing")
        time.sleep(0.1)


def test_submit_one_then_fetch(tiny_settings: Settings, worker_factory: Any) -> None:
    worker_factory(tiny_settings)
    with Client(tiny_settings) as client:
        task_id = client.submit("the hotel is very good", source="web", meta={"user": 7})
        res = client.wait([task_id], timeout=60)[task_id]
        assert client.get(task_id) == res
    assert res.status == STATUS_DONE
    assert res.label in ("negative", "positive")
    assert res.scores is not None and abs(sum(res.scores.values()) - 1.0) < 1e-5
    assert res.score == max(res.scores.values())
    assert res.source == "web" and res.meta == {"user": 7}
    assert res.model.startswith("tiny-bert")
    assert res.model_revision and res.attempts == 1 and res.truncated is False
    assert res.latency_s is not None and res.latency_s > 0
    assert res.text == "the hotel is very good"


def test_bulk_mixed_languages(tiny_settings: Settings, worker_factory: Any) -> None:
    worker_factory(tiny_settings)
    texts = [MIXED[i % len(MIXED)] + f" {i}" for i in range(1200)]
    with Client(tiny_settings) as client:
        report = client.submit_many(texts, source="bulk-test")
        assert report.accepted == 1200 and report.rejected == 0
        rows = client.wait(report.ids, timeout=120)
        by_label = client.aggregate(by="label", source="bulk-test")
    assert all(r.status == STATUS_DONE for r in rows.values())
    assert sum(g["count"] for g in by_label) == 1200
    # Micro-batching really happened: rows ran in batches larger than one.
    assert max(r.batch_size or 0 for r in rows.values()) > 8


def test_every_message_is_acked_after_its_commit(tiny_settings: Settings,
                                                 worker_factory: Any) -> None:
    """Acks of a flush go out as one pipeline: nothing may stay in kombu's unacked index,
    or it would be redelivered after the visibility timeout."""
    import redis

    worker_factory(tiny_settings.replace(flush_every=16))
    client_redis = redis.Redis.from_url(tiny_settings.broker_url)
    try:
        with Client(tiny_settings) as client:
            ids = [client.submit(f"the hotel is very good {i}") for i in range(60)]
            ids += client.submit_many([f"bad room {i}" for i in range(300)]).ids
            client.wait(ids, timeout=60)
        deadline = time.monotonic() + 10
        while client_redis.hlen("unacked") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client_redis.hlen("unacked") == 0
        assert client_redis.zcard("unacked_index") == 0
    finally:
        client_redis.close()


def test_bad_items_fail_alone(tiny_settings: Settings, worker_factory: Any) -> None:
    """Malformed, empty, oversized and undecodable items fail with a reason; the rest are done."""
    worker_factory(tiny_settings)
    good = [make_item(t, tiny_settings).to_wire() for t in ("the hotel is good", "电影很差")]
    now = time.time()
    bad = [
        {"id": "bad-empty", "text": "   ", "submitted_at": now},
        {"id": "bad-big", "text": "x" * (tiny_settings.max_text_chars + 1), "submitted_at": now},
        {"id": "bad-surrogate", "text": "ok \ud800 no", "submitted_at": now},
        {"id": "bad-type", "text": 42, "submitted_at": now},
        {"id": "bad-meta", "text": "fine", "meta": [1, 2], "submitted_at": now},
        {"id": "bad-notext", "submitted_at": now},
    ]
    publish_raw(tiny_settings, [good + bad])
    publish_raw(tiny_settings, ["not a list of items"])
    store = ResultStore.from_url(tiny_settings.database_url)
    try:
        rows = wait_rows(store, [g["id"] for g in good] + [b["id"] for b in bad])
        malformed = wait_until(lambda: store.query(status=STATUS_FAILED, limit=None))
    finally:
        store.close()
    for g in good:
        assert rows[g["id"]].status == STATUS_DONE
    reasons = {b["id"]: rows[b["id"]].error for b in bad}
    assert all(rows[b["id"]].status == STATUS_FAILED for b in bad)
    assert "empty" in reasons["bad-empty"]
    assert "over the limit" in reasons["bad-big"]
    assert "not valid Unicode" in reasons["bad-surrogate"]
    assert "must be a string" in reasons["bad-type"]
    assert "meta must be a JSON object" in reasons["bad-meta"]
    assert "no text" in reasons["bad-notext"]
    assert any(r.id.startswith("malformed-") and "malformed message" in (r.error or "")
               for r in malformed)


def wait_until(fetch: Any, timeout: float = 30.0) -> Any:
    """Call ``fetch`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fetch()
        if value and any(getattr(r, "id", "").startswith("malformed-") for r in value):
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_model_error_fails_only_that_item(
    settings: Settings, poison_model_dir: Path, worker_factory: Any
) -> None:
    """A text the model cannot take (a token past its embedding table: the model would
    raise) fails alone with the reason, unrun; its batch-mates are stored as done."""
    s = settings.replace(model=str(poison_model_dir))
    worker_factory(s)
    texts = [f"the hotel is good {i}" for i in range(20)] + ["this has a poisonpill in it"]
    with Client(s) as client:
        report = client.submit_many(texts)
        rows = client.wait(report.ids, timeout=60)
    poisoned = rows[report.ids[-1]]
    assert poisoned.status == STATUS_FAILED
    assert poisoned.error and "outside the model's embedding table" in poisoned.error
    assert all(rows[i].status == STATUS_DONE for i in report.ids[:-1])


def test_redelivered_task_makes_no_second_row(tiny_settings: Settings, worker_factory: Any) -> None:
    """The same task delivered twice (a producer retry, a redelivery) keeps one row."""
    worker_factory(tiny_settings)
    items = [make_item(f"the room was clean {i}", tiny_settings).to_wire() for i in range(5)]
    publish_raw(tiny_settings, [items])
    store = ResultStore.from_url(tiny_settings.database_url)
    try:
        first = wait_rows(store, [i["id"] for i in items])
        publish_raw(tiny_settings, [items])
        # A marker published after the duplicate: once it is stored, the duplicate was processed.
        marker = make_item("marker", tiny_settings).to_wire()
        publish_raw(tiny_settings, [[marker]])
        wait_rows(store, [marker["id"]])
        again = store.get_many([i["id"] for i in items])
        assert store.count() == 6
    finally:
        store.close()
    for i in items:
        assert again[i["id"]] == first[i["id"]]  # a done row is final
        assert again[i["id"]].attempts == 1


def test_killed_worker_loses_nothing(
    settings: Settings, tiny_model_dir: Path, worker_factory: Any
) -> None:
    """kill -9 mid-stream: the unacked messages are redelivered; every text ends with one row."""
    s = settings.replace(model=str(tiny_model_dir), visibility_timeout_s=3, flush_every=4,
                         bulk_chunk_size=50)
    first = worker_factory(s)
    texts = [MIXED[i % len(MIXED)] * 2 + f" {i}" for i in range(4000)]
    with Client(s) as client:
        report = client.submit_many(texts)
        deadline = time.monotonic() + 60
        while client.store.count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        first.kill()
        done_at_kill = client.store.count()
        assert 0 < done_at_kill < len(texts), "the kill must land mid-stream"
        worker_factory(s)
        rows = client.wait(report.ids, timeout=180)
        assert client.store.count() == len(texts)
    assert all(r.status == STATUS_DONE for r in rows.values())


def _kill_during_a_flush_after_a_late_message(
    s: Settings, worker_factory: Any
) -> tuple[tuple[int, int], Client, list[str], Settings]:
    """Start a timer-triggered flush of 3,000 long texts, publish a 2-text message
    while it runs, kill -9 the worker; give (queued, unacked) at the kill, the
    open client, every id and the settings used."""
    s = s.replace(visibility_timeout_s=3, flush_every=1000, bulk_chunk_size=3000,
                  max_wait_ms=200, token_budget=300_000,
                  max_batch_size=64)  # no count or token trigger: the timer flushes
    texts = [f"a long enough text about the hotel room number {i} " * 6 for i in range(3000)]
    first = worker_factory(s)
    client = Client(s)
    r = redis.Redis.from_url(s.broker_url)
    try:
        ids = client.submit_many(texts).ids  # one message: one long flush
        deadline = time.monotonic() + 120
        while not (r.hlen("unacked") == 1 and client.queue_length() == 0):
            assert time.monotonic() < deadline, "the worker never took the message"
            time.sleep(0.01)  # polling a condition: the worker has taken the message
        # The worker asked Redis for its next message as it took this one (kombu's BRPOP
        # waits 1 s); its 200 ms timer then starts the flush. Publish inside both.
        time.sleep(0.5)
        ids += client.submit_many(["the late message", "its second text"]).ids
        time.sleep(0.3)  # Redis answers whatever the worker asked for
        assert client.store.count() < len(texts), "the kill must land in the flush"
        first.kill()
        return (client.queue_length(), r.hlen("unacked")), client, ids, s
    except BaseException:
        client.close()
        raise
    finally:
        r.close()


def test_a_message_that_comes_during_a_flush_survives_a_kill(
    settings: Settings, tiny_model_dir: Path, worker_factory: Any
) -> None:
    """kill -9 during a timer-triggered flush, after a message came in meanwhile.

    The worker asked Redis for its next message while the queue was empty;
    the timer then started a long flush, and a second message came. It must
    be in the queue or in the unacked index at the kill (kombu's ``BRPOP``
    pops it into the worker's socket: see the next test), and be stored
    after a restart.
    """
    s = settings.replace(model=str(tiny_model_dir))
    at_kill, client, ids, s = _kill_during_a_flush_after_a_late_message(s, worker_factory)
    with client:
        assert at_kill in ((1, 1), (0, 2)), at_kill
        worker_factory(s)
        rows = client.wait(ids, timeout=120)
    assert len(rows) == 3002 and all(row.status == STATUS_DONE for row in rows.values())


def test_kombu_brpop_loses_a_message_that_comes_during_a_flush(
    settings: Settings, tiny_model_dir: Path, worker_factory: Any
) -> None:
    """The control, with ``BERTSTREAM_ATOMIC_RECEIVE=false`` (kombu's own receive): the
    late message is neither queued nor unacked at the kill. A try whose timing missed the
    window (the message still queued, or taken before the flush) is run again, up to three
    times. If a kombu release closes this gap, this test says so."""
    s = settings.replace(model=str(tiny_model_dir), atomic_receive=False)
    seen = []
    for _attempt in range(3):
        at_kill, client, _, _ = _kill_during_a_flush_after_a_late_message(s, worker_factory)
        seen.append(at_kill)
        try:
            if at_kill == (0, 1):
                break  # the loss, shown
            # Still queued, or taken before the flush: the late message missed the window
            # (a loaded machine delayed the publish or the flush). Start clean and try again.
            with client.store.engine.begin() as conn:
                conn.execute(sa.text(f"DELETE FROM {RESULTS_TABLE}"))
            redis.Redis.from_url(s.broker_url).flushdb()
        finally:
            client.close()
    assert seen[-1] == (0, 1), f"kombu's receive lost nothing in {len(seen)} tries: {seen}"


def test_batched_equals_unbatched(
    sqlite_url: str, redis_url: str, tiny_model_dir: Path, worker_factory: Any, tmp_path: Path
) -> None:
    """The worker's probabilities for mixed-length texts equal each text run alone (1e-4)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # the long text cut at 128 tokens (chunked texts: tests/test_long_texts.py)
    s = Settings(broker_url=redis_url, database_url=sqlite_url, model=str(tiny_model_dir),
                 queue="bst-test-eq", cache_dir=str(tmp_path), long_texts="truncate")
    worker_factory(s)
    with Client(s) as client:
        report = client.submit_many(MIXED)
        rows = client.wait(report.ids, timeout=60)
    assert max(r.batch_size or 0 for r in rows.values()) > 1
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir)).eval()
    truncated = 0
    for task_id, text in zip(report.ids, MIXED, strict=True):
        enc = tok(text, truncation=True, max_length=128, return_tensors="pt")
        with torch.inference_mode():
            probs = torch.softmax(model(**enc).logits, dim=-1)[0].tolist()
        stored = rows[task_id].scores
        assert stored is not None
        for label, p in zip(("negative", "positive"), probs, strict=True):
            assert abs(stored[label] - p) < 1e-4, (text, stored, probs)
        truncated += rows[task_id].truncated
    assert truncated == 1  # the long text, and only it
    assert json.dumps(rows[report.ids[0]].to_json())  # JSON-ready


def test_redelivered_messages_run_alone_then_dead_letter(
    tiny_settings: Settings, worker_factory: Any
) -> None:
    """A message whose worker died before is retried alone; past max_attempts it is dead-lettered."""
    import redis

    s = tiny_settings.replace(max_attempts=3)
    r = redis.Redis.from_url(s.broker_url)
    # As if these messages had killed their worker once, and three times.
    r.set(DELIVERY_KEY_PREFIX + "msg-once", 1)
    r.set(DELIVERY_KEY_PREFIX + "msg-poison", 3)
    r.close()
    once = [make_item("the hotel is good", s).to_wire()]
    poison = [make_item(f"crashes the worker {i}", s).to_wire() for i in range(2)]
    worker_factory(s)
    publish_raw(s, [once], task_id="msg-once")
    publish_raw(s, [poison], task_id="msg-poison")
    store = ResultStore.from_url(s.database_url)
    try:
        rows = wait_rows(store, [once[0]["id"]] + [p["id"] for p in poison])
    finally:
        store.close()
    assert rows[once[0]["id"]].status == STATUS_DONE and rows[once[0]["id"]].attempts == 2
    for p in poison:
        row = rows[p["id"]]
        assert row.status == STATUS_FAILED and row.attempts == 4
        assert row.error and row.error.startswith("dead-lettered after 4 deliveries")
