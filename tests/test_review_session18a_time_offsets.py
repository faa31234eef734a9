"""A time bound with a ``+`` offset typed into a URL reads as the time it names.

In a query string ``+`` stands for a space, so ``since=2026-12-05T08:00+08:00`` typed
into curl or a browser reached the API as ``2026-12-05T08:00 08:00``: a 422 saying
"unexpected extra characters", though the README says a bound with an offset is
converted to UTC. A space where an offset's sign goes can only be that ``+``.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

import httpx

from contract.results import ResultRecord, ResultStore
from contract.settings import Settings

UTC = dt.timezone.utc


def _row(task_id: str, finished: dt.datetime) -> ResultRecord:
    return ResultRecord(id=task_id, text_sha256="a" * 64, text_chars=4, model="m",
                        status="done", label="positive", score=0.9, source="web",
                        scores={"positive": 0.9, "negative": 0.1}, finished_at=finished)


def test_a_plus_offset_sent_unencoded_is_read_as_that_offset(settings: Settings,
                                                             api_factory: Any) -> None:
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    store.upsert([_row("before", dt.datetime(2026, 12, 4, 23, 59, tzinfo=UTC)),
                  _row("at", dt.datetime(2026, 12, 5, 0, 0, tzinfo=UTC)),
                  _row("later", dt.datetime(2026, 12, 5, 9, 0, tzinfo=UTC))])
    store.close()
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        def ids(query: str) -> list[str]:
            r = http.get("/v1/results?order=oldest&" + query)
            assert r.status_code == 200, (query, r.text)
            return [row["id"] for row in r.json()["items"]]

        # 2026-12-05T08:00+08:00 is midnight UTC: "at" and "later", not "later" alone
        # (the naive reading) nor a 422.
        assert ids("since=2026-12-05T08:00%2B08:00") == ["at", "later"]
        assert ids("since=2026-12-05T08:00+08:00") == ["at", "later"]
        assert ids("since=2026-12-05 08:00:00.000+0800") == ["at", "later"]
        assert ids("until=2026-12-05T08:00+0800") == ["before"]
        stats = http.get("/v1/stats?by=label&since=2026-12-05T08:00+08:00"
                         "&until=2026-12-05T17:01+08:00").json()
        assert stats["groups"] == [{"label": "positive", "count": 2, "mean_score": 0.9}]
        # Anything else malformed is still refused.
        for bad in ("2026-12-05T08:00+08:00 08:00", "2026-12-05T08:00 8", "2026-12-05 08:00"
                    " 08:00 08:00"):
            r = http.get("/v1/results", params={"since": bad})
            assert r.status_code == 422, (bad, r.text)


def test_a_query_parameter_a_read_route_does_not_take_is_refused(settings: Settings,
                                                                  api_factory: Any) -> None:
    """``/v1/results?id=…`` (the CLI's ``--id``; ``/v1/search``'s ``id``), a misspelt
    filter (``labels=``) or another route's parameter was ignored: every row came back as
    though it matched. Now a 422 naming it and the parameters the route takes."""
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    store.upsert([_row("one", dt.datetime(2026, 12, 5, 0, 0, tzinfo=UTC)),
                  _row("two", dt.datetime(2026, 12, 5, 1, 0, tzinfo=UTC))])
    store.close()
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for route, params, name in (("/v1/results", {"id": "one"}, "id"),
                                    ("/v1/results", {"labels": "negative"}, "labels"),
                                    ("/v1/results", {"format": "csv", "q": "x"}, "q"),
                                    ("/v1/stats", {"by": "label", "sources": "web"}, "sources"),
                                    ("/v1/search", {"q": "x", "order": "oldest"}, "order"),
                                    ("/v1/compare", {"a": "m", "b": "n", "tops": 1}, "tops")):
            r = http.get(route, params=params)
            assert r.status_code == 422, (route, params, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_request", error
            assert f"unknown query parameter '{name}'" in error["message"], error
            assert f"{route} takes " in error["message"], error
        assert "/v1/search" in http.get("/v1/results", params={"id": "one"}).text
        # The parameters a route takes, empty ones (HTML forms) and a cache-buster pass.
        ok = http.get("/v1/results", params={"source": "", "label": "", "limit": 1, "_": 7})
        assert ok.status_code == 200 and len(ok.json()["items"]) == 1, ok.text
        found = http.get("/v1/search", params={"id": "on", "q": "", "scan": 10})
        assert [row["id"] for row in found.json()["items"]] == ["one"], found.text


def test_a_limit_given_with_an_export_is_refused(settings: Settings, api_factory: Any) -> None:
    """``/v1/results?format=csv&limit=10`` streamed every matching row (the export takes
    no limit) to a caller who asked for ten: now a 422 saying so, as a cursor is."""
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    store.upsert([_row(f"r{i}", dt.datetime(2026, 12, 5, i, 0, tzinfo=UTC)) for i in range(3)])
    store.close()
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for fmt in ("csv", "jsonl"):
            r = http.get("/v1/results", params={"format": fmt, "limit": 1})
            assert r.status_code == 422, (fmt, r.text[:300])
            assert "limit applies to format=json only" in r.json()["error"]["message"]
            every = http.get("/v1/results", params={"format": fmt})
            assert every.status_code == 200 and every.text.count("\n") == 3 + (fmt == "csv")
        page = http.get("/v1/results", params={"format": "json", "limit": 1}).json()
        assert len(page["items"]) == 1 and page["next_cursor"]
