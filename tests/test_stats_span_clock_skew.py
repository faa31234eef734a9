"""``/v1/stats`` with ``since`` alone, served by an API host whose clock is off the Redis server's.

A bucketed answer is refused past ``MAX_BUCKETS`` buckets; with ``since`` alone the span
ends now. Row times are on the Redis server's clock, so that now is the server's: on the
API host's own clock, a host a week ahead refused the dashboard's "last hour" per minute
(its span counted the week), and one a week behind let through a span of more buckets
than the limit. The skewed host has its clock moved (``time.time`` and each module's UTC
``now`` patched), a fault one host cannot cause for real; Redis, the database and the
served app are real.
"""

from __future__ import annotations

import datetime as dt

import httpx
import pytest
import redis

from api.app import create_app
from contract.clock import server_time
from contract.queries import MAX_BUCKETS
from contract.results import ResultStore
from contract.settings import Settings
from tests.served_app import served
from tests.test_api_clock_skew import at, host_clock, row

#: A week and a day, in seconds: past the 10,000 one-minute buckets of the limit.
WEEK_S = 8 * 86400.0


@pytest.mark.parametrize("skew", [WEEK_S, -WEEK_S], ids=["host-ahead", "host-behind"])
def test_the_span_of_since_alone_ends_at_the_servers_now(
        settings: Settings, store: ResultStore, plain: redis.Redis,
        monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    """The last hour per minute (60 buckets) is answered, with the row of that hour in its
    minute, and a span of more minutes than the limit is refused, whatever the host's clock."""
    now = server_time(plain)
    store.upsert([row("recent", now - 600)])
    hour = at(now - 3600).isoformat()
    too_long = at(now - 60 * (MAX_BUCKETS + 60)).isoformat()
    with served(create_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as http:
        with host_clock(monkeypatch, skew):
            last_hour = http.get("/v1/stats", params={"since": hour, "bucket": "1m"})
            refused = http.get("/v1/stats", params={"since": too_long, "bucket": "1m"})
    assert last_hour.status_code == 200, last_hour.text
    minute = at(now - 600).replace(second=0, microsecond=0)
    assert [(g["bucket"], g["count"]) for g in last_hour.json()["groups"]] == [
        (minute.strftime("%Y-%m-%dT%H:%M:%SZ"), 1)]
    assert refused.status_code == 422, refused.text
    assert "over the limit" in refused.json()["error"]["message"]


def test_the_span_without_the_server_clock_keeps_this_host_clock(
        sqlite_url: str) -> None:
    """Redis gone: the span ends at this host's now, as before there was a server clock
    (the answer is still given)."""
    store = ResultStore.from_url(sqlite_url)
    try:
        store.create_schema()
        now = dt.datetime.now(dt.timezone.utc).timestamp()
        store.upsert([row("recent", now - 600)])
    finally:
        store.close()
    settings = Settings(broker_url="redis://127.0.0.1:1/0", database_url=sqlite_url)
    with served(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        answer = http.get("/v1/stats", params={"since": at(now - 3600).isoformat(),
                                               "bucket": "1m"})
    assert answer.status_code == 200, answer.text
    assert sum(g["count"] for g in answer.json()["groups"]) == 1
