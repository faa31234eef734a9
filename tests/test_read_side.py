"""The read side agrees on SQLite and PostgreSQL: time bounds, id prefixes, case folding,
model comparison, and the API's CSV, empty filters and bucket cap."""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from api.dashboard import search
from contract.errors import ConfigError
from contract.queries import MAX_BUCKETS, Filters, compare, page, stats
from contract.results import ResultRecord, ResultStore, results
from contract.settings import Settings
from producer.cli import main
from producer.formatting import unguard_id

UTC = dt.timezone.utc
PLUS2 = dt.timezone(dt.timedelta(hours=2))
T0 = dt.datetime(2026, 1, 1, 10, tzinfo=UTC)


def _rec(task_id: str, **kw: Any) -> ResultRecord:
    base: dict[str, Any] = dict(
        id=task_id, text_sha256="0" * 64, text_chars=4, model="m", status="done",
        finished_at=T0, label="positive", score=0.9,
        scores={"negative": 0.1, "positive": 0.9}, source="s1", text="text")
    base.update(kw)
    return ResultRecord(**base)


def _seed_hours(store: ResultStore) -> None:
    """Rows finished at 10:00, 11:00 and 12:00 UTC."""
    store.upsert([_rec(f"t{h}", finished_at=T0 + dt.timedelta(hours=h)) for h in range(3)])


def _check_bounds(store: ResultStore) -> None:
    naive = dt.datetime(2026, 1, 1, 11)  # 11:00 UTC
    offset = dt.datetime(2026, 1, 1, 13, tzinfo=PLUS2)  # 11:00 UTC too
    until = dt.datetime(2026, 1, 1, 14, tzinfo=PLUS2)  # 12:00 UTC, exclusive
    for since in (naive, offset):
        assert store.count(since=since) == 2, since
        assert {r.id for r in store.query(since=since)} == {"t1", "t2"}
        assert store.count(since=since, until=until) == 1
        got = page(store, Filters(since=since, until=until), newest_first=False).records
        assert [r.id for r in got] == ["t1"], since
        assert sum(g["count"] for g in stats(store, Filters(since=since))) == 2
    assert Filters(since=naive, until=until) == Filters(
        since=dt.datetime(2026, 1, 1, 11, tzinfo=UTC), until=dt.datetime(2026, 1, 1, 12, tzinfo=UTC))


def test_time_bounds_are_utc_with_or_without_an_offset(store: ResultStore) -> None:
    _seed_hours(store)
    _check_bounds(store)


def test_time_bounds_are_utc_whatever_the_session_timezone(pg_url: str) -> None:
    url = pg_url + ("&" if "?" in pg_url else "?") + "options=-c%20TimeZone%3DAsia/Shanghai"
    store = ResultStore.from_url(url)
    try:
        store.create_schema()
        with store.engine.connect() as conn:
            assert conn.execute(sa.text("SHOW TimeZone")).scalar_one() == "Asia/Shanghai"
        _seed_hours(store)
        _check_bounds(store)
    finally:
        store.close()


def test_a_port_that_is_no_number_is_a_config_error_with_the_password_masked() -> None:
    url = "postgresql://u:secret@127.0.0.1:abc/test"
    with pytest.raises(ConfigError) as info:
        ResultStore.from_url(url)
    assert "secret" not in str(info.value) and "u:***@" in str(info.value)
    result = CliRunner().invoke(main, ["results"], env={"BERTSTREAM_DATABASE_URL": url})
    assert result.exit_code == 2, result.output
    assert "secret" not in result.output and "Traceback" not in result.output


def test_compare_counts_a_label_b_lacks_as_a_full_move(store: ResultStore) -> None:
    later = T0 + dt.timedelta(minutes=1)
    store.upsert([
        _rec("x1", model="A", score=0.9), _rec("x2", model="A", score=0.8),
        _rec("x1", model="B", label="joy", score=0.7, scores={"joy": 0.7, "anger": 0.3},
             finished_at=later),
        _rec("x2", model="B", score=0.7, scores={"positive": 0.7, "negative": 0.3},
             finished_at=later),
    ])
    result = compare(store, "A", "B", Filters())
    assert result.texts == 2 and result.agree == 1
    assert result.mean_change == pytest.approx(((0.0 - 0.9) + (0.7 - 0.8)) / 2)
    assert [r["id"] for r in result.largest] == ["x1", "x2"]
    assert result.largest[0]["change"] == pytest.approx(-0.9)


def test_id_prefix_at_the_edges_of_unicode(store: ResultStore) -> None:
    ids = ["k\ud7ff", "k\ud7ffx", "k\ue000", "z\U0010ffff", "z\U0010ffffa", "z\U0010fffe"]
    store.upsert([_rec(i) for i in ids])

    def found(prefix: str) -> list[str]:
        return [r.id for r in search(store, Filters(), task_id=prefix)]

    # The successor of U+D7FF is U+E000 (no text holds a surrogate).
    assert found("k\ud7ff") == ["k\ud7ff", "k\ud7ffx"]
    # Nothing sorts above U+10FFFF: no upper bound.
    assert found("z\U0010ffff") == ["z\U0010ffff", "z\U0010ffffa"]
    assert found("z\U0010fffe") == ["z\U0010fffe"]


def test_id_prefix_under_an_icu_collation(pg_url: str) -> None:
    store = ResultStore.from_url(pg_url)
    try:
        store.create_schema()
        with store.engine.begin() as conn:
            icu = conn.execute(sa.text(
                "SELECT collname FROM pg_collation WHERE collprovider = 'i'"
                " ORDER BY collname <> 'en-US-x-icu', collname LIMIT 1")).scalar_one_or_none()
            if icu is None:
                pytest.skip("this PostgreSQL server has no ICU collations")
            kind = conn.execute(sa.text(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = to_regclass(:t) AND attname = 'id'"),
                {"t": results.name}).scalar_one()
            conn.execute(sa.text(f'ALTER TABLE {results.name} ALTER COLUMN id TYPE {kind} '
                                 f'COLLATE "{icu}"'))
        store.upsert([_rec(i) for i in ("review-8", "review-9", "review-90", "review-:")])
        assert [r.id for r in search(store, Filters(), task_id="review-9")] == [
            "review-9", "review-90"]
        assert [r.id for r in search(store, Filters(), task_id="review-")] == [
            "review-8", "review-9", "review-90", "review-:"]  # code point order
    finally:
        store.close()


def test_case_insensitive_search_folds_every_script(store: ResultStore) -> None:
    store.upsert([_rec("u1", text="Großer ÄRGER im Café"), _rec("u2", text="ΣΟΦΊΑ"),
                  _rec("u3", text="plain ascii")])

    def found(q: str) -> list[str]:
        return [r.id for r in search(store, Filters(), q=q)]

    assert found("ärger") == ["u1"] and found("CAFÉ") == ["u1"] and found("σοφ") == ["u2"]
    assert found("ASCII") == ["u3"]


def test_api_csv_empty_filters_offsets_and_bucket_cap(settings: Settings, store: ResultStore,
                                                      api_factory: Any) -> None:
    store.upsert([
        _rec("c1", text="=HYPERLINK(\"http://x\")", source="+web", finished_at=T0),
        _rec("c2", text="\tindented", source="@news", label="-odd", finished_at=T0
             + dt.timedelta(hours=1)),
        _rec("c3", text="-1", meta={"k": "=x"}, finished_at=T0 + dt.timedelta(hours=2)),
    ])
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=10) as http:
        def ids(**params: Any) -> list[str]:
            r = http.get("/v1/results", params={"order": "oldest", **params})
            assert r.status_code == 200, r.text
            return [row["id"] for row in r.json()["items"]]

        # CSV: text cells that a spreadsheet would run get a leading quote; numbers do not.
        r = http.get("/v1/results", params={"format": "csv", "order": "oldest"})
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert [(c["text"], c["source"], c["label"]) for c in rows] == [
            ("'=HYPERLINK(\"http://x\")", "'+web", "positive"),
            ("'\tindented", "'@news", "'-odd"), ("'-1", "s1", "positive")]
        assert rows[2]["meta"] == '{"k": "=x"}' and rows[0]["score"] == "0.9"

        # An empty filter is no filter (HTML forms send empty fields).
        assert ids(source="", label="", model="", lang="", status="") == ["c1", "c2", "c3"]

        # An offset is read as such on both backends; a naive time is UTC.
        assert ids(since="2026-01-01T13:00:00+02:00") == ["c2", "c3"]
        assert ids(since="2026-01-01T11:00:00", until="2026-01-01T14:00:00+02:00") == ["c2"]

        # The bucket cap: the range in buckets, a missing bound read from the rows.
        assert http.get("/v1/stats", params={"bucket": "1m"}).status_code == 200
        r = http.get("/v1/stats", params={"bucket": "1m", "since": "2000-01-01T00:00:00Z"})
        assert r.status_code == 422 and f"{MAX_BUCKETS:,}" in r.text, r.text
        store.upsert([_rec("old", finished_at=dt.datetime(2020, 1, 1, tzinfo=UTC))])
        assert http.get("/v1/stats", params={"bucket": "1h"}).status_code == 422
        assert http.get("/v1/stats", params={"bucket": "1d"}).status_code == 200
        r = http.get("/v1/stats", params={"bucket": "1h", "since": "2026-01-01T00:00:00Z",
                                          "until": "2026-01-02T00:00:00Z"})
        assert r.status_code == 200 and sum(g["count"] for g in r.json()["groups"]) == 3
        # since alone: the span runs to now, read without a query
        r = http.get("/v1/stats", params={"bucket": "1m", "since": "2026-01-01T00:00:00Z"})
        assert r.status_code == 422, r.text


def test_api_csv_guards_ids_reversibly_and_keeps_other_identifiers(settings: Settings,
                                                                   store: ResultStore,
                                                                   api_factory: Any) -> None:
    """An id that starts with ``-``, ``@``, ``+`` or ``=`` is exported with a leading quote
    (any submitter chooses ids), which ``unguard_id`` takes off to send it back; a model
    or a worker (the operator's names) is exported as stored."""
    ids = ["-100123", "@user1", "+44 20", "=x"]
    store.upsert([_rec(task_id, model="@m", worker="-w@host", text=task_id, source=task_id,
                       finished_at=T0 + dt.timedelta(minutes=n))
                  for n, task_id in enumerate(ids)])
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=10) as http:
        r = http.get("/v1/results", params={"format": "csv", "order": "oldest"})
        assert r.status_code == 200, r.text
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert [c["id"] for c in rows] == ["'" + i for i in ids]
        assert {(c["model"], c["worker"]) for c in rows} == {("@m", "-w@host")}
        assert [(c["text"], c["source"]) for c in rows] == [("'" + i, "'" + i) for i in ids]
        for row in rows:  # each exported id reads its row back, the model its rows
            got = http.get(f"/v1/tasks/{unguard_id(row['id'])}")
            assert got.status_code == 200 and got.json()["id"] == unguard_id(row["id"]), got.text
        again = http.get("/v1/results", params={"model": rows[0]["model"], "limit": 10})
        assert len(again.json()["items"]) == len(ids), again.text
