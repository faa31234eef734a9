"""The HTTP API as an operator exposing it would check it: a real ``bertstream serve`` (or a
real uvicorn in this process, where a limit must be shortened) on real Redis and PostgreSQL.

Authentication before any body is read, a deadline on a body that trickles in, compressed
bodies refused, and the headers a page showing user-submitted texts needs.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from api import security
from api.app import create_app
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from tests.served_app import served

TOKEN = "review token"  # a token may hold a space
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def pg_settings(redis_url: str, pg_url: str, tmp_path: Path) -> Settings:
    return Settings(broker_url=redis_url, database_url=pg_url, api_tokens=f" ,{TOKEN}, other,",
                    queue=f"bst-sec-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"))


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    return dict(body["error"])


def _raw(url: str, request: bytes, *, wait_s: float) -> bytes:
    """Send ``request`` as it is on a fresh connection and read the answer: its head and
    as much body as its Content-Length says, or up to the connection's close (b"" when
    the server says nothing within ``wait_s``). One ``recv`` could end after the head: the
    server may send head and body in separate writes."""
    host, port = url.removeprefix("http://").split(":")
    got = b""
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(request)
        try:
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    return got
                got += chunk
                head, sep, body = got.partition(b"\r\n\r\n")
                if not sep:
                    continue
                length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
                if length is not None and len(body) >= int(length.group(1)):
                    return got
        except TimeoutError:
            return got


def test_no_body_is_read_before_the_token_is_checked(pg_settings: Settings,
                                                     api_factory: Any) -> None:
    """Without a valid token the answer is 401 whatever the body: the body was read and
    parsed first, so a caller without a token got the JSON parser's verdict on it (422)
    and could make the server read and parse bodies up to the size limit."""
    api = api_factory(pg_settings)
    with httpx.Client(base_url=api.url, timeout=10) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            for body in (b"{bad", b"[" * 100 + b"]" * 100, b'{"text": "hi"}'):
                r = http.post("/v1/tasks", content=body,
                              headers={**headers, "Content-Type": "application/json"})
                assert r.status_code == 401, r.text
                assert _error(r)["code"] == "unauthorized"
                assert r.headers["www-authenticate"] == "Bearer"
        # Configured tokens: empty entries are dropped, spaces around a token stripped and
        # inside it kept; a token in the query string is no token.
        assert http.get("/v1/sources", headers=AUTH).status_code == 200
        assert http.get("/v1/sources", headers={"Authorization": "Bearer other"}).status_code == 200
        assert http.get("/v1/sources", headers={"Authorization": "Bearer"}).status_code == 401
        assert http.get("/v1/sources", params={"access_token": TOKEN}).status_code == 401
    # A body that never comes: the 401 is answered at once, without waiting for it.
    head = (b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"text\": ")
    assert _raw(api.url, head, wait_s=5).startswith(b"HTTP/1.1 401 ")
    assert "review token" not in api.log()


def test_a_body_that_stalls_is_answered_408(pg_settings: Settings,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A body that stops arriving held its connection and request forever (a slowloris
    needs a handful of bytes per connection); now it has a grace period plus the time
    its bytes earn at a minimum rate, and is answered 408. A slow body that keeps
    coming within that is read whole."""
    monkeypatch.setattr(security, "BODY_TIMEOUT_S", 1.0)
    monkeypatch.setattr(security, "BODY_MIN_RATE", 100)
    queued = redis.Redis.from_url(pg_settings.broker_url)
    with served(create_app(pg_settings)) as url:
        head = (b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer review token\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"text\": \"")
        t0 = time.monotonic()
        answer = _raw(url, head, wait_s=10)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert 0.9 < time.monotonic() - t0 < 5
        assert b'"code":"request_timeout"' in answer
        assert b"connection: close" in answer.lower()

        # 500 bytes in 5 pieces, 0.5 s apart: past the grace second, but each piece earns
        # its second at 100 bytes/s.
        text = "slow but steady " * 30
        body = json.dumps({"text": text, "id": "slow-1"}).encode()
        pieces = [body[i:i + 110] for i in range(0, len(body), 110)]

        def trickle() -> Iterator[bytes]:
            for piece in pieces:
                yield piece
                time.sleep(0.5)

        with httpx.Client(base_url=url, timeout=20, headers=AUTH) as http:
            r = http.post("/v1/tasks", content=trickle(),
                          headers={"Content-Type": "application/json"})
            assert r.status_code == 202, r.text
            assert r.json()["id"] == "slow-1"
    assert queued.keys(f"*{pg_settings.queue}*")  # the slow body's task was queued
    queued.close()


def test_a_compressed_body_is_refused_415(pg_settings: Settings, api_factory: Any) -> None:
    """The API reads bodies as they are sent: a gzip body was taken for JSON and answered
    "not valid UTF-8". It is a 415 naming the encoding, and nothing is decompressed."""
    api = api_factory(pg_settings)
    with httpx.Client(base_url=api.url, timeout=10, headers=AUTH) as http:
        for encoding, body in (("gzip", gzip.compress(b'{"text": "hi"}')),
                               ("deflate", b"x\x9c\x03\x00\x00\x00\x00\x01"),
                               ("br", b"\x0b")):
            r = http.post("/v1/tasks", content=body, headers={
                "Content-Type": "application/json", "Content-Encoding": encoding})
            assert r.status_code == 415, r.text
            error = _error(r)
            assert error["code"] == "unsupported_media_type" and encoding in error["message"]
        plain = http.post("/v1/tasks", json={"text": "hi"},
                          headers={"Content-Encoding": "identity"})
        assert plain.status_code == 202, plain.text


def test_answers_carry_the_headers_a_page_of_user_texts_needs(pg_settings: Settings,
                                                              api_factory: Any) -> None:
    """``nosniff`` and no framing on every answer; the dashboard's page and files under a
    Content-Security-Policy that runs only the server's own script (no inline script or
    style, no other origin); ``/v1`` answers, which hold submitted texts, never cached."""
    api = api_factory(pg_settings.replace(api_max_body_bytes=4096))
    with httpx.Client(base_url=api.url, timeout=10) as http:
        answers = {path: http.get(path, headers=AUTH) for path in (
            "/", "/static/app.js", "/static/style.css", "/v1/live", "/v1/sources",
            "/metrics", "/healthz", "/docs", "/openapi.json", "/nowhere")}
        answers["401"] = http.get("/v1/live")
        answers["413"] = http.post("/v1/tasks", content=b"x" * 5000,
                                   headers=AUTH)
        for name, r in answers.items():
            assert r.headers.get("x-content-type-options") == "nosniff", name
            assert r.headers.get("x-frame-options") == "DENY", name
            assert "frame-ancestors 'none'" in r.headers.get("content-security-policy", ""), name
            assert r.headers.get("referrer-policy") == "no-referrer", name
        page = answers["/"].headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in page.split(";") if d.strip())
        assert directives["default-src"] == "'none'"
        assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
        assert directives["connect-src"] == "'self'" and directives["base-uri"] == "'none'"
        assert "unsafe" not in page
        for name in ("/static/app.js", "/v1/live", "/metrics"):
            assert answers[name].headers["content-security-policy"] == page, name
        for name in ("/v1/live", "/v1/sources", "/metrics", "401"):
            assert answers[name].headers.get("cache-control") == "no-store", name
        # The interactive docs run this server's copy of Swagger UI and their own inline
        # script, by its hash (tests/test_api_docs_offline.py): no other origin, no CDN.
        assert answers["/docs"].status_code == 200
        docs = answers["/docs"].headers["content-security-policy"]
        assert "script-src 'self' 'sha256-" in docs and "unsafe" not in docs
        assert "http" not in docs and "cdn" not in answers["/docs"].text
        for name in ("/v1/live", "/healthz", "/openapi.json", "/nowhere", "401", "413"):
            assert answers[name].headers["content-type"] == "application/json", name


XSS = '<img src=x onerror="window.__pwned=1">'


@pytest.mark.slow
def test_dashboard_shows_hostile_texts_as_text(pg_settings: Settings, api_factory: Any,
                                               tmp_path: Path) -> None:
    """Texts, sources, labels and ids holding markup are shown as text in a real browser,
    and the page's Content-Security-Policy leaves the dashboard working (no violation)."""
    from tests.test_dashboard_browser import CHROMEDRIVER, CHROMIUM

    selenium = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    store = ResultStore.from_url(pg_settings.database_url)
    store.create_schema()
    now = dt.datetime.now(dt.timezone.utc)
    store.upsert([ResultRecord(
        id=f"x-{i}-{XSS}", text_sha256="0" * 64, text_chars=len(XSS), model="tiny", text=XSS,
        status="done", label=f"l{i}<b>", score=0.8, scores={f"l{i}<b>": 0.8},
        source=f"<svg onload=window.__pwned=2>{i}",
        finished_at=now - dt.timedelta(minutes=i)) for i in range(3)])
    store.close()
    api = api_factory(pg_settings)
    options = selenium.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = selenium.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(api.url + "/?refresh=300")
        driver.execute_script("localStorage.setItem('bertstream.token', arguments[0]);", TOKEN)
        driver.get(api.url + "/?refresh=300")
        WebDriverWait(driver, 30, poll_frequency=0.2).until(lambda d: d.execute_script(
            "return document.querySelectorAll('#results tbody tr').length") == 3)
        shown = driver.execute_script("return document.querySelector('#results').innerText")
        assert XSS in shown and "<svg onload=window.__pwned=2>0" in shown and "l0<b>" in shown
        assert driver.execute_script(
            "return document.querySelectorAll('#results img, #results svg, #results b').length"
        ) == 0
        time.sleep(1)  # a few refreshes
        assert driver.execute_script("return window.__pwned === undefined")
        logs = [e["message"] for e in driver.get_log("browser")]
        assert not [m for m in logs if "Content Security Policy" in m], logs
    finally:
        driver.quit()


def test_cors_origins_as_copied_from_the_address_bar(pg_settings: Settings) -> None:
    """An origin configured with a trailing ``/`` matched no browser's ``Origin`` (which
    never has one): it is the origin; one not listed still gets no CORS header, and ``*``
    allows any origin without credentials (the token is a header, not a cookie)."""
    from fastapi.testclient import TestClient

    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    listed = pg_settings.replace(api_cors_origins="https://app.example/, https://b.example")
    with TestClient(create_app(listed)) as http:
        for origin, allowed in (("https://app.example", True), ("https://b.example", True),
                                ("https://evil.example", False), ("null", False)):
            pre = http.options("/v1/tasks", headers={"Origin": origin, **preflight})
            got = http.get("/v1/sources", headers={"Origin": origin, **AUTH})
            assert pre.status_code == (200 if allowed else 400), origin
            assert got.status_code == 200
            for r in (pre, got):
                assert r.headers.get("access-control-allow-origin") == (
                    origin if allowed else None), origin
                assert "access-control-allow-credentials" not in r.headers
    with TestClient(create_app(pg_settings.replace(api_cors_origins="*"))) as http:
        got = http.get("/v1/sources", headers={"Origin": "https://any.example", **AUTH})
        assert got.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in got.headers
