"""Bounds of the read side, on SQLite and PostgreSQL: a time bound whose UTC is out of
range is bad input (422, exit 2), never a 500 or a traceback; ``/v1/stats`` keeps the
values of ``by`` with the most rows and sums the rest, however many sources there are."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from contract.errors import InvalidInput
from contract.queries import MAX_STATS_LIMIT, STATS_LIMIT, Filters, stats, top_stats
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from producer.cli import main

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 1, 1, 10, tzinfo=UTC)
#: Valid ISO 8601 times whose UTC is before year 1 or after year 9999.
TOO_EARLY = "0001-01-01T00:00:00+05:00"
TOO_LATE = "9999-12-31T23:00:00-05:00"


def _rec(task_id: str, *, source: str | None = "s", label: str = "positive",
         score: float = 0.9, hours: float = 0, status: str = "done") -> ResultRecord:
    done = status == "done"
    return ResultRecord(id=task_id, text_sha256="0" * 64, text_chars=4, model="m",
                        status=status, finished_at=T0 + dt.timedelta(hours=hours),
                        label=label if done else None, score=score if done else None,
                        scores={label: score} if done else None, source=source, text="text",
                        error=None if done else "boom")


def _approx(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``groups`` with each mean compared to rounding: the database sums scores in the
    order its plan reads them, which two queries need not share."""
    return [{k: pytest.approx(v) if isinstance(v, float) else v for k, v in g.items()}
            for g in groups]


def test_a_time_bound_out_of_range_in_utc_is_invalid_input() -> None:
    plus5, minus5 = dt.timezone(dt.timedelta(hours=5)), dt.timezone(dt.timedelta(hours=-5))
    for bound in (dt.datetime(1, 1, 1, tzinfo=plus5), dt.datetime(9999, 12, 31, 23, tzinfo=minus5)):
        for name in ("since", "until"):
            with pytest.raises(InvalidInput, match="out of range"):
                Filters(**{name: bound})
    # The edges themselves are times like any other.
    assert Filters(since=dt.datetime(1, 1, 1, 5, tzinfo=plus5)).since == dt.datetime(
        1, 1, 1, tzinfo=UTC)
    assert Filters(until=dt.datetime(9999, 12, 31, 18, tzinfo=minus5)).until == dt.datetime(
        9999, 12, 31, 23, tzinfo=UTC)


def test_the_api_answers_an_out_of_range_time_bound_with_a_422(
        settings: Settings, store: ResultStore, api_factory: Any) -> None:
    store.upsert([_rec("r1"), _rec("r2", source="t")])
    api = api_factory(settings)
    routes = [("/v1/results", {}), ("/v1/results", {"format": "csv"}),
              ("/v1/results", {"format": "jsonl"}), ("/v1/stats", {}),
              ("/v1/stats", {"bucket": "1d", "by": "source"}), ("/v1/search", {"q": "t"}),
              ("/v1/compare", {"a": "m", "b": "n"})]
    with httpx.Client(base_url=api.url, timeout=10) as http:
        for route, params in routes:
            for name, value in (("since", TOO_EARLY), ("until", TOO_LATE)):
                r = http.get(route, params={**params, name: value})
                assert r.status_code == 422, (route, params, name, r.text)
                error = r.json()["error"]
                assert error["code"] == "invalid_request", r.text
                assert f"query.{name}" in error["message"] and "out of range" in error["message"]
            # an offset in range is read as before
            r = http.get(route, params={**params, "since": "2026-01-01T14:00:00+05:00"})
            assert r.status_code == 200, (route, r.text)
        assert "status=\"500\"" not in http.get("/metrics").text
    assert "Traceback" not in api.log_path.read_text()


def test_the_cli_refuses_an_out_of_range_time_bound_in_one_line(
        sqlite_url: str, redis_url: str, tmp_path: Path) -> None:
    env = {"BERTSTREAM_DATABASE_URL": sqlite_url, "BERTSTREAM_BROKER_URL": redis_url}
    for args in (["results", "--since", TOO_EARLY], ["results", "--until", TOO_LATE],
                 ["results", "--aggregate", "label", "--since", TOO_EARLY],
                 ["rescore", "--model", "m2", "--since", TOO_EARLY],
                 ["compare", "--model", "a", "--model", "b", "--until", TOO_LATE],
                 ["db", "delete", "--since", TOO_EARLY],
                 ["report", "--out", str(tmp_path / "r.png"), "--until", TOO_LATE]):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 2, (args, result.output)
        option = "--since" if "--since" in args else "--until"
        assert result.output.startswith(f"error: {option}: time "), (args, result.output)
        assert "out of range" in result.output and result.output.count("\n") == 1, result.output


def _sources(store: ResultStore, n: int) -> None:
    """Source ``sK`` holds K + 1 rows (scores K/100, every other one in the second hour);
    one row has no source and one failed row (no score) belongs to ``s0``."""
    rows = [_rec(f"{k}-{i}", source=f"s{k:03d}", score=k / 1000, hours=i % 2)
            for k in range(n) for i in range(k + 1)]
    rows += [_rec("nosource", source=None, score=0.5), _rec("failed", source="s000",
                                                           status="failed")]
    store.upsert(rows)


def test_stats_keep_the_top_values_and_sum_the_others(store: ResultStore) -> None:
    _sources(store, 12)
    for bucket in (None, "1h"):
        full = stats(store, Filters(), by="source", bucket=bucket)
        # Up to the limit, what stats() gives; no `other`.
        for limit in (13, STATS_LIMIT):
            got = top_stats(store, Filters(), by="source", bucket=bucket, limit=limit)
            assert got.groups == _approx(full) and got.other == []
        # Over it: the values with the most rows, each group as before, the rest summed.
        got = top_stats(store, Filters(), by="source", bucket=bucket, limit=3)
        assert {g["source"] for g in got.groups} == {"s011", "s010", "s009"}
        assert got.groups == _approx([g for g in full if g["source"] in ("s009", "s010", "s011")])
        rest = [g for g in full if g["source"] not in ("s009", "s010", "s011")]
        for other in got.other:
            mine = [g for g in rest if g.get("bucket") == other.get("bucket")]
            count = sum(g["count"] for g in mine)
            assert other["values"] == len(mine) and other["count"] == count
        assert sum(o["count"] for o in got.other) == sum(g["count"] for g in rest) == 47
    total = top_stats(store, Filters(), by="source", limit=2).other
    # the mean of the scored rows summed: s000's failed row has none
    scores = [k / 1000 for k in range(10) for _ in range(k + 1)] + [0.5]
    assert total == [{"values": 11, "count": 57, "mean_score": pytest.approx(
        sum(scores) / len(scores))}]
    with pytest.raises(InvalidInput):
        top_stats(store, Filters(), by="source", limit=0)


def test_the_api_bounds_the_groups_of_stats(settings: Settings, store: ResultStore,
                                            api_factory: Any) -> None:
    n = STATS_LIMIT + 20
    store.upsert([_rec(f"r{k}", source=f"s{k:04d}", hours=k % 3) for k in range(n)]
                 + [_rec(f"x{k}", source="s0000", label="negative") for k in range(5)])
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=10) as http:
        def get(**params: Any) -> dict[str, Any]:
            r = http.get("/v1/stats", params=params)
            assert r.status_code == 200, r.text
            return dict(r.json())

        body = get(by="source")
        assert len(body["groups"]) == STATS_LIMIT and body["groups"][0]["source"] == "s0000"
        assert body["groups"][0]["count"] == 6
        assert body["other"] == [{"values": 20, "count": 20, "mean_score": pytest.approx(0.9)}]
        assert sum(g["count"] for g in body["groups"]) + 20 == n + 5
        bucketed = get(by="source", bucket="1h", since="2026-01-01T00:00:00Z", limit=10)
        assert len({g["source"] for g in bucketed["groups"]}) == 10
        assert [o["bucket"] for o in bucketed["other"]] == [
            "2026-01-01T10:00:00Z", "2026-01-01T11:00:00Z", "2026-01-01T12:00:00Z"]
        assert sum(o["values"] for o in bucketed["other"]) == n - 10
        # Small answers are as they were: every value, no `other`.
        small = get(by="label")
        assert small == {"by": "label", "bucket": None,
                         "groups": _approx(stats(store, Filters(), by="label"))}
        assert get(by="source", limit=MAX_STATS_LIMIT)["groups"] == _approx(
            stats(store, Filters(), by="source"))
        for bad in (0, MAX_STATS_LIMIT + 1):
            r = http.get("/v1/stats", params={"by": "source", "limit": bad})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
