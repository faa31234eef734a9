"""The Python client's remaining misuse cases: a call racing close(), no iterable handed to
submit_many, filter values no row can hold, and id lists past the databases' limits on
placeholders. Each gives one clear error (or the rows asked for), never an error from
inside kombu, redis-py or the database driver."""

from __future__ import annotations

import datetime as dt
import math
import re
import sqlite3
import threading
import time
import typing
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from contract.constants import LANGS, STATUSES
from contract.errors import BrokerUnavailable, InvalidInput, ResultTimeout
from contract.messages import make_item
from contract.results import ResultStore, utcnow
from producer import Client, ClientClosed
from tests.producer_helpers import broker_settings, lane_messages, record


@pytest.fixture
def rclient(store: ResultStore, redis_url: str, db_url: str) -> Iterator[Client]:
    """A client reading ``store`` (stored rows r0..r49), on SQLite and PostgreSQL."""
    store.upsert([record(f"r{i}") for i in range(50)])
    with Client(broker_settings(redis_url, db_url)) as c:
        yield c


def _queued(redis_url: str, client: Client) -> list[str]:
    return [it["id"] for lane in ("interactive", "bulk")
            for msg in lane_messages(redis_url, f"{client.settings.queue}.{lane}")
            for it in msg["items"]]


def _redis_connections(redis_url: str) -> int:
    """Connections open on the test Redis database, less the one counting them."""
    r = redis.Redis.from_url(redis_url)
    try:
        db = r.connection_pool.connection_kwargs.get("db", 0)
        return sum(1 for c in r.client_list() if c.get("db") == str(db)) - 1
    finally:
        r.close()


def _redis_connections_settle(redis_url: str, most: int) -> int:
    """The connections open on the test Redis database once they are ``most`` or fewer,
    or after 3 s: Redis drops a connection a moment after its client closed it."""
    deadline = time.monotonic() + 3
    while (n := _redis_connections(redis_url)) > most and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


# -- submit_many's items ---------------------------------------------------


@pytest.mark.parametrize(("items", "says"), [
    (None, "submit_many takes an iterable of items (texts, or dicts with 'text'), not NoneType"),
    (5, "not int"),
    ({"text": "hello", "id": "a"}, "not one dict item: use submit(text) or submit_many([item])"),
])
def test_submit_many_without_an_iterable_of_items_says_what_it_takes(
        redis_url: str, sqlite_url: str, items: Any, says: str) -> None:
    """None was Python's own "'NoneType' object is not iterable"; one dict item was read as
    its keys, each queued as a text ("text", "id")."""
    with Client(broker_settings(redis_url, sqlite_url)) as c:
        with pytest.raises(TypeError, match=re.escape(says)):
            c.submit_many(items)
        assert c.queue_length() == 0


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"source": 5}, "source must be a string, got int"),
    ({"ttl_s": math.nan}, "ttl_s must be > 0 seconds"),
    ({"ttl_s": 1e12}, r"finite and at most 253402300799 \(the end of year 9999\), got 1000000000000\.0"),
    ({"ttl_s": "60"}, "ttl_s must be a number of seconds, got str"),
])
def test_submit_many_refuses_a_bad_call_argument_once(redis_url: str, sqlite_url: str,
                                                      kwargs: dict, says: str) -> None:
    """A source or ttl_s no item can take refused every item, one by one (a report of N
    identical errors, nothing sent); submit() raises for the same argument."""
    with Client(broker_settings(redis_url, sqlite_url)) as c:
        with pytest.raises(InvalidInput, match=says) as info:
            c.submit_many(["a", {"text": "b", "source": "own"}], **kwargs)
        assert info.value.item_id is None
        with pytest.raises(InvalidInput, match=says):
            c.submit("a", **kwargs)
        assert c.queue_length() == 0
        assert c.submit_many(["a"], source="tag", ttl_s=60).accepted == 1


@pytest.mark.parametrize("size", [0, "3", -1])
def test_chunk_publisher_refuses_a_chunk_size_that_is_no_count(redis_url: str, sqlite_url: str,
                                                               size: object) -> None:
    """As submit_many: 0 silently meant the default chunk size, a string was a TypeError
    from a comparison inside the publisher."""
    with Client(broker_settings(redis_url, sqlite_url)) as c:
        with pytest.raises(InvalidInput, match="chunk_size must be a whole number above 0"):
            with c.chunk_publisher(chunk_size=size):  # type: ignore[arg-type]
                pass


# -- a call racing close() ---------------------------------------------------


def test_close_inside_a_bulk_submit_is_client_closed(redis_url: str, sqlite_url: str) -> None:
    """The items' generator closes the client (as another thread would): the next chunk
    went out on a connection kombu opened again, which nothing closed any more."""
    idle = _redis_connections(redis_url)
    c = Client(broker_settings(redis_url, sqlite_url))

    def items() -> Iterator[str]:
        yield from ("a", "b")
        c.close()
        yield from ("c", "d")

    with pytest.raises(ClientClosed, match="Client is closed"):
        c.submit_many(items(), chunk_size=2)
    assert len(_queued(redis_url, c)) == 2  # the chunk sent before close()
    assert _redis_connections_settle(redis_url, idle) == idle


def test_close_in_a_publishers_hook_is_client_closed(redis_url: str, sqlite_url: str) -> None:
    """close() in ``before_send`` (a stream's backpressure hook): the chunk was published
    after close() on a reopened connection."""
    idle = _redis_connections(redis_url)
    c = Client(broker_settings(redis_url, sqlite_url))
    c.submit("warm")  # the pool holds an open connection
    with pytest.raises(ClientClosed):
        with c.chunk_publisher(chunk_size=5, before_send=c.close) as publisher:
            publisher.add(make_item("x", c.settings))
    assert len(_queued(redis_url, c)) == 1
    assert _redis_connections_settle(redis_url, idle) == idle


def _close_at_the_next_reply(monkeypatch: pytest.MonkeyPatch, client: Client) -> None:
    """Make ``client.close()`` run as the next Redis reply is about to be read: the moment
    another thread's close() lands in the middle of a call, made certain."""
    read = redis.connection.Connection.read_response
    armed = [True]

    def close_then_read(self: Any, *args: Any, **kwargs: Any) -> Any:
        if armed[0]:
            armed[0] = False
            client.close()
        return read(self, *args, **kwargs)

    monkeypatch.setattr(redis.connection.Connection, "read_response", close_then_read)


def test_close_under_a_publish_is_client_closed(redis_url: str, sqlite_url: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """close() lands while a publish waits for Redis's reply: kombu read on the socket
    close() had dropped, an AttributeError from inside redis-py."""
    c = Client(broker_settings(redis_url, sqlite_url))
    c.submit("warm")
    _close_at_the_next_reply(monkeypatch, c)
    with pytest.raises(ClientClosed):
        c.submit("lost")


def test_close_under_a_redis_read_is_client_closed(redis_url: str, sqlite_url: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """close() lands while queue_length waits for Redis's reply: the call said Redis could
    not be reached (BrokerUnavailable, which a caller retries) though it was up, or
    failed inside redis-py."""
    c = Client(broker_settings(redis_url, sqlite_url))
    assert c.queue_length() == 0
    _close_at_the_next_reply(monkeypatch, c)
    with pytest.raises(ClientClosed):
        c.queue_length()


def test_threads_racing_close_get_client_closed_or_their_answer(redis_url: str,
                                                                rclient: Client) -> None:
    """A web app shutting down while its handlers run: every call of each kind that loses
    the race to close() raises ClientClosed, not BrokerUnavailable (Redis is up) or an
    AttributeError from inside kombu."""
    calls = {
        "submit": lambda c: c.submit("x"),
        "submit_many": lambda c: c.submit_many(["a", "b", "c"], chunk_size=1),
        "get_many": lambda c: c.get_many([f"r{i}" for i in range(50)]),
        "wait": lambda c: c.wait(["r1", "r2"], timeout=1),
        "query": lambda c: c.query(limit=None),
        "queue_length": lambda c: c.queue_length(),
        "live_workers": lambda c: c.live_workers(),
    }
    rclient.close()
    wrong: list[str] = []
    for round_ in range(12):
        c = Client(rclient.settings)
        c.submit("warm")
        start = threading.Barrier(len(calls) + 1)

        def run(name: str, call: Any, c: Client = c, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                for _ in range(40):
                    call(c)
            except ClientClosed:
                pass
            except Exception as exc:  # noqa: BLE001 - collected for the assert
                wrong.append(f"{name}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=run, args=kv) for kv in calls.items()]
        for t in threads:
            t.start()
        start.wait()
        threading.Event().wait(0.002 * (round_ % 6))
        c.close()
        for t in threads:
            t.join(60)
    assert wrong == []


# -- status and lang filters -------------------------------------------------


@pytest.mark.parametrize(("name", "value", "accepted"), [
    ("status", "finished", STATUSES), ("status", "DONE", STATUSES), ("status", "", STATUSES),
    ("lang", "xx", LANGS), ("lang", "EN", LANGS),
])
def test_an_unknown_status_or_lang_is_refused_with_the_values_it_takes(
        rclient: Client, name: str, value: str, accepted: tuple[str, ...]) -> None:
    """They read no rows, which looks like an answer ("nothing finished"); the CLI's
    --status/--lang and the API's status/lang refuse them (exit 2, 422)."""
    says = re.escape(f"unknown {name} '{value}'; expected one of {', '.join(accepted)}")
    for read in (rclient.query, rclient.count, rclient.aggregate):
        with pytest.raises(InvalidInput, match=says):
            read(**{name: value})
    assert rclient.count(status="done") == 50 and rclient.query(status="failed") == []
    assert rclient.count(lang="en") == 0 and rclient.aggregate(status="done")[0]["count"] == 50


def test_the_filter_values_are_the_ones_the_cli_and_the_api_take() -> None:
    """One set of values: the client's, the CLI's choices and the API's parameters."""
    from api import app as api_app
    from producer import cli
    from producer.client import FILTER_VALUES

    assert FILTER_VALUES == {"status": STATUSES, "lang": LANGS}
    assert typing.get_args(api_app.Status) == STATUSES
    assert typing.get_args(api_app.Lang) == LANGS
    options = {p.name: p for p in cli.results.params}
    assert tuple(options["status"].type.choices) == STATUSES  # type: ignore[attr-defined]
    assert tuple(options["lang"].type.choices) == LANGS  # type: ignore[attr-defined]


# -- id lists ----------------------------------------------------------------


def test_an_ids_filter_is_read_once_and_an_empty_one_matches_nothing(rclient: Client) -> None:
    """An iterator of ids was checked (read to its end) before the read, which then found
    nothing; an empty list read every row (get_many([]) reads none)."""
    assert {r.id for r in rclient.query(ids=iter(["r1", "r2", "nope"]))} == {"r1", "r2"}
    assert rclient.count(ids=(i for i in ["r1", "r2", "nope"])) == 2
    assert rclient.query(ids=[]) == [] and rclient.count(ids=[]) == 0
    assert rclient.count(ids=None) == 50


def test_a_model_of_the_wrong_type_is_refused_before_any_table_exists(
        redis_url: str, sqlite_url: str) -> None:
    """get(id, model=5) gave None and windows() [] while no worker had made the table,
    and InvalidInput once one had."""
    with Client(broker_settings(redis_url, sqlite_url)) as c:
        with pytest.raises(InvalidInput, match="model must be a string, got int"):
            c.get("a", model=5)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="model must be a string, got int"):
            c.windows("a", model=5)  # type: ignore[arg-type]


def _limit_sqlite_variables(engine: sa.Engine, limit: int) -> None:
    """Give each new SQLite connection ``limit`` variables per statement, the default of
    SQLite's own builds (this one may allow more)."""
    @sa.event.listens_for(engine, "connect")
    def limited(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)


def _big_id_reads(c: Client, store: ResultStore, n: int) -> None:
    t0 = utcnow()
    store.upsert([record(f"k{i}", finished_at=t0 - dt.timedelta(seconds=i % 7))
                  for i in range(0, n, 1000)])
    stored = n // 1000
    ids = [f"k{i}" for i in range(n)]
    assert c.count(ids=ids) == stored
    assert c.count(ids=ids, status="done", since=t0 - dt.timedelta(hours=1)) == stored
    rows = c.query(ids=ids, limit=None)
    assert len(rows) == stored
    # the database orders and limits across the whole list: newest first, then by id
    newest = sorted(rows, key=lambda r: r.id)
    newest.sort(key=lambda r: r.finished_at, reverse=True)
    assert [r.id for r in c.query(ids=ids, limit=5)] == [r.id for r in newest[:5]]
    assert len(c.get_many(ids)) == stored
    with pytest.raises(ResultTimeout) as info:
        c.wait(ids, timeout=0)
    assert len(info.value.missing) == n - stored
    assert store.delete(ids=ids, dry_run=True).tasks == stored


def test_forty_thousand_ids_on_sqlite_with_its_default_variable_limit(
        redis_url: str, sqlite_url: str) -> None:
    """query(ids=...) and count(ids=...) put every id in one IN list: past SQLite's limit
    on variables (32766 by default) that was "too many SQL variables", an error from the
    driver. get_many, wait and delete read ids 500 at a time, as before."""
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    with Client(broker_settings(redis_url, sqlite_url)) as c:
        _limit_sqlite_variables(c.store.engine, 32766)
        _limit_sqlite_variables(store.engine, 32766)
        store.engine.dispose()
        _big_id_reads(c, store, 40_000)
    store.close()


def test_seventy_thousand_ids_on_postgresql(redis_url: str, pg_url: str) -> None:
    """query(ids=...) and count(ids=...) bound each id: past PostgreSQL's 65535
    parameters a statement, psycopg refused the query, which was reported as the
    database being unreachable (StoreUnavailable: an outage a caller retries)."""
    store = ResultStore.from_url(pg_url)
    store.create_schema()
    with Client(broker_settings(redis_url, pg_url)) as c:
        _big_id_reads(c, store, 70_000)
    store.close()


def test_a_large_list_of_caller_ids_is_submitted_and_checked(redis_url: str,
                                                            db_url: str) -> None:
    """submit_many checks caller ids against the stored rows one chunk at a time, however
    large the chunk: 70,000 items in one message, one of them a conflict."""
    store = ResultStore.from_url(db_url)
    store.create_schema()
    store.upsert([record("c5", text="stored text")])
    with Client(broker_settings(redis_url, db_url)) as c:
        report = c.submit_many([{"text": "t", "id": f"c{i}"} for i in range(70_000)],
                               chunk_size=70_000)
        assert report.accepted == 69_999 and [e.id for e in report.errors] == ["c5"]
        assert report.messages == 1
    store.close()


def test_a_broker_error_is_still_broker_unavailable(sqlite_url: str) -> None:
    """Only a call that lost the race to close() is ClientClosed: an open client whose
    Redis is away still says BrokerUnavailable."""
    with Client(broker_settings("redis://127.0.0.1:1/0", sqlite_url)) as c:
        with pytest.raises(BrokerUnavailable):
            c.queue_length()
