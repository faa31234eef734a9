"""Client: messages on the right lane in the wire format, bulk chunks, validation, waiting."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from contract.constants import TASK_ANALYZE
from contract.errors import BrokerUnavailable, ConfigError, IdConflict, InvalidInput, ResultTimeout
from contract.messages import item_from_wire
from contract.results import ResultStore
from contract.settings import Settings
from producer import Client, ItemError, SubmitReport
from tests.producer_helpers import broker_settings, lane_messages, record


@pytest.fixture
def client(bsettings: Settings) -> Iterator[Client]:
    with Client(bsettings) as c:
        yield c


def _lanes(settings: Settings) -> tuple[str, str]:
    return f"{settings.queue}.interactive", f"{settings.queue}.bulk"


def test_submit_puts_one_json_message_on_the_interactive_lane(
    client: Client, bsettings: Settings, redis_url: str
) -> None:
    task_id = client.submit("I loved it", source="web", meta={"user": 7})

    interactive, bulk = _lanes(bsettings)
    assert lane_messages(redis_url, bulk) == []
    [msg] = lane_messages(redis_url, interactive)
    assert msg["content-type"] == "application/json"
    assert msg["headers"]["task"] == TASK_ANALYZE
    [item] = msg["items"]
    assert item["id"] == task_id
    assert item["text"] == "I loved it"
    assert item["source"] == "web"
    assert item["meta"] == {"user": 7}
    assert abs(item["submitted_at"] - time.time()) < 60
    # The worker side accepts exactly what we sent.
    assert item_from_wire(item, bsettings).id == task_id
    # Texts are not copied into the headers.
    assert "I loved it" not in msg["headers"]["argsrepr"]


def test_submit_keeps_a_caller_id(client: Client, bsettings: Settings, redis_url: str) -> None:
    assert client.submit("fine", id="order-42") == "order-42"
    [msg] = lane_messages(redis_url, _lanes(bsettings)[0])
    assert msg["items"][0]["id"] == "order-42"


BAD_TEXTS = [
    ("", "empty"),
    ("   \n\t", "whitespace"),
    ("x" * 101, "over the limit of 100"),
    (b"caf\xe9", "not valid UTF-8"),
    ("bad \ud800 surrogate", "not valid Unicode"),
    (42, "must be a string"),
    ("nul\x00byte", "NUL"),
]


@pytest.mark.parametrize(("text", "reason"), BAD_TEXTS)
def test_submit_refuses_bad_text_with_a_reason(
    redis_url: str, sqlite_url: str, text: object, reason: str
) -> None:
    settings = broker_settings(redis_url, sqlite_url, max_text_chars=100)
    with Client(settings) as c:
        with pytest.raises(InvalidInput, match=reason):
            c.submit(text)  # type: ignore[arg-type]
        assert c.queue_length() == 0


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"meta": [1, 2]}, "meta must be a JSON object"),
        ({"meta": {"k": "x" * 300}}, "meta is over the limit of 200 bytes"),
        ({"meta": {"k": float("nan")}}, "not JSON-serialisable"),
        ({"meta": {"k": object()}}, "not JSON-serialisable"),
        ({"id": ""}, "id is empty"),
        ({"id": "a" * 200}, "id is 200 characters"),
        ({"id": "a\nb"}, "control characters"),
        ({"source": 5}, "source must be a string"),
    ],
)
def test_submit_refuses_bad_fields(
    redis_url: str, sqlite_url: str, kwargs: dict, reason: str
) -> None:
    settings = broker_settings(redis_url, sqlite_url, max_meta_bytes=200)
    with Client(settings) as c, pytest.raises(InvalidInput, match=reason):
        c.submit("ok", **kwargs)


def test_submit_many_sends_ceil_n_over_chunk_messages_on_the_bulk_lane(
    redis_url: str, sqlite_url: str
) -> None:
    settings = broker_settings(redis_url, sqlite_url, bulk_chunk_size=128)
    texts = [f"text number {i}" for i in range(1000)]
    with Client(settings) as c:
        report = c.submit_many(texts, source="bulk-test")
        assert c.queue_length("bulk") == math.ceil(1000 / 128)
        assert c.queue_length("interactive") == 0

    assert isinstance(report, SubmitReport)
    assert (report.accepted, report.rejected, report.messages) == (1000, 0, 8)
    messages = lane_messages(redis_url, f"{settings.queue}.bulk")
    assert len(messages) == 8
    assert [len(m["items"]) for m in messages] == [128] * 7 + [1000 - 7 * 128]
    items = [it for m in messages for it in m["items"]]
    assert [it["text"] for it in items] == texts
    assert [it["id"] for it in items] == report.ids
    assert {it["source"] for it in items} == {"bulk-test"}


def test_submit_many_chunk_size_argument_wins(client: Client) -> None:
    report = client.submit_many(["a", "b", "c", "d", "e"], chunk_size=2)
    assert report.messages == 3
    assert client.queue_length() == 3


def test_submit_many_reports_bad_items_and_enqueues_the_rest(
    redis_url: str, sqlite_url: str
) -> None:
    settings = broker_settings(redis_url, sqlite_url, max_text_chars=50, max_meta_bytes=100)
    items: list = [
        "good one",                                        # 0
        "",                                                # 1 empty
        {"text": "good two", "id": "k2", "meta": {"a": 1}},  # 2
        {"text": "   ", "id": "k3"},                       # 3 whitespace
        "y" * 51,                                          # 4 oversized
        b"\xff\xfe",                                       # 5 undecodable
        "lone \udc80",                                     # 6 surrogate
        3.14,                                              # 7 not a string
        {"text": "ok", "meta": "nope"},                    # 8 bad meta
        {"text": "ok", "meta": {"x": "z" * 200}},          # 9 oversized meta
        {"text": "again", "id": "k2"},                     # 10 duplicate id
        {"txt": "typo"},                                   # 11 unknown field
        {"id": "k12"},                                     # 12 missing text
        {"text": "good three", "source": "own"},           # 13
    ]
    with Client(settings) as c:
        report = c.submit_many(items, source="default-src")

    reasons = {e.index: e.reason for e in report.errors}
    assert all(isinstance(e, ItemError) for e in report.errors)
    assert sorted(reasons) == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    expected = {
        1: "empty", 3: "whitespace", 4: "over the limit of 50", 5: "UTF-8",
        6: "Unicode", 7: "must be a string or an object", 8: "meta must be a JSON object",
        9: "meta is over the limit", 10: "duplicate id 'k2' (first at 2)",
        11: "unknown field", 12: "missing 'text'",
    }
    for index, fragment in expected.items():
        assert fragment in reasons[index], (index, reasons[index])
    ids = {e.index: e.id for e in report.errors}
    assert ids[3] == "k3" and ids[10] == "k2" and ids[12] == "k12"

    assert report.accepted == 3 and report.rejected == 11
    [msg] = lane_messages(redis_url, f"{settings.queue}.bulk")
    sent = msg["items"]
    assert [it["text"] for it in sent] == ["good one", "good two", "good three"]
    assert [it["id"] for it in sent] == report.ids
    assert sent[1]["id"] == "k2" and sent[1]["meta"] == {"a": 1}
    assert [it["source"] for it in sent] == ["default-src", "default-src", "own"]


def test_submit_many_with_nothing_valid_sends_nothing(client: Client) -> None:
    report = client.submit_many(["", None])  # type: ignore[list-item]
    assert report.accepted == 0 and report.rejected == 2 and report.messages == 0
    assert client.queue_length() == 0


def test_queue_length_counts_both_lanes_and_priority_lists(
    client: Client, bsettings: Settings, redis_url: str
) -> None:
    client.submit("one")
    client.submit_many(["a", "b", "c"], chunk_size=1)
    assert client.queue_length("interactive") == 1
    assert client.queue_length("bulk") == 3
    r = redis.Redis.from_url(redis_url)
    try:
        r.lpush(f"{bsettings.queue}.bulk\x06\x163", "x", "y")
    finally:
        r.close()
    assert client.queue_length("bulk") == 5
    assert client.queue_length() == 6
    with pytest.raises(InvalidInput, match="unknown lane"):
        client.queue_length("nope")


def test_threads_share_one_lazily_built_redis_client_and_store(
    bsettings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API asks for the queue length from a thread pool. Two threads that built a
    Redis client each left one unreferenced, and its finaliser closed the connection
    the other thread was reading ("I/O operation on closed file")."""
    from producer import client as client_module

    built: list[object] = []
    real = client_module.redis_client

    def slow_redis_client(settings: Settings) -> object:
        time.sleep(0.05)  # widen the window a race needs
        made = real(settings)
        built.append(made)
        return made

    monkeypatch.setattr(client_module, "redis_client", slow_redis_client)
    with Client(bsettings) as c:
        start = threading.Barrier(8)
        errors: list[BaseException] = []
        seen: list[tuple[object, object]] = []

        def ask() -> None:
            start.wait()
            try:
                assert c.queue_length() >= 0
                seen.append((c._redis_client(), c.store))
            except BaseException as exc:  # noqa: BLE001 - collected for the assert below
                errors.append(exc)

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert len(built) == 1
        assert len({id(r) for r, _ in seen}) == 1 and len({id(st) for _, st in seen}) == 1


def test_queue_length_is_zero_for_memory_broker(sqlite_url: str) -> None:
    with Client(Settings(broker_url="memory://", database_url=sqlite_url)) as c:
        assert c.queue_length() == 0


def test_unreachable_broker_is_one_clear_error(sqlite_url: str) -> None:
    settings = Settings(broker_url="redis://127.0.0.1:1/0", database_url=sqlite_url)
    with Client(settings) as c:
        with pytest.raises(BrokerUnavailable, match=r"cannot reach Redis at redis://127\.0\.0\.1:1/0"):
            c.submit("hello")
        with pytest.raises(BrokerUnavailable, match="BERTSTREAM_BROKER_URL"):
            c.submit_many(["a", "b"])
        with pytest.raises(BrokerUnavailable):
            c.queue_length()


@pytest.mark.parametrize("url", ["redis://127.0.0.1:notaport/0", "redis://127.0.0.1:99999/0"])
def test_a_broker_url_that_does_not_parse_is_a_config_error(sqlite_url: str, url: str) -> None:
    """kombu (publishing) and redis-py (the queue length) parse the URL only when they
    connect: a port that is no port was a ValueError from deep inside them (exit 1 with a
    traceback); it is a ConfigError naming the URL and the setting (exit 2)."""
    with Client(Settings(broker_url=url, database_url=sqlite_url)) as c:
        with pytest.raises(ConfigError, match="cannot be parsed.*BERTSTREAM_BROKER_URL"):
            c.submit("hello")
        with pytest.raises(ConfigError, match="cannot be parsed"):
            c.submit_many(["a", "b"])
        with pytest.raises(ConfigError, match="cannot be parsed"):
            c.queue_length()


def test_a_missing_sqlite_file_is_read_as_empty_and_not_created(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer-only host with no BERTSTREAM_DATABASE_URL (the default: ./bertstream.db):
    the caller-id check and the reads found no rows, as they should, but opening the
    database created an empty file in the current directory."""
    monkeypatch.chdir(tmp_path)
    settings = broker_settings(redis_url, Settings().database_url)  # the default URL
    assert settings.database_url == "sqlite:///bertstream.db"
    with Client(settings) as c:
        assert c.submit("hello", id="k1") == "k1"  # checks the caller id first
        report = c.submit_many([{"text": "hi", "id": "k2"}])
        assert report.ids == ["k2"] and not report.errors
        assert c.get("k1") is None and c.query() == [] and c.count() == 0
        assert not c.has_results_table()
    assert list(tmp_path.iterdir()) == []

    # once a worker created it, the same client reads it: a conflict is found
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    store.upsert([record("k1", text="another text")])
    store.close()
    with Client(settings) as c:
        with pytest.raises(IdConflict):
            c.submit("hello", id="k1")


# -- results (each test runs on SQLite and PostgreSQL) -------------------


@pytest.fixture
def rclient(store: ResultStore, redis_url: str, db_url: str) -> Iterator[Client]:
    with Client(broker_settings(redis_url, db_url)) as c:
        yield c


def test_get_and_get_many(rclient: Client, store: ResultStore) -> None:
    store.upsert([record("r1", label="positive"), record("r2", status="failed", error="boom")])
    got = rclient.get("r1")
    assert got is not None and got.label == "positive" and got.scores is not None
    assert rclient.get("missing") is None
    many = rclient.get_many(["r1", "r2", "nope"])
    assert set(many) == {"r1", "r2"}
    assert many["r2"].status == "failed" and many["r2"].error == "boom"


def test_wait_returns_every_result_once_written(rclient: Client, store: ResultStore) -> None:
    store.upsert([record("w1")])
    outcome: dict = {}

    def waiter() -> None:
        outcome["found"] = rclient.wait(["w1", "w2"], timeout=20, poll_interval=0.01)

    thread = threading.Thread(target=waiter)
    thread.start()
    store.upsert([record("w2", label="negative", score=0.7)])
    thread.join(timeout=25)
    assert not thread.is_alive()
    found = outcome["found"]
    assert list(found) == ["w1", "w2"]
    assert found["w2"].label == "negative"


def test_wait_many_ids_uses_batched_queries(rclient: Client, store: ResultStore) -> None:
    ids = [f"b{i}" for i in range(1200)]
    store.upsert([record(i) for i in ids])
    found = rclient.wait(ids, timeout=10)
    assert list(found) == ids


def test_wait_times_out_with_the_missing_ids(rclient: Client, store: ResultStore) -> None:
    store.upsert([record("t1")])
    started = time.monotonic()
    with pytest.raises(ResultTimeout) as info:
        rclient.wait(["t1", "t2", "t3"], timeout=0.3, poll_interval=0.05)
    assert info.value.missing == ["t2", "t3"]
    assert 0.25 <= time.monotonic() - started < 5


def test_query_and_aggregate_pass_through(rclient: Client, store: ResultStore) -> None:
    store.upsert([
        record("q1", source="a", label="positive", score=0.8),
        record("q2", source="a", label="negative", score=0.6),
        record("q3", source="b", label="positive", score=1.0),
        record("q4", source="b", status="failed", error="bad"),
    ])
    assert {r.id for r in rclient.query(source="a")} == {"q1", "q2"}
    assert {r.id for r in rclient.query(label="positive")} == {"q1", "q3"}
    assert [r.id for r in rclient.query(status="failed")] == ["q4"]
    assert len(rclient.query(limit=2)) == 2
    by_label = {row["label"]: row for row in rclient.aggregate(by="label", status="done")}
    assert by_label["positive"]["count"] == 2
    assert by_label["positive"]["mean_score"] == pytest.approx(0.9)
    with pytest.raises(InvalidInput):
        rclient.aggregate(by="text")


def test_reading_before_any_worker_created_the_table(redis_url: str, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / f'{uuid.uuid4().hex}.db'}"
    with Client(broker_settings(redis_url, url)) as c:
        assert c.get("x") is None
        assert c.query() == []
        assert c.aggregate() == []
        with pytest.raises(ResultTimeout):
            c.wait(["x"], timeout=0.1)
    # The client only reads: it created no table.
    store = ResultStore.from_url(url)
    try:
        assert not sa.inspect(store.engine).has_table("bertstream_results")
    finally:
        store.close()


def test_close_is_idempotent(bsettings: Settings) -> None:
    c = Client(bsettings)
    c.submit("hi")
    assert c.queue_length() == 1
    c.close()
    c.close()


def test_caller_ids_stored_with_another_text_are_conflicts(
    rclient: Client, store: ResultStore, redis_url: str
) -> None:
    from contract.errors import IdConflict

    store.upsert([record("kept", text="the original"), record("same", text="same text")])
    with pytest.raises(IdConflict, match="'kept' is already stored with a different text"):
        rclient.submit("a new text", id="kept")
    assert rclient.submit("the original", id="kept") == "kept"  # the same text is fine

    report = rclient.submit_many([{"text": "changed", "id": "kept"},
                                  {"text": "same text", "id": "same"},
                                  {"text": "fresh", "id": "new"}, "no id given"])
    assert [(e.index, e.id) for e in report.errors] == [(0, "kept")]
    assert "different text" in report.errors[0].reason
    assert report.ids[:2] == ["same", "new"] and len(report.ids) == 3
    sent = [it["id"] for msg in lane_messages(redis_url, f"{rclient.settings.queue}.bulk")
            for it in msg["items"]]
    assert sent == report.ids


def test_a_failed_task_sent_again_is_waited_for_anew(rclient: Client,
                                                     store: ResultStore) -> None:
    """The same id and text after a ``failed`` or ``expired`` row is a retry: ``wait``
    waits for the new attempt instead of returning the old row at once (it used to, so a
    caller that retried read its old failure back as the retry's outcome). A done row,
    or a failed row nobody retried, is returned as before."""
    store.upsert([record("f1", text="text f", status="failed", label=None, score=None,
                         error="boom"),
                  record("e1", text="text e", status="expired", label=None, score=None),
                  record("d1", text="text d"),
                  record("left", text="text l", status="failed", label=None, score=None)])
    assert rclient.submit("text f", id="f1") == "f1"
    report = rclient.submit_many([{"text": "text e", "id": "e1"},
                                  {"text": "text d", "id": "d1"}])
    assert report.ids == ["e1", "d1"] and not report.errors
    assert rclient.wait(["d1", "left"], timeout=1)["left"].status == "failed"
    with pytest.raises(ResultTimeout) as waited:
        rclient.wait(["f1", "e1", "d1"], timeout=0.5)
    assert sorted(waited.value.missing) == ["e1", "f1"]

    def attempt_later() -> None:
        time.sleep(0.3)
        store.upsert([record("f1", text="text f", status="failed", label=None, score=None,
                             error="boom again"),
                      record("e1", text="text e")])

    writer = threading.Thread(target=attempt_later)
    writer.start()
    try:
        found = rclient.wait(["f1", "e1"], timeout=20)
    finally:
        writer.join()
    assert (found["f1"].status, found["f1"].attempts, found["f1"].error) == (
        "failed", 2, "boom again")
    assert (found["e1"].status, found["e1"].attempts) == ("done", 2)
