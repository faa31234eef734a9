"""Resource and header bounds of the HTTP API: the cells one bucketed aggregate may
answer, a deadline on a request head that never ends, and the headers of a 500.
"""

from __future__ import annotations

import datetime as dt
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import api.app
from api import security
from api.app import create_app
from contract import queries
from contract.errors import InvalidInput
from contract.queries import Filters, stats, top_stats
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from tests.served_app import served

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 3, 1, 10, tzinfo=UTC)
ORIGIN = "https://app.example"


def _seed(store: ResultStore, sources: int, minutes: int) -> None:
    """A row per source and minute: ``sources`` x ``minutes`` groups in 1m buckets."""
    store.upsert([ResultRecord(
        id=f"s{s}-m{m}", text_sha256="0" * 64, text_chars=4, model="m", status="done",
        finished_at=T0 + dt.timedelta(minutes=m), label="positive", score=0.9,
        scores={"negative": 0.1, "positive": 0.9}, source=f"src{s}", text="text")
        for s in range(sources) for m in range(minutes)])


def test_a_bucketed_aggregate_is_capped_in_cells(store: ResultStore,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Values x buckets was bounded only by the rows (up to 1,000 groups x 10,000
    buckets): past :data:`~contract.queries.MAX_CELLS` the answer is refused, saying
    what to narrow, and no more rows than that are read from the database."""
    monkeypatch.setattr(queries, "MAX_CELLS", 20, raising=False)
    _seed(store, sources=5, minutes=6)  # 30 cells
    for call in (top_stats, stats):
        with pytest.raises(InvalidInput) as info:
            call(store, Filters(), by="source", bucket="1m")
        message = str(info.value)
        assert "20" in message and "narrow" in message and "bucket" in message, message
    got = top_stats(store, Filters(since=T0, until=T0 + dt.timedelta(minutes=3)),
                    by="source", bucket="1m")
    assert sum(g["count"] for g in got.groups) == 15
    assert len(stats(store, Filters(since=T0, until=T0 + dt.timedelta(minutes=3)),
                     by="source", bucket="1m")) == 15
    # two values and an `other` per bucket: 6 x 3 = 18 cells
    got = top_stats(store, Filters(), by="source", bucket="1m", limit=2)
    assert len(got.groups) == 12 and len(got.other) == 6
    # without a bucket: one cell per value, as before
    assert len(stats(store, Filters(), by="source")) == 5


@pytest.fixture
def app_settings(redis_url: str, tmp_path: Path) -> Settings:
    return Settings(broker_url=redis_url, database_url=f"sqlite:///{tmp_path}/r.db",
                    queue=f"bst-bounds-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "c"),
                    api_cors_origins=ORIGIN)


def test_stats_over_the_cell_cap_is_a_422(app_settings: Settings,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queries, "MAX_CELLS", 20, raising=False)
    store = ResultStore.from_url(app_settings.database_url)
    try:
        store.create_schema()
        _seed(store, sources=5, minutes=6)
    finally:
        store.close()
    with TestClient(create_app(app_settings), raise_server_exceptions=False) as http:
        r = http.get("/v1/stats", params={"by": "source", "bucket": "1m"})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_input" and "20" in r.text
        r = http.get("/v1/stats", params={"by": "source", "bucket": "1m", "limit": 2})
        assert r.status_code == 200 and len(r.json()["other"]) == 6, r.text


def test_a_500_carries_the_security_and_cors_headers(app_settings: Settings,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error is answered inside the middlewares: Starlette builds its 500
    outside them, so it had no security headers and no CORS header (a browser page saw
    a CORS failure instead of the error)."""
    def boom(*_a: Any, **_kw: Any) -> Any:
        raise RuntimeError("a bug")

    store = ResultStore.from_url(app_settings.database_url)
    store.create_schema()
    store.close()
    monkeypatch.setattr(api.app, "top_stats", boom)
    with TestClient(create_app(app_settings), raise_server_exceptions=False) as http:
        r = http.get("/v1/stats", headers={"Origin": ORIGIN})
        assert r.status_code == 500, r.text
        assert r.json() == {"error": {"code": "internal_error",
                                      "message": "internal error (RuntimeError)"}}
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["cache-control"] == "no-store"
        assert "content-security-policy" in r.headers
        # an answer that works is unchanged
        monkeypatch.undo()
        assert http.get("/v1/stats", headers={"Origin": ORIGIN}).status_code == 200


@pytest.fixture
def short_head_server(app_settings: Settings) -> Iterator[str]:
    """A real uvicorn in this thread's process, as ``serve`` configures it, with the head
    deadline shortened."""
    class Quick(security.HeadDeadlineH11):
        head_timeout_s = 0.5

    with served(create_app(app_settings), start_timeout_s=20, log_level="warning",
                http=Quick) as url:
        yield url.removeprefix("http://")


def _closed_within(sock: socket.socket, wait_s: float) -> bool:
    """Whether the server closes ``sock`` within ``wait_s``."""
    sock.settimeout(wait_s)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_request_head_that_never_ends_is_dropped(short_head_server: str) -> None:
    """uvicorn times out only an idle keep-alive connection: one that sends part of a
    request head and stops was held for ever, and enough of them exhaust the server."""
    host, port = short_head_server.split(":")
    for head in (b"", b"GET / HTTP/1.1\r\nHost: x\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(head)
            assert _closed_within(sock, 5), head
    # a request that completes is answered, and its connection kept alive meanwhile
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.2)
        sock.sendall(b"\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        # the next head on that connection is bounded too
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert _closed_within(sock, 5)
