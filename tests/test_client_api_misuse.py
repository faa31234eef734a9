"""The Python client as a web app uses it: shared by threads, inherited by forked
workers, closed, and handed arguments of the wrong type or range. Each misuse is one
clear InvalidInput (or TypeError for one id where many are taken), never a hang, a wrong
answer, or an error from deep inside the database driver."""

from __future__ import annotations

import datetime as dt
import os
import threading
import types
from collections.abc import Iterator

import pytest
import redis

from contract.errors import ConfigError, InvalidInput
from contract.results import ResultStore
from producer import Client, ClientClosed
from tests.producer_helpers import broker_settings, lane_messages, record


@pytest.fixture
def rclient(store: ResultStore, redis_url: str, db_url: str) -> Iterator[Client]:
    """A client reading ``store`` (stored rows r0..r49), on SQLite and PostgreSQL."""
    store.upsert([record(f"r{i}") for i in range(50)])
    with Client(broker_settings(redis_url, db_url)) as c:
        yield c


def _returns_within(seconds: float, work: object) -> BaseException | None:
    """Run ``work()`` in a thread; fail when it is still running after ``seconds``;
    give what it raised (None when it returned)."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            work()  # type: ignore[operator]
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return raised[0] if raised else None


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"timeout": float("nan")}, "timeout must be a finite number"),
    ({"timeout": -1}, "timeout must be a finite number"),
    ({"timeout": float("inf")}, "timeout must be a finite number"),
    ({"timeout": "5"}, "timeout must be a number of seconds, got str"),
    ({"timeout": 1, "poll_interval": float("nan")}, "poll_interval must be a finite"),
    ({"timeout": 1, "poll_interval": 0}, "poll_interval must be a finite"),
])
def test_wait_refuses_timeouts_no_clock_reaches(rclient: Client, kwargs: dict,
                                                says: str) -> None:
    """A NaN timeout made a deadline no time passes: the wait never returned (a request
    thread hung for good); a NaN poll interval was a ValueError from time.sleep."""
    raised = _returns_within(5, lambda: rclient.wait(["missing"], **kwargs))
    assert isinstance(raised, InvalidInput) and says in str(raised)


def test_reads_refuse_ids_that_are_no_strings(rclient: Client) -> None:
    """An int or None id (a path parameter not converted) was looked up as nothing: get
    gave None for good and wait ran its whole timeout; one string passed as the ids was
    read as one id per character."""
    for bad in (None, 17, b"r1"):
        with pytest.raises(InvalidInput, match="id must be a string"):
            rclient.get(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="id must be a string"):
            rclient.get_many(["r1", bad])  # type: ignore[list-item]
        with pytest.raises(InvalidInput, match="id must be a string"):
            rclient.windows(bad)  # type: ignore[arg-type]
        raised = _returns_within(5, lambda b=bad: rclient.wait(["r1", b], timeout=30))
        assert isinstance(raised, InvalidInput)
    with pytest.raises(TypeError, match=r"pass \[id\]"):
        rclient.get_many("r1")
    with pytest.raises(TypeError, match=r"pass \[id\]"):
        rclient.wait("r1", timeout=1)
    # the documented shapes: missing ids are absent; no ids at all is no wait
    assert set(rclient.get_many(["r1", "nope", "r2"])) == {"r1", "r2"}
    assert rclient.wait([], timeout=0) == {}


@pytest.mark.parametrize(("filters", "says"), [
    ({"since": "2020-01-01"}, "since must be a datetime"),
    ({"source": 5}, "source must be a string"),
    ({"model": 5}, "model must be a string"),
    ({"ids": [5]}, "id must be a string"),
])
def test_read_filters_of_the_wrong_type_are_invalid_input(rclient: Client, filters: dict,
                                                          says: str) -> None:
    """A str for a datetime was an AttributeError; an int filter was no rows on SQLite and a
    StoreUnavailable on PostgreSQL (an outage: a caller would retry it for ever)."""
    for read in (rclient.query, rclient.count):
        with pytest.raises(InvalidInput, match=says):
            read(**filters)
    if "ids" not in filters:
        with pytest.raises(InvalidInput, match=says):
            rclient.aggregate(**filters)


def test_query_limit_is_a_whole_number_not_below_zero(rclient: Client) -> None:
    """SQLite reads LIMIT -1 as no limit (every row came back), PostgreSQL refused it;
    a string limit was passed to the database as it was."""
    for bad in (-1, "5", 2.5, True):
        with pytest.raises(InvalidInput, match="limit must be a whole number"):
            rclient.query(limit=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"pass \[id\]"):
        rclient.query(ids="r1")  # type: ignore[arg-type]
    assert len(rclient.query(limit=3)) == 3 and rclient.query(limit=0) == []
    assert len(rclient.query(limit=None, since=dt.datetime(2000, 1, 1))) == 50


def test_model_arguments_are_invalid_input_naming_the_argument(redis_url: str,
                                                               sqlite_url: str) -> None:
    """``model=5`` was a TypeError from the regex module; ``model="a b"`` a ConfigError
    naming BERTSTREAM_MODEL_NAME, a setting the caller never set."""
    with Client(broker_settings(redis_url, sqlite_url)) as c:
        for call in (lambda m: c.submit("hi", model=m), lambda m: c.submit_many(["hi"], model=m),
                     c.for_model):
            with pytest.raises(InvalidInput, match="model must be a string, got int"):
                call(5)
            with pytest.raises(InvalidInput, match="model 'a b': a model name is") as info:
                call("a b")
            assert not isinstance(info.value, ConfigError)
            assert "BERTSTREAM_MODEL_NAME" not in str(info.value)
        assert c.queue_length() == 0


@pytest.mark.parametrize("size", [0, "3", 2.0, True])
def test_submit_many_refuses_a_chunk_size_that_is_no_count(redis_url: str, sqlite_url: str,
                                                           size: object) -> None:
    """0 silently meant the default chunk size; a string was a TypeError from a comparison."""
    with Client(broker_settings(redis_url, sqlite_url)) as c:
        with pytest.raises(InvalidInput, match="chunk_size must be a whole number above 0"):
            c.submit_many(["a", "b"], chunk_size=size)  # type: ignore[arg-type]
        assert c.queue_length() == 0


def test_a_mapping_item_with_an_id_is_checked_for_conflicts(rclient: Client,
                                                           store: ResultStore) -> None:
    """Only ``dict`` items counted as carrying a caller id: another Mapping (a frozen
    request body, a MappingProxyType) skipped the conflict check and its new text was
    queued under an id stored with another text."""
    store.upsert([record("kept", text="the original")])
    report = rclient.submit_many([types.MappingProxyType({"text": "changed", "id": "kept"})])
    assert report.ids == [] and [(e.index, e.id) for e in report.errors] == [(0, "kept")]
    assert "different text" in report.errors[0].reason


def test_a_closed_client_says_so_instead_of_reconnecting(redis_url: str, db_url: str,
                                                         store: ResultStore) -> None:
    """After close() a client opened new connections on the next call, which nothing
    closed any more (a leak per use after shutdown); it is a ClientClosed error now.
    close() stays idempotent, also for a client that never connected."""
    settings = broker_settings(redis_url, db_url)
    with Client(settings) as c:
        c.submit("hi")
        other = c.for_model("sentiment-v2")
        assert c.get("x") is None
    c.close()
    Client(settings).close()
    for call in (lambda: c.submit("again"), lambda: c.submit_many(["again"]),
                 lambda: c.get("x"), lambda: c.query(), lambda: c.queue_length(),
                 lambda: c.store, lambda: other.submit("again"),
                 lambda: c.for_model("another")):
        with pytest.raises(ClientClosed, match="Client is closed"):
            call()
    assert len(lane_messages(redis_url, f"{settings.queue}.interactive")) == 1


def _db_connections(redis_url: str) -> int:
    r = redis.Redis.from_url(redis_url)
    try:
        db = r.connection_pool.connection_kwargs.get("db", 0)
        return sum(1 for c in r.client_list() if c.get("db") == str(db)) - 1  # less r's own
    finally:
        r.close()


def test_threads_share_one_client_without_losing_or_mixing_anything(
        rclient: Client, redis_url: str) -> None:
    """A web app's handler pool: 16 threads submit, submit_many, get_many, wait and count
    the queue on one client at once. Every id reaches Redis once, every read gives the
    rows asked for, and the Redis connections stay bounded and are all closed by close()."""
    idle = _db_connections(redis_url)  # the fixture's own
    errors: list[BaseException] = []
    sent: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def handler(k: int) -> None:
        try:
            start.wait()
            for j in range(15):
                one = rclient.submit(f"text {k} {j}")
                many = rclient.submit_many([f"bulk {k} {j} {x}" for x in range(3)]).ids
                a, b = f"r{(k * 7 + j) % 50}", f"r{(k + 3 * j) % 50}"
                got = rclient.get_many([a, "nope", b])
                assert set(got) == {a, b} and all(got[i].id == i for i in got)
                assert rclient.wait([a], timeout=5)[a].id == a
                assert rclient.queue_length() >= 0
                with lock:
                    sent.extend([one, *many])
        except BaseException as exc:  # noqa: BLE001 - collected for the assert below
            errors.append(exc)

    threads = [threading.Thread(target=handler, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    queued = [it["id"] for lane in ("interactive", "bulk")
              for msg in lane_messages(redis_url, f"{rclient.settings.queue}.{lane}")
              for it in msg["items"]]
    assert len(sent) == 16 * 15 * 4 and sorted(queued) == sorted(sent)
    held = _db_connections(redis_url)
    for _ in range(200):
        rclient.submit("one more")
    assert _db_connections(redis_url) <= held  # reused, not one more per submit
    rclient.close()
    assert _db_connections(redis_url) == idle


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_client_inherited_by_forked_children_reads_its_own_answers(
        rclient: Client, redis_url: str) -> None:
    """gunicorn --preload: the client is built (and used) in the master, then forked.
    Parent and children shared the same database connections and read each other's
    replies: wrong rows for the ids asked, and "result object does not return rows"
    errors. A child now drops what it inherited and opens its own connections."""
    rclient.submit("warm up")  # every connection open before the fork
    assert rclient.get("r1") is not None and rclient.queue_length() == 1

    def load(tag: str) -> int:
        bad = 0
        for j in range(150):
            try:
                rclient.submit(f"{tag} {j}")
                want = f"r{j % 50}"
                if list(rclient.get_many([want])) != [want]:
                    bad += 1
                rclient.queue_length()
            except Exception:  # noqa: BLE001 - counted: the parent asserts on it
                bad += 1
        return bad

    children = []
    for k in range(3):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's exit code is asserted
            code = 1
            try:
                code = 1 if load(f"child{k}") else 0
                rclient.close()
            finally:
                os._exit(code)
        children.append(pid)
    assert load("parent") == 0
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert codes == [0, 0, 0]
    assert rclient.queue_length() == 1 + 4 * 150  # every submit of every process arrived
