"""Poison messages against a real worker process: it keeps running and the queue drains.

The promise: whatever arrives on the queue, every other task is still
stored, the bad one is recorded where it can be seen, the same worker
process keeps running, and nothing stays queued or unacked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from typing import Any

import pytest
import redis

from contract.broker import lane_queue, make_celery
from contract.constants import DELIVERY_KEY_PREFIX, STATUS_DONE, STATUS_FAILED, TASK_ANALYZE
from contract.results import ResultStore
from contract.settings import Settings
from producer.client import Client
from tests.test_pipeline import publish_raw, wait_rows
from tests.test_poison import _refuse_rows
from worker.flush import derived_key

pytestmark = pytest.mark.slow


def wait_broker_idle(settings: Settings, timeout: float = 60.0, stable_s: float = 1.0) -> None:
    """Until no message of ``settings``' queues is waiting or unacked for ``stable_s`` in a row
    (fails after ``timeout``). One empty reading is not enough: a message being requeued,
    or just popped by the worker, is briefly in neither place."""
    client = redis.Redis.from_url(settings.broker_url)
    queues = [lane_queue(settings, bulk) for bulk in (True, False)]
    deadline = time.monotonic() + timeout
    idle_since: float | None = None
    try:
        while True:
            waiting = sum(client.llen(q) for q in queues)
            unacked = client.hlen("unacked")
            now = time.monotonic()
            if waiting == 0 and unacked == 0:
                idle_since = idle_since if idle_since is not None else now
                if now - idle_since >= stable_s:
                    return
            else:
                idle_since = None
            if time.monotonic() > deadline:
                raise AssertionError(f"{waiting} message(s) waiting, {unacked} unacked")
            time.sleep(0.1)
    finally:
        client.close()


def test_every_poison_kind_leaves_the_worker_running_and_the_queue_empty(
        settings: Settings, tiny_model_dir: Any, worker_factory: Any) -> None:
    s = settings.replace(model=str(tiny_model_dir), flush_every=4, bulk_chunk_size=20,
                         max_attempts=3)
    unwritable_text = "the database refuses this text in every form"
    store = ResultStore.from_url(s.database_url)
    store.create_schema()
    _refuse_rows(store, sha=hashlib.sha256(unwritable_text.encode()).hexdigest())
    worker = worker_factory(s)
    now = time.time()
    poison = [
        {"id": "mate-1", "text": "the hotel is good", "submitted_at": now},
        {"id": "sb-poison-\ud800", "text": "good hotel", "submitted_at": now},
        {"id": "nul\x00id", "text": "good hotel", "submitted_at": now},
        {"id": "x" * 150, "text": "good hotel", "submitted_at": now},
        {"id": "src-surrogate", "text": "good hotel", "source": "\ud800", "submitted_at": now},
        {"id": "meta-nul", "text": "good hotel", "meta": {"k": "a\x00b"}, "submitted_at": now},
        {"id": "huge-time", "text": "good hotel", "submitted_at": 1e300},
        {"id": "mate-2", "text": "电影很差", "submitted_at": now},
    ]
    # first alone (a timer-triggered flush), then amid healthy traffic (count-triggered)
    publish_raw(s, [poison], task_id="poison-1")
    try:
        first = wait_rows(store, ["mate-1", "mate-2"], timeout=60)
        with Client(s) as client:
            healthy = client.submit_many([f"healthy text number {i}" for i in range(200)]).ids
            publish_raw(s, ["not a list of items"], task_id="t" * 300)
            publish_raw(s, [[{"id": "mate-3", "text": "fine", "submitted_at": now},
                             {"id": "unwritable", "text": unwritable_text,
                              "submitted_at": now}]], task_id="poison-2")
            healthy += client.submit_many([f"more healthy text {i}" for i in range(200)]).ids
            done = client.wait(healthy + ["mate-3"], timeout=120)
        wait_broker_idle(s)
        rows = {r.id: r for r in store.query(limit=None)}
    finally:
        store.close()
    worker.check_alive()  # the same process, never restarted
    assert first["mate-1"].status == first["mate-2"].status == STATUS_DONE
    assert all(r.status == STATUS_DONE for r in done.values())
    assert len(done) == 401
    for key in ("malformed-poison-1-1", "malformed-poison-1-2", "malformed-poison-1-3",
                "src-surrogate", "meta-nul"):
        assert rows[key].status == STATUS_FAILED and rows[key].error, key
    assert rows["huge-time"].status == STATUS_DONE
    assert rows[derived_key("t" * 300, 0)].status == STATUS_FAILED
    assert "unwritable" not in rows  # refused in every form: dead-lettered, then dropped
    deadline = time.monotonic() + 60
    while "dead-lettering message poison-2" not in worker.log() and time.monotonic() < deadline:
        time.sleep(0.1)  # a poll interval: the last redelivery may still be on its way
    log = worker.log()
    assert "dead-lettering message poison-2 after 4 deliveries" in log
    assert "Unrecoverable error" not in log and "Error in timer" not in log
    r = redis.Redis.from_url(s.broker_url)
    try:
        assert not r.exists(DELIVERY_KEY_PREFIX + "poison-2")
    finally:
        r.close()
    # sent: 400 healthy, 8 + 1 + 2 in the poison messages; stored: all but the unwritable one
    assert len(rows) == 400 + 8 + 1 + 2 - 1


def _publish_message(settings: Settings, body: Any, headers: dict[str, Any]) -> None:
    """A message on the bulk lane with this body and these headers, whatever they are: what
    a foreign or broken producer could put there, below Celery's own send."""
    app = make_celery(settings)
    try:
        queue = app.amqp.queues[lane_queue(settings, bulk=True)]
        with app.connection_for_write() as conn:
            conn.Producer(serializer="json").publish(
                body, exchange=queue.exchange, routing_key=queue.routing_key,
                declare=[queue], headers=headers)
    finally:
        app.close()


def test_messages_that_are_no_task_request_fail_alone_and_the_worker_runs_on(
        settings: Settings, tiny_model_dir: Any, worker_factory: Any) -> None:
    """Celery cannot build a task request from these; before, the exception left the event
    loop and stopped the worker, and every worker the message was redelivered to. Each is
    now one failed row, acked, and the traffic around it is stored. A message with a
    Celery eta a day ahead runs now (it used to wait unacked for ever)."""
    s = settings.replace(model=str(tiny_model_dir))
    worker = worker_factory(s)
    items = [{"id": "inside", "text": "good", "submitted_at": time.time()}]
    later = [{"id": "eta-item", "text": "good", "submitted_at": time.time()}]
    tomorrow = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).isoformat()
    task = {"task": TASK_ANALYZE}
    with Client(s) as client:
        before = client.submit_many([f"before {i}" for i in range(10)]).ids
        for body, headers in (
            ([items], {**task, "id": "args-only"}),          # no kwargs, no embed
            (None, {**task, "id": "null-body"}),
            ([[items], {}, {}], {**task, "id": 7}),          # a task id that is no string
            ([[items], {}, {}], dict(task)),                 # no task id at all
            ([[later], {}, {}], {**task, "id": "with-eta", "eta": tomorrow}),  # run now
        ):
            _publish_message(s, body, headers)
        after = client.submit_many([f"after {i}" for i in range(10)]).ids
        done = client.wait(before + after + ["eta-item"], timeout=120)
    wait_broker_idle(s)
    worker.check_alive()  # the same process, never restarted
    assert all(r.status == STATUS_DONE for r in done.values()) and len(done) == 21
    store = ResultStore.from_url(s.database_url)
    try:
        refused = [r for r in store.query(limit=None)
                   if "not a Celery task request" in (r.error or "")]
        assert len(refused) == 4 and all(r.status == STATUS_FAILED for r in refused)
        row = store.get(derived_key("args-only", 0))
        assert row is not None and "ValueError" in (row.error or "")
        assert store.get("inside") is None  # a message that is no request is not run
    finally:
        store.close()
    assert "Unrecoverable error" not in worker.log()


def test_remote_control_is_off_by_default(settings: Settings, tiny_model_dir: Any,
                                          worker_factory: Any) -> None:
    """A `shutdown` broadcast by any Redis client does not reach the worker."""
    s = settings.replace(model=str(tiny_model_dir))
    worker = worker_factory(s)
    app = make_celery(s)
    try:
        assert app.conf.worker_enable_remote_control is False
        app.control.broadcast("shutdown")
    finally:
        app.close()
    with Client(s) as client:
        task_id = client.submit("still here?")
        row = client.wait([task_id], timeout=60)[task_id]
    assert row.status == STATUS_DONE
    worker.check_alive()


def test_worker_exits_3_when_the_database_is_unreachable(settings: Settings,
                                                         tiny_model_dir: Any,
                                                         worker_factory: Any) -> None:
    """Nothing listens on the port: the worker says so and exits 3, as the CLI documents."""
    from tests.tcpproxy import SilentListener

    silent = SilentListener()
    try:
        for url in ("postgresql+psycopg://postgres@127.0.0.1:9/x",  # refused
                    f"postgresql+psycopg://postgres@127.0.0.1:{silent.port}/x"):  # silent
            s = settings.replace(model=str(tiny_model_dir), database_url=url,
                                 db_connect_timeout_s=2)
            w = worker_factory(s, ready=False)
            assert w.proc.wait(timeout=90) == 3, w.log()
            assert "error: " in w.log()
    finally:
        silent.close()
