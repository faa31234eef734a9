"""The dashboard's JSON routes and page over a real socket, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx

from contract.results import ResultRecord, ResultStore
from contract.settings import Settings


def _row(now: dt.datetime, i: int, text: str, *, source: str = "web", label: str = "positive",
         minutes_ago: float = 0.0) -> ResultRecord:
    return ResultRecord(id=f"doc-{i:03d}", text_sha256="a" * 64, text_chars=len(text), model="m",
                        status="done", label=label, score=0.75, source=source, text=text,
                        scores={label: 0.75},
                        finished_at=now - dt.timedelta(minutes=minutes_ago))


def _ids(body: dict[str, Any]) -> list[str]:
    return [row["id"] for row in body["items"]]


def test_live_figures_and_search(settings: Settings, store: ResultStore,
                                 api_factory: Any) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    store.upsert([
        _row(now, 1, "The room was SPOTLESS.", minutes_ago=0.1),
        _row(now, 2, "这家酒店的服务很好", source="weibo", minutes_ago=0.2),
        _row(now, 3, "100% sure_thing", label="negative", minutes_ago=3),
        _row(now, 4, "old spotless news", source="news", minutes_ago=40),
        _row(now, 10, "ten", minutes_ago=50),
        _row(now, 11, "eleven", minutes_ago=50),
    ])
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=10) as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script src="/static/app.js">' in page.text
        assert http.get("/static/app.js").status_code == 200
        assert http.get("/static/style.css").status_code == 200

        live = http.get("/v1/live", params={"window": 60}).json()
        assert live["queue_depth"] == {"interactive": 0, "bulk": 0}
        assert live["workers"] == [] and live["workers_alive"] == 0 and live["redis"] == "ok"
        assert live["finished"] == 2 and abs(live["per_s"] - 2 / 60) < 1e-9
        # The last 30 minutes per minute: rows 1-3, not the 40- and 50-minute-old ones.
        assert sum(p["count"] for p in live["per_minute"]) == 3
        assert http.get("/v1/live", params={"window": 0}).status_code == 422

        assert http.get("/v1/sources").json() == {"sources": ["news", "web", "weibo"]}
        assert http.get("/v1/sources", params={"limit": 2}).json() == {"sources": ["news", "web"]}

        def search(**params: Any) -> list[str]:
            r = http.get("/v1/search", params=params)
            assert r.status_code == 200, r.text
            return _ids(r.json())

        assert search() == ["doc-001", "doc-002", "doc-003", "doc-004", "doc-011", "doc-010"]
        assert search(q="spotless") == ["doc-001", "doc-004"]  # case-insensitive
        assert search(q="酒店") == ["doc-002"]
        assert search(q="%") == ["doc-003"] and search(q="_") == ["doc-003"]  # literal
        assert search(q="spotless", source="news") == ["doc-004"]
        assert search(q="spotless", since=(now - dt.timedelta(minutes=10)).isoformat()) == [
            "doc-001"]
        # The text search reads only the newest `scan` rows of the filter.
        assert search(q="spotless", scan=3) == ["doc-001"]
        assert search(id="doc-001") == ["doc-001"]
        assert search(id="doc-01") == ["doc-010", "doc-011"]  # a prefix, in id order
        assert search(id="doc-0", label="negative") == ["doc-003"]
        assert search(id="doc-0", q="spot") == ["doc-001", "doc-004"]
        assert search(id="nothing") == []
        # An id prefix reads at most the first `scan` ids, then applies the other filters.
        assert search(id="doc-", scan=2) == ["doc-001", "doc-002"]
        assert search(id="doc-", scan=2, label="negative") == []
        assert search(id="doc-", scan=3, label="negative") == ["doc-003"]
        assert search(label="negative") == ["doc-003"]
        assert http.get("/v1/search", params={"limit": 0}).status_code == 422
        # PostgreSQL text cannot hold NUL: a 422, not a 500.
        for path, params in (("/v1/search", {"q": "a\x00"}), ("/v1/search", {"id": "\x00"}),
                             ("/v1/stats", {"model": "m\x00"}), ("/v1/results", {"source": "\x00"})):
            assert http.get(path, params=params).status_code == 422, (path, params)
        assert http.get("/v1/search", params={"scan": 10**6}).status_code == 422
        # A re-score's row is work done too: the trend counts it, as `finished` does.
        rescored = _row(now, 1, "The room was SPOTLESS.", minutes_ago=0.05)
        rescored.model = "m2"
        store.upsert([rescored])
        live = http.get("/v1/live", params={"window": 60}).json()
        assert live["finished"] == 3 and sum(p["count"] for p in live["per_minute"]) == 4


def test_empty_store_and_tokens(settings: Settings, api_factory: Any) -> None:
    api = api_factory(settings.replace(api_tokens="s3cret"))
    with httpx.Client(base_url=api.url, timeout=10) as http:
        assert http.get("/").status_code == 200  # the page is public
        assert http.get("/static/app.js").status_code == 200
        for path in ("/v1/live", "/v1/search", "/v1/sources"):
            assert http.get(path).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        live = http.get("/v1/live", headers=auth).json()
        assert live["finished"] == 0 and live["per_minute"] == []
        assert http.get("/v1/search", headers=auth).json()["items"] == []
        assert http.get("/v1/sources", headers=auth).json() == {"sources": []}


def test_an_id_search_keeps_the_rules_of_the_other_views(store: ResultStore) -> None:
    """Searching by id applies every filter of /v1/results, ``lang`` included, and shows
    each task once, its latest row, unless a model is named."""
    from api.dashboard import search
    from contract.queries import Filters

    now = dt.datetime.now(dt.timezone.utc)
    first = _row(now, 1, "The room was spotless.", minutes_ago=2)
    rescored = _row(now, 1, "The room was spotless.", minutes_ago=1)
    rescored.model = "m2"
    chinese = _row(now, 2, "房间很干净")
    first.lang, rescored.lang, chinese.lang = "en", "en", "zh"
    store.upsert([first])
    store.upsert([rescored, chinese])

    def found(filters: Filters, prefix: str = "doc-0") -> list[tuple[str, str]]:
        return [(r.id, r.model) for r in search(store, filters, task_id=prefix)]

    assert found(Filters()) == [("doc-001", "m2"), ("doc-002", "m")]
    assert found(Filters(lang="zh")) == [("doc-002", "m")]
    assert found(Filters(lang="en")) == [("doc-001", "m2")]
    assert found(Filters(model="m"), "doc-001") == [("doc-001", "m")]
