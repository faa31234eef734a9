"""Review of the 2026-12-06 changes: the defects found in them, each shown by a test.

- Rows an earlier version stored on SQLite with NaN in ``scores`` (done, ``score``
  NULL) read as null everywhere but in the model comparison, which reads ``scores``
  in SQL: SQLite's ``json_extract`` refused the whole comparison as malformed JSON.
- ``BERTSTREAM_DTYPE=auto`` loaded the wider model while the refused float16 one
  was still held (by the exception being handled): two copies of the weights at
  once, on a GPU where the model fits once but not twice, out of memory.
- With ``BERTSTREAM_ATOMIC_RECEIVE=false`` a full Redis failed healthy tasks: kombu's
  BRPOP popped them, their unacked record was refused, and they were parked (and
  dropped) as items kombu cannot read.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import torch

from contract.queries import Filters, compare
from contract.results import ResultStore
from contract.settings import Settings
from tests.test_non_finite_scores import HALF, _beyond_float16
from worker.flush import FlushProcessor
from worker.runner import NullRunner


def _done(store: ResultStore, model: str, ids: list[str]) -> None:
    settings = Settings(model_name=model, database_url="sqlite://")
    processor = FlushProcessor(NullRunner(), store, settings, worker_name="t@h")
    processor.process([("m-" + model, [[{"id": i, "text": f"text {i}"} for i in ids]])])


def test_compare_leaves_out_rows_stored_with_nan_scores(sqlite_store: ResultStore) -> None:
    """A text whose B row an earlier worker stored with NaN scores is no comparison (no
    probability to compare): left out, and the other texts compared as before."""
    _done(sqlite_store, "a", ["t1", "t2"])
    _done(sqlite_store, "b", ["t1", "t2"])
    with sqlite_store.engine.begin() as conn:  # as the earlier version wrote it
        conn.execute(sa.text("UPDATE bertstream_results SET score = NULL, scores = :s "
                             "WHERE id = 't2' AND model = 'b'"),
                     {"s": '{"negative": NaN, "positive": NaN}'})
    got = compare(sqlite_store, "a", "b", Filters())
    assert got.texts == 1 and [r["id"] for r in got.largest] == ["t1"]
    # A's row with NaN: left out the same way.
    got = compare(sqlite_store, "b", "a", Filters())
    assert got.texts == 1 and [r["id"] for r in got.largest] == ["t1"]


def test_auto_precision_frees_the_float16_model_before_loading_the_wider_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the second load begins, nothing holds the refused float16 model any more."""
    import worker.app
    from worker.runner import HFRunner

    built: list[weakref.ref[Any]] = []
    held_at_reload: list[bool] = []

    class Watched(HFRunner):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if built:  # the reload: is the first model still alive?
                gc.collect()
                held_at_reload.append(built[0]() is not None)
            built.append(weakref.ref(self))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(worker.app, "HFRunner", Watched)
    path = _beyond_float16(tmp_path / "m")
    runner = worker.app.build_runner(Settings(model=str(path), dtype="auto"), HALF)
    assert runner.placement.dtype == torch.float32  # type: ignore[attr-defined]
    assert held_at_reload == [False]


def test_kombu_brpop_mode_keeps_the_messages_it_pops_from_a_full_redis(
        redis_server: Any, tmp_path: Path, tiny_model_dir: Path, worker_factory: Any) -> None:
    """``BERTSTREAM_ATOMIC_RECEIVE=false``: kombu's BRPOP pops a message even from a full
    Redis (a pop frees memory), whose record in the unacked index is then refused. The
    message was parked as "not a message kombu can read" and, its copy refused too,
    dropped, its task stored as failed with the OOM reply for a reason: a healthy task
    failed for a Redis outage. Now it is kept and served once Redis has room."""
    import os
    import signal
    import time

    import redis

    from producer.client import Client
    from tests.test_pipeline import wait_rows
    from tests.test_redis_full import _full_settings, memory_full

    settings = _full_settings(redis_server, tmp_path, model=str(tiny_model_dir),
                              atomic_receive=False, visibility_timeout_s=4)
    worker = worker_factory(settings)
    admin = redis.Redis.from_url(redis_server.url)
    try:
        with Client(settings) as client:
            os.kill(worker.pid, signal.SIGSTOP)  # the tasks wait in the queue meanwhile
            try:
                ids = [client.submit(f"kept text {i}") for i in range(3)]
                time.sleep(1.5)  # the BRPOP in flight, if any, times out
            finally:
                with memory_full(admin):
                    os.kill(worker.pid, signal.SIGCONT)
                    time.sleep(4)  # the worker pops while Redis is full
                    worker.check_alive()
            done = wait_rows(client.store, ids, timeout=30)
    finally:
        admin.close()
    assert {i: r.status for i, r in done.items()} == dict.fromkeys(ids, "done"), {
        i: r.error for i, r in done.items()}


@pytest.mark.parametrize("prefix", ["", "bst-"])
def test_kombu_brpop_items_popped_from_a_full_redis_go_back_in_order(
        redis_server: Any, prefix: str) -> None:
    """The channel under kombu's BRPOP: while Redis is full each popped item is kept (not
    parked), then put back on its queue, with or without a global key prefix (one the
    queue's name starts with, too); delivered in their order once Redis has room."""
    import redis
    from kombu import Connection

    from tests.test_kombu_receive import FIRST, _consumer, _drain, _publish, memory_full
    from worker import kombu_redis

    assert kombu_redis.install(atomic_receive=False)
    options = {"global_keyprefix": prefix} if prefix else {}
    conn = Connection(redis_server.url, transport_options=options)
    r = redis.Redis.from_url(redis_server.url)
    try:
        got: list[Any] = []
        _consumer(conn, got)
        for body in ("one", "two", "three"):
            _publish(conn, body)
        with memory_full(r):
            for _ in range(10):
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.1)
            assert got == []
            assert r.exists(prefix + FIRST + kombu_redis.UNDELIVERABLE_SUFFIX) == 0
        _drain(conn, got, 3)
        assert [body for body, _ in got] == ["one", "two", "three"]
        assert r.llen(prefix + FIRST) == 0
    finally:
        conn.release()
        r.close()
        assert kombu_redis.install()
