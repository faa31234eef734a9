"""The API against a PostgreSQL that drops its connections (a restart, a failover): the
reads reconnect instead of answering 503, an export that fails mid-stream breaks the
transfer instead of ending cleanly with rows missing, and every 5xx is counted.

The fault is real: ``pg_terminate_backend`` on the API server's own connections (found
by their ``application_name``), as a database restart does to them.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from api.app import create_app
from contract.queries import Filters, iter_records, page
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from tests.served_app import served

APP_NAME = "bst-api-faults"
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


@pytest.fixture
def pg_settings(redis_url: str, pg_url: str, tmp_path: Path) -> Settings:
    """Settings on the test PostgreSQL, the API's connections named so they can be killed."""
    return Settings(broker_url=redis_url, database_url=f"{pg_url}?application_name={APP_NAME}",
                    queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                    max_wait_ms=20)


@pytest.fixture
def admin(pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url)
    yield engine
    engine.dispose()


def _kill(admin: sa.Engine) -> int:
    """Terminate the connections named :data:`APP_NAME`; how many there were. Returns
    once their backends are gone: ``pg_terminate_backend`` only signals them, and a
    request sent meanwhile may meet a backend still dying, a race of this test's own."""
    with admin.connect() as conn:
        pids = [pid for pid, _ in conn.execute(sa.text(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = :name"),
            {"name": APP_NAME}).all()]
        deadline = time.monotonic() + 10
        # pg_stat_activity is one snapshot per transaction: cleared before each look.
        while pids and conn.execute(sa.text(
                "SELECT count(*) FROM (SELECT pg_stat_clear_snapshot()) AS cleared,"
                " pg_stat_activity WHERE pid = ANY(:pids)"), {"pids": pids}).scalar_one():
            assert time.monotonic() < deadline, "the terminated backends did not end"
            time.sleep(0.01)  # polling the server's own view
    return len(pids)


def _record(i: int, *, text: str = "t", source: str = "s", model: str = "m") -> ResultRecord:
    return ResultRecord(id=f"r{i:05d}", text_sha256="a" * 64, text_chars=len(text), text=text,
                        model=model, status="done", label="positive", score=0.9, source=source,
                        finished_at=T0 + dt.timedelta(seconds=i), scores={"positive": 0.9})


def _seed(pg_url: str, records: list[ResultRecord]) -> None:
    store = ResultStore.from_url(pg_url)
    store.create_schema()
    for start in range(0, len(records), 2000):
        store.upsert(records[start:start + 2000])
    store.close()


def _requests(http: httpx.Client, route: str, status: int) -> float:
    """``bertstream_api_requests_total`` of ``route`` and ``status`` (0 when absent)."""
    want = f'bertstream_api_requests_total{{route="{route}",status="{status}"}} '
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(want):
            return float(line[len(want):])
    return 0.0


def test_an_export_cut_mid_stream_breaks_the_transfer_and_counts_a_500(
        pg_settings: Settings, pg_url: str, admin: sa.Engine, api_factory: Any) -> None:
    """Many pages, a client that reads the first rows and then pauses (so the server still
    has pages to read), the API's connections killed: the client must see an incomplete
    body, never a clean end with rows missing, and the metrics a 500."""
    total = 12_000
    _seed(pg_url, [_record(i, text="x" * 1000) for i in range(total)])
    api = api_factory(pg_settings)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):
            with http.stream("GET", "/v1/results", params={"format": "jsonl"}) as r:
                assert r.status_code == 200
                killed = False
                for chunk in r.iter_raw():
                    received += chunk
                    if not killed and len(received) > 100_000:
                        assert _kill(admin) >= 1
                        killed = True
        lines = received.count(b"\n")
        assert 0 < lines < total
        assert _requests(http, "/v1/results", 500) == 1
        assert _requests(http, "/v1/results", 200) == 0
        # The next export, on a fresh connection, is whole.
        r = http.get("/v1/results", params={"format": "jsonl"})
        assert r.status_code == 200 and r.text.count("\n") == total
    assert "cannot read results" in api.log_path.read_text()


def test_reads_reconnect_after_the_database_dropped_their_connections(
        pg_settings: Settings, pg_url: str, admin: sa.Engine, api_factory: Any) -> None:
    """Every read route, with its pooled connections warm and then killed, answers as
    before: a dead pooled connection is replaced, as ``/v1/tasks/{id}`` always did."""
    _seed(pg_url, [_record(i, source=f"src{i % 3}") for i in range(30)]
          + [_record(i, model="m2") for i in range(5)])
    api = api_factory(pg_settings)
    routes: list[tuple[str, dict[str, Any]]] = [
        ("/v1/results", {}), ("/v1/results", {"format": "jsonl"}),
        ("/v1/results", {"format": "csv"}), ("/v1/stats", {"by": "source"}),
        ("/v1/stats", {"bucket": "1h", "since": "2026-11-01T00:00:00Z"}),
        ("/v1/search", {"q": "t"}), ("/v1/search", {"id": "r0001"}), ("/v1/sources", {}),
        ("/v1/live", {}), ("/v1/compare", {"a": "m", "b": "m2"}), ("/v1/tasks/r00001", {})]
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for route, params in routes:
            expected = [http.get(route, params=params) for _ in range(3)][-1]
            assert expected.status_code == 200, (route, expected.text)
            assert _kill(admin) >= 1, route
            again = http.get(route, params=params)
            assert again.status_code == 200, (route, params, again.text)
            if route != "/v1/live":  # its figures move with the clock
                assert again.text == expected.text, (route, params)
        assert _requests(http, "/v1/results", 503) == 0


def test_an_export_reconnects_before_its_first_row_only(pg_url: str,
                                                         admin: sa.Engine) -> None:
    """A dead pooled connection found by the first page is replaced; one lost after rows
    were given cannot be: the export would repeat or skip rows, so it fails."""
    _seed(pg_url, [_record(i) for i in range(25)])
    store = ResultStore.from_url(f"{pg_url}?application_name={APP_NAME}")
    try:
        assert len(page(store, Filters()).records) == 25  # a pooled connection, warm
        assert _kill(admin) == 1
        assert [r.id for r in iter_records(store, Filters(), chunk=10)] == [
            f"r{i:05d}" for i in range(25)]
        rows = iter_records(store, Filters(), chunk=10)
        first = [next(rows) for _ in range(10)]
        assert _kill(admin) == 1
        with pytest.raises(Exception) as failed:
            first.extend(rows)
        assert type(failed.value).__name__ == "StoreUnavailable"
    finally:
        store.close()


def test_a_500_raised_before_the_response_is_counted(pg_settings: Settings) -> None:
    """The 500 of an unexpected error is built by the server-error handler, outside the
    routes: it is counted and timed all the same (a route that fails stands in for a bug)."""
    app = create_app(pg_settings)

    @app.get("/v1/broken")
    def broken() -> None:
        raise RuntimeError("a bug")

    # uvicorn closes the connection after an error: each request on a fresh one
    with served(app) as url, httpx.Client(base_url=url, timeout=10,
                                          headers={"Connection": "close"}) as http:
        r = http.get("/v1/broken")
        assert r.status_code == 500
        assert json.loads(r.text)["error"]["code"] == "internal_error"
        assert _requests(http, "/v1/broken", 500) == 1
        metrics = http.get("/metrics").text
        assert 'bertstream_api_request_seconds_count{route="/v1/broken"} 1.0' in metrics
