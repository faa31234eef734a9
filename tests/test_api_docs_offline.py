"""The interactive docs (``/docs``: Swagger UI, ``/redoc``: ReDoc) as an operator of an
air-gapped deployment runs them: every script, style and picture comes from this server,
none from a CDN, under a Content-Security-Policy that runs only this server's scripts and
the page's own inline script (by its hash). The dashboard keeps its token in the same
origin's localStorage: a script of another origin on these pages could read it.

Checked over HTTP, and in a real headless browser that resolves no host but this server's.
"""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from contract.settings import Settings

PAGES = ("/docs", "/redoc", "/docs/oauth2-redirect")
#: A name the browser resolves to this machine (and nothing else): the docs are opened as
#: from a server that is not ``localhost`` (Swagger UI treats a local spec differently).
HOST = "bertstream.test"


@pytest.fixture
def pg_settings(redis_url: str, pg_url: str, tmp_path: Path) -> Settings:
    return Settings(broker_url=redis_url, database_url=pg_url,
                    queue=f"bst-docs-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"))


def _policy(header: str) -> dict[str, list[str]]:
    """A Content-Security-Policy header as its directives' source lists."""
    out: dict[str, list[str]] = {}
    for directive in header.split(";"):
        name, *sources = directive.split()
        out[name] = sources
    return out


def _inline(html: str, tag: str) -> list[str]:
    """The text of each inline ``<tag>`` element of a page (a ``<script src>`` has none)."""
    return re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _links(html: str) -> list[str]:
    """Every URL a page loads or links to (src, href, spec-url)."""
    return re.findall(r'(?:src|href|spec-url)="([^"]*)"', html)


def _check_page(http: TestClient, path: str, prefix: str = "") -> None:
    r = http.get(prefix + path)
    assert r.status_code == 200, (path, r.text)
    assert r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "://" not in html and "cdn" not in html.lower(), (path, html)
    for url in _links(html):
        assert url.startswith(prefix + "/") and not url.startswith("//"), (path, url)
        asset = http.get(url)
        assert asset.status_code == 200 and asset.content, (path, url)
    policy = _policy(r.headers["content-security-policy"])
    assert policy["default-src"] == ["'none'"], policy
    assert policy["script-src"] == ["'self'"] + [_sha256(s) for s in _inline(html, "script")]
    assert policy["connect-src"] == ["'self'"] and policy["frame-ancestors"] == ["'none'"]
    assert policy["base-uri"] == ["'none'"]
    assert not [s for sources in policy.values() for s in sources
                if "://" in s or s in ("*", "https:", "http:")], policy
    assert r.headers["x-frame-options"] == "DENY"
    if path != "/redoc":  # ReDoc writes its style sheet into the page, and has a worker
        assert policy["style-src"] == ["'self'"] and "worker-src" not in policy, policy


def test_docs_pages_load_nothing_from_another_origin(pg_settings: Settings) -> None:
    """/docs, /redoc and Swagger UI's OAuth2 redirect page name no other origin (the CDN's
    scripts and style, FastAPI's favicon, Google's fonts were loaded from outside); every
    file they load is served here; their CSP allows this server's scripts and the hash of
    each inline script of the page, nothing else. Behind a proxy's path prefix
    (``root_path``) the URLs carry the prefix. /openapi.json stays OpenAPI 3.1, without
    the docs' routes."""
    with TestClient(create_app(pg_settings)) as http:
        for path in PAGES:
            _check_page(http, path)
        assert "swagger-ui-bundle.js" in http.get("/docs").text
        assert "redoc.standalone.js" in http.get("/redoc").text
        schema = http.get("/openapi.json").json()
        assert schema["openapi"].startswith("3.1")
        assert not [p for p in schema["paths"] if p.startswith(("/docs", "/redoc"))]
    with TestClient(create_app(pg_settings), root_path="/bertstream") as http:
        for path in PAGES:
            _check_page(http, path, prefix="/bertstream")
        assert "url: '/bertstream/openapi.json'" in http.get("/bertstream/docs").text


def test_docs_assets_are_only_the_docs_files(pg_settings: Settings) -> None:
    """The assets route serves the docs' files and nothing else of the package or the disk,
    with their types; its answers carry the security headers of any answer."""
    with TestClient(create_app(pg_settings)) as http:
        script = ("text/javascript", "application/javascript")  # as the system's types say
        types = {"swagger-ui-bundle.js": script, "swagger-ui.css": ("text/css",),
                 "redoc.standalone.js": script, "favicon.png": ("image/png",)}
        for name, media in types.items():
            r = http.get(f"/docs/assets/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(media), name
            assert r.headers["x-content-type-options"] == "nosniff"
        for name in ("__init__.py", "core.py", "../core.py", "%2e%2e/core.py", "",
                     "../../api/app.py"):
            assert http.get(f"/docs/assets/{name}").status_code == 404, name


def test_redoc_script_served_has_no_outside_picture(pg_settings: Settings) -> None:
    """ReDoc's script names one outside picture, its "by Redocly" logo on Redocly's CDN,
    which the docs' CSP refused. The script served is the package's with that URL made
    an empty string, and no other byte changed."""
    from api.docs import ASSETS, REDOC_LOGO_URL, REDOC_SCRIPT

    original = (ASSETS / REDOC_SCRIPT).read_bytes()
    assert original.count(b"cdn.redoc.ly") == 1  # a new ReDoc may move it: look again
    with TestClient(create_app(pg_settings)) as http:
        got = http.get(f"/docs/assets/{REDOC_SCRIPT}")
        served = got.content
        again = http.get(f"/docs/assets/{REDOC_SCRIPT}",
                         headers={"If-None-Match": got.headers["etag"]})
        assert again.status_code == 304 and not again.content
    assert b"cdn.redoc.ly" not in served
    assert served == original.replace(f'"{REDOC_LOGO_URL}"'.encode(), b'""')
    assert len(served) == len(original) - len(REDOC_LOGO_URL)


def _operations(schema: dict[str, Any]) -> int:
    methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
    return sum(1 for item in schema["paths"].values() for m in item if m in methods)


@pytest.fixture
def offline_browser() -> Iterator[Any]:
    """Headless chromium that resolves :data:`HOST` to this machine and no other name (a
    CDN is unreachable even where the machine has internet); its console is logged."""
    from tests.test_dashboard_browser import CHROMEDRIVER, CHROMIUM

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900",
                f"--host-resolver-rules=MAP {HOST} 127.0.0.1, MAP * ~NOTFOUND"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, script: str, expected: Any, what: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30, poll_frequency=0.2).until(
        lambda d: d.execute_script(script) == expected, what)


def _check_loads(driver: Any, origin: str, blocked: tuple[str, ...] = ()) -> None:
    """Every resource the page asked for or shows (a picture not loaded yet included) is
    from ``origin``, but for the URLs of ``blocked``, each of which the CSP refused (the
    browser lists a refused one among its resource timings too); the console holds no
    other error or warning (a refused script or style, a failed request), and no CSP
    violation at all when nothing is ``blocked``."""
    fetched = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    shown = driver.execute_script(
        "return Array.from(document.querySelectorAll('[src], link[href]'),"
        " e => e.src || e.href)")
    assert fetched and shown
    outside = {u for u in fetched + shown if not u.startswith((origin + "/", "data:", "blob:"))}
    assert outside <= set(blocked), outside
    entries = driver.get_log("browser")  # reading the log empties it
    logs = [e["message"] for e in entries if e["level"] in ("SEVERE", "WARNING")]
    refusals = {url for url in outside for m in logs
                if f"'{url}' violates" in m and "has been blocked" in m}
    assert refusals == outside, logs
    assert len(logs) == len(outside), logs
    if not blocked:  # of any level
        violations = [e["message"] for e in entries
                      if "Content Security Policy" in e["message"]]
        assert violations == [], violations
    broken = driver.execute_script(
        "return Array.from(document.images).filter(i => i.complete && !i.naturalWidth"
        " && i.getAttribute('src')).map(i => i.src)")
    assert broken == [], broken



@pytest.mark.slow
def test_docs_render_in_a_browser_without_internet(pg_settings: Settings, api_factory: Any,
                                                   offline_browser: Any) -> None:
    """Swagger UI at /docs shows every operation of /openapi.json (OpenAPI 3.1: the
    Swagger UI served must read it) and calls the API from "Try it out"; ReDoc at /redoc
    shows every operation and searches them; all in a browser that can reach this server
    only, with no request elsewhere, no broken picture and no CSP violation in the
    console on either page. ReDoc's "by Redocly" logo, its one outside URL, was refused
    by the page's CSP (a console error); the ReDoc script served has it taken out."""
    from selenium.webdriver.common.by import By

    api = api_factory(pg_settings)
    schema = httpx.get(api.url + "/openapi.json", timeout=10).json()
    count = _operations(schema)
    assert count > 10
    origin = api.url.replace("127.0.0.1", HOST)
    driver = offline_browser
    driver.get(origin + "/docs")
    _wait(driver, "return document.querySelectorAll('.opblock').length", count,
          "Swagger UI shows every operation")
    title = driver.execute_script("return document.querySelector('.info .title').innerText")
    assert "bertstream" in title
    assert driver.execute_script("return document.querySelectorAll('.errors-wrapper').length") == 0
    health = driver.find_element(By.ID, "operations-health-healthz_healthz_get")
    health.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    _wait(driver, "return document.querySelectorAll('.try-out__btn').length", 1, "Try it out")
    health.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    health.find_element(By.CSS_SELECTOR, ".execute").click()
    _wait(driver, "const c = document.querySelector('.live-responses-table tr.response .response-col_status');"
          "return c ? c.innerText.trim() : null", "200", "Try it out calls /healthz")
    _check_loads(driver, origin)

    driver.get(origin + "/redoc")
    _wait(driver, "return document.querySelectorAll('[data-section-id^=\"operation/\"]').length",
          count, "ReDoc shows every operation")
    shown = driver.execute_script("return document.body.innerText")
    assert "bertstream" in shown and "/v1/tasks" in shown
    driver.find_element(By.CSS_SELECTOR, "input[placeholder^=Search]").send_keys("readyz")
    _wait(driver, "const r = document.querySelector('[data-role=\"search:results\"]');"
          "return r ? /readyz/i.test(r.innerText) : false", True, "ReDoc's search (a worker)")
    _check_loads(driver, origin)
    footer = driver.execute_script(
        "return Array.from(document.querySelectorAll('a[href^=\"https://redocly.com\"]'),"
        " a => a.innerText)")
    assert footer == ["API docs by Redocly"], footer  # the credit stays, without a picture
