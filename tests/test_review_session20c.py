"""Review of the wait deadline in the store (ResultStore.until and the connect timeout).

A connection opened under a deadline waits for the server until then at most; that
must not change how long connections opened later, without a deadline, wait
(SQLAlchemy 2.0 hands every connect of an engine the same parameters). A database
that answers, only far away, must still give a wait's one look its rows.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from bench.faults import TcpProxy
from contract.results import ResultStore, make_engine
from producer import Client
from tests.producer_helpers import broker_settings, record
from tests.tcpproxy import proxied_pg


def _connect_timeout(engine_conn) -> str:  # type: ignore[no-untyped-def]
    dsn = engine_conn.connection.dbapi_connection.info.dsn
    return dict(p.split("=", 1) for p in dsn.split())["connect_timeout"]


def test_deadline_connect_timeout_does_not_stick(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        with ResultStore.until(time.monotonic() + 3), engine.connect() as conn:
            assert _connect_timeout(conn) == "3"
        engine.dispose()
        with engine.connect() as conn:
            assert _connect_timeout(conn) == "10"  # the default BERTSTREAM_DB_CONNECT_TIMEOUT_S
    finally:
        engine.dispose()


class _FarProxy(TcpProxy):
    """A proxy that forwards everything, each chunk a little late: a distant database."""

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        class Late:
            def __getattr__(self, name: str) -> Any:
                return getattr(dst, name)

            def sendall(self, data: bytes) -> None:
                time.sleep(0.04)
                dst.sendall(data)

        super()._pipe(src, Late())  # type: ignore[arg-type]


def test_one_look_reads_a_distant_database(pg_url: str, redis_url: str) -> None:
    store = ResultStore.from_url(pg_url)
    store.create_schema()
    store.upsert([record("far-1")])
    proxy, url = proxied_pg(pg_url, _FarProxy)
    client = Client(broker_settings(redis_url, url))
    try:
        for _ in range(3):
            assert list(client.wait(["far-1"], timeout=0)) == ["far-1"]
    finally:
        client.close()
        proxy.close()
        store.close()
