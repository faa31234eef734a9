"""The analysis task in process on a database the test can cut: shared set-up of the
in-process outage tests.

:func:`in_process_outage` gives a store on the test PostgreSQL (schema created), a TCP
proxy in front of it (tests/tcpproxy.py), settings on the proxy with short database
timeouts (so that an outage is met within a test's time), the task on a store through
the proxy, and a Redis client on the test Redis, where the task counts its deliveries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from contract.results import DbTimeouts, ResultStore
from contract.settings import Settings
from tests.tcpproxy import TcpProxy, proxied_pg


def _task(settings: Settings, store: ResultStore) -> Any:
    """The analysis task in process on ``store`` (no model), its deliveries counted in
    the test Redis."""
    from celery import Celery

    from worker import tasks
    from worker.flush import FlushProcessor
    from worker.runner import NullRunner

    proc = FlushProcessor(NullRunner(), store, settings, "t@h", hold_windows=True)
    task = tasks.register_tasks(Celery("t", broker="memory://"), proc, settings)
    task.requeue_pause_s = 0.0
    return task


@dataclass(frozen=True)
class InProcessOutage:
    """What :func:`in_process_outage` sets up."""

    direct: ResultStore  #: on the test PostgreSQL itself, never cut
    proxy: TcpProxy  #: in front of the test PostgreSQL: ``down()``, ``freeze()``, ``up()``
    settings: Settings  #: on the proxy, ``max_attempts=3``, short database timeouts
    store: ResultStore  #: the task's, through the proxy
    task: Any  #: the analysis task on :attr:`store`
    redis: redis.Redis  #: the test Redis, where the deliveries are counted


@contextlib.contextmanager
def in_process_outage(pg_url: str, redis_url: str) -> Iterator[InProcessOutage]:
    """The set-up of :class:`InProcessOutage`; everything closed on the way out."""
    direct = ResultStore.from_url(pg_url)
    direct.create_schema()
    proxy, proxied = proxied_pg(pg_url)
    s = Settings(broker_url=redis_url, database_url=proxied, model="null", max_attempts=3,
                 db_connect_timeout_s=1, db_statement_timeout_s=0.5)
    store = ResultStore.from_url(proxied, DbTimeouts.from_settings(s))
    task = _task(s, store)
    r = redis.Redis.from_url(redis_url)
    try:
        yield InProcessOutage(direct, proxy, s, store, task, r)
    finally:
        proxy.close()
        store.close()
        direct.close()
        r.close()
