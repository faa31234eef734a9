"""Client.wait and AsyncClient.wait end by their timeout whatever PostgreSQL does.

A web app waits inside a request: the call must return, or raise, about ``timeout``
seconds later. A database that stops answering (a hung host, a proxy whose far
side is gone) held a wait for the store's statement guard and a reconnect (tens of
seconds); a database restarting (connection refused) failed the wait at once,
though the results came a moment later. Real PostgreSQL behind a TCP proxy the
test freezes (silent) or takes down (refused); the client keeps the default
database timeouts, far longer than the waits. A schema one revision behind while
another process migrates it: the wait's schema check waited for the migration lock
until the migration ended, whatever the timeout.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from contract import migrate
from contract.errors import ResultTimeout, StoreRefused, StoreUnavailable
from contract.results import ResultRecord, ResultStore
from producer import AsyncClient, Client
from producer.client import MIN_WAIT_READ_S
from tests.producer_helpers import broker_settings, record
from tests.tcpproxy import TcpProxy, proxied_pg

pytestmark = pytest.mark.slow

#: What a wait may take past its timeout here: a silent wait ends at its timeout when
#: its read began by then (a read begun later may take MIN_WAIT_READ_S); the rest is
#: room for a loaded machine.
MARGIN_S = 1.5

Wait = Callable[[list[str], float], dict[str, ResultRecord]]


@pytest.fixture
def proxied(pg_url: str) -> Iterator[tuple[TcpProxy, ResultStore, str]]:
    """A proxy to the test database, a store writing to it directly (as a worker), and
    the database URL through the proxy (what the waiting client gets)."""
    store = ResultStore.from_url(pg_url)
    store.create_schema()
    proxy, url = proxied_pg(pg_url)
    try:
        yield proxy, store, url
    finally:
        proxy.thaw()
        proxy.close()
        store.close()


@pytest.fixture(params=["sync", "async"])
def wait_on(request: pytest.FixtureRequest,
            redis_url: str) -> Iterator[Callable[[str], Wait]]:
    """A wait on a client of the given database URL: Client.wait, or AsyncClient.wait
    run on a loop of its own, with the same arguments."""
    closers: list[Callable[[], None]] = []

    def make(database_url: str) -> Wait:
        settings = broker_settings(redis_url, database_url)
        if request.param == "sync":
            client = Client(settings)
            closers.append(client.close)
            return lambda ids, timeout: client.wait(ids, timeout=timeout)
        aclient = AsyncClient(settings)
        loop = asyncio.new_event_loop()

        def close() -> None:
            loop.run_until_complete(aclient.aclose())
            loop.close()

        closers.append(close)
        return lambda ids, timeout: loop.run_until_complete(aclient.wait(ids, timeout=timeout))

    yield make
    for close in closers:
        close()


def _timed(call: Callable[[], object]) -> tuple[float, object]:
    """How long ``call()`` took, and what it returned or raised."""
    t0 = time.monotonic()
    try:
        out: object = call()
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        out = exc
    return time.monotonic() - t0, out


def _client_threads() -> list[threading.Thread]:
    """The threads watching database connections (not the async client's pool)."""
    return [t for t in threading.enumerate()
            if t.name.startswith("bertstream-db-guard")]


def test_a_wait_ends_by_its_timeout_when_the_database_goes_silent(
        proxied: tuple[TcpProxy, ResultStore, str], wait_on: Callable[[str], Wait]) -> None:
    """Silent mid-session (a pooled connection) and then on connect: each wait raises
    StoreUnavailable by its timeout; the connections cut are not pooled, and once the
    database answers again the next wait reads it."""
    proxy, store, url = proxied
    store.upsert([record("a")])
    wait = wait_on(url)
    assert set(wait(["a"], 2)) == {"a"}  # a pooled connection
    threads = _client_threads()
    proxy.freeze()
    for _ in range(2):  # the pooled connection, then a new one
        took, out = _timed(lambda: wait(["b"], 2))
        assert isinstance(out, StoreUnavailable), out
        assert took < 2 + MARGIN_S, took
    took, out = _timed(lambda: wait(["b"], 0))  # one look: no longer than a connect
    assert isinstance(out, StoreUnavailable), out
    assert took < 2 + MARGIN_S, took
    assert len(_client_threads()) <= len(threads), threads  # no thread left per wait
    proxy.thaw()
    took, out = _timed(lambda: wait(["a"], 5))
    assert isinstance(out, dict) and set(out) == {"a"}, out


def test_a_wait_rides_out_a_database_restart(
        proxied: tuple[TcpProxy, ResultStore, str], wait_on: Callable[[str], Wait]) -> None:
    """Connection refused with time left: the wait polls on, and returns the result a
    worker stored while the client could not reach the database."""
    proxy, store, url = proxied
    store.upsert([record("a")])
    wait = wait_on(url)
    assert set(wait(["a"], 2)) == {"a"}  # a pooled connection, then the restart
    proxy.down()

    def restart() -> None:
        time.sleep(1.0)
        store.upsert([record("b")])
        proxy.up()

    back = threading.Thread(target=restart)
    back.start()
    try:
        took, out = _timed(lambda: wait(["b"], 10))
    finally:
        back.join()
    assert isinstance(out, dict) and set(out) == {"b"}, out
    assert took < 10, took


def test_a_database_still_down_at_the_deadline_is_store_unavailable(
        proxied: tuple[TcpProxy, ResultStore, str], wait_on: Callable[[str], Wait]) -> None:
    """Still refused when the time is up: StoreUnavailable (the cause), not
    ResultTimeout, which stays for a database that answers without the results."""
    proxy, store, url = proxied
    wait = wait_on(url)
    proxy.down()
    took, out = _timed(lambda: wait(["b"], 1.5))
    assert isinstance(out, StoreUnavailable), out
    assert 1.4 <= took < 1.5 + MARGIN_S, took  # it polled on until the timeout
    proxy.up()
    took, out = _timed(lambda: wait(["b"], 0.5))
    assert isinstance(out, ResultTimeout), out


def test_a_read_on_a_silent_database_ends_when_the_guard_cuts(
        proxied: tuple[TcpProxy, ResultStore, str], redis_url: str) -> None:
    """A plain get (no deadline) on a database gone silent: StoreUnavailable once the
    guard cuts the pooled connection. A connection the guard cut is no stale one to
    open again: on a silent server that waited a connect timeout more."""
    proxy, store, url = proxied
    store.upsert([record("a")])
    client = Client(broker_settings(redis_url, url, db_statement_timeout_s=1,
                                    db_connect_timeout_s=4))
    try:
        assert client.get("a") is not None  # a pooled connection
        proxy.freeze()
        took, out = _timed(lambda: client.get("a"))
        assert isinstance(out, StoreUnavailable), out
        guard_s = client.store.timeouts.guard_s
        assert guard_s - 0.5 < took < guard_s + MARGIN_S, (took, guard_s)
    finally:
        client.close()


#: Seconds the migration of :func:`_migrating` holds the lock at most: a wait blocked in
#: it (one that fails this test) ends then.
MIGRATION_S = 8


def _migrating(url: str) -> subprocess.Popen[str]:
    """Another process migrating ``url`` to head under the migration lock (the path
    ``db upgrade`` takes), from when this returns until a line is written to its stdin
    (:data:`MIGRATION_S` at most)."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import select
        import sys
        from alembic import command
        from contract import migrate
        from contract.results import ResultStore

        def upgrade(conn):
            print("locked", flush=True)
            select.select([sys.stdin], [], [], {MIGRATION_S})
            command.upgrade(migrate._config(conn), "head")
            conn.commit()

        migrate._locked(ResultStore.from_url({url!r}), upgrade, "cannot upgrade")
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


def test_a_wait_ends_by_its_timeout_while_another_process_migrates(
        db_url: str, wait_on: Callable[[str], Wait]) -> None:
    """The schema one revision behind, another process holding the migration lock: the
    wait's schema check waits for the lock until the wait's read is cut, then raises
    StoreUnavailable saying a migration holds it (the database could not be read, no
    ResultTimeout). Once the migration is done, the next wait reads the result."""
    store = ResultStore.from_url(db_url)
    try:
        behind = [rev for rev, _, _ in migrate.history()][-2]
        migrate.upgrade(store, behind)
        wait = wait_on(db_url)
        holder = _migrating(db_url)
        try:
            took, out = _timed(lambda: wait(["a"], 1))
        finally:
            holder.communicate("go\n", timeout=60)
        assert holder.returncode == 0
        assert took < 1 + MIN_WAIT_READ_S + MARGIN_S, (took, out)
        assert isinstance(out, StoreUnavailable) and not isinstance(out, StoreRefused), out
        assert "migrating the schema (it holds the migration lock)" in str(out), out
        store.upsert([record("a")])
        took, out = _timed(lambda: wait(["a"], 5))
        assert isinstance(out, dict) and set(out) == {"a"}, out
    finally:
        store.close()
