"""Paging through the dashboard's latest results: ``/v1/search``'s ``cursor`` on SQLite and
PostgreSQL (rows sharing a ``finished_at`` included), and the page's Older / Newer buttons
in a real headless browser, with filters applied and refreshes running."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from tests import test_dashboard_browser
from tests.test_dashboard_browser import _table_ids, _until

#: The headless chromium fixture of the dashboard's browser test.
browser = test_dashboard_browser.browser


def _rows(now: dt.datetime) -> list[ResultRecord]:
    """130 rows a second apart, newest first ``p-000``; rows 40 .. 69 share one instant (a
    batch written at once); every third row is negative; the texts say "even" or "odd"."""
    out = []
    for n in range(130):
        when = now - dt.timedelta(seconds=40 if 40 <= n < 70 else n)
        label = "negative" if n % 3 == 0 else "positive"
        text = f"row {n} is " + ("even" if n % 2 == 0 else "odd")
        out.append(ResultRecord(id=f"p-{n:03d}", text_sha256="0" * 64, text_chars=len(text),
                                model="m", status="done", label=label, score=0.5,
                                source="web", text=text, finished_at=when))
    return out


def _order(rows: list[ResultRecord]) -> list[str]:
    """The table's order: newest first, ties by id descending."""
    return [r.id for r in sorted(rows, key=lambda r: (r.finished_at, r.id), reverse=True)]


def _walk(http: httpx.Client, **params: Any) -> list[list[str]]:
    """Every page of a search, following ``next_cursor``."""
    pages: list[list[str]] = []
    cursor = None
    while True:
        r = http.get("/v1/search", params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append([row["id"] for row in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 20, pages


def test_search_pages_follow_the_table_order(settings: Settings, store: ResultStore,
                                             api_factory: Any) -> None:
    """Pages of ``limit`` rows, each after the last row of the one before in (finished_at,
    id) order: every row once, ties split across pages included, with a filter and with a
    text search; a cursor that is not one is a 422."""
    now = dt.datetime.now(dt.timezone.utc)
    rows = _rows(now)
    store.upsert(rows)
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=10) as http:
        pages = _walk(http, limit=50)
        assert [len(p) for p in pages] == [50, 50, 30]
        assert sum(pages, []) == _order(rows)
        negative = [r for r in rows if r.label == "negative"]
        pages = _walk(http, limit=20, label="negative")
        assert [len(p) for p in pages] == [20, 20, 4]
        assert sum(pages, []) == _order(negative)
        even = [r for r in rows if r.id in {f"p-{n:03d}" for n in range(0, 130, 2)}]
        pages = _walk(http, limit=25, q="EVEN")
        assert sum(pages, []) == _order(even) and len(pages) == 3
        # An exact multiple of the page: the last page says there is no more.
        assert [len(p) for p in _walk(http, limit=65)] == [65, 65]
        r = http.get("/v1/search", params={"cursor": "not-a-cursor"})
        assert r.status_code == 422, r.text
        # An id search is in id order: its cursor resumes after the last id.
        assert sum(_walk(http, id="p-", limit=40), []) == sorted(r.id for r in rows)


def _page_state(driver: WebDriver) -> dict[str, Any]:
    return dict(driver.execute_script(
        "const o = document.getElementById('older'), n = document.getElementById('newer');"
        "return {older: !!o && !o.disabled && !o.hidden, newer: !!n && !n.disabled && !n.hidden,"
        " page: (document.getElementById('page') || {}).textContent || ''};"))


@pytest.mark.slow
def test_older_and_newer_page_the_table(redis_url: str, sqlite_url: str, tmp_path: Path,
                                        api_factory: Any,
                                        browser: Callable[..., WebDriver]) -> None:
    """Older shows the next 50 rows (a keyset page: refreshes keep it while new rows
    arrive, or while a filter is being typed), Newer goes back, by mouse or keyboard; a
    filter applied goes back to the first page, and pages that filter's rows."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url,
                        queue=f"bst-dash-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "c"))
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    now = dt.datetime.now(dt.timezone.utc)
    rows = _rows(now)
    store.upsert(rows)
    order = _order(rows)
    driver = browser(1280, 1000)
    driver.get(api_factory(settings).url + "/?refresh=300")
    _until(driver, lambda: _table_ids(driver) == order[:50], "the first page")
    assert _page_state(driver)["older"] and not _page_state(driver)["newer"]
    driver.find_element(By.ID, "older").click()
    _until(driver, lambda: _table_ids(driver) == order[50:100], "the second page")
    # New rows arrive: the second page stays as it is across refreshes.
    store.upsert([ResultRecord(id=f"new-{n}", text_sha256="0" * 64, text_chars=3, model="m",
                               status="done", label="positive", score=0.5, source="web",
                               text="new", finished_at=dt.datetime.now(dt.timezone.utc))
                  for n in range(5)])
    before = driver.execute_script("return document.body.dataset.refreshed")
    _until(driver, lambda: driver.execute_script("return document.body.dataset.refreshed")
           != before, "a refresh")
    assert _table_ids(driver) == order[50:100]
    assert "51" in _page_state(driver)["page"] and "100" in _page_state(driver)["page"]
    # A filter being typed is not applied by the refreshes meanwhile (an id search pages
    # in id order: this page's cursor is no cursor of it).
    driver.find_element(By.ID, "id").send_keys("p-1")
    refreshed = driver.execute_script("return document.body.dataset.refreshed")
    _until(driver, lambda: driver.execute_script("return document.body.dataset.refreshed")
           != refreshed, "a refresh")
    assert _table_ids(driver) == order[50:100]
    assert driver.find_element(By.ID, "error").is_displayed() is False
    driver.find_element(By.ID, "id").clear()
    # The keyboard pages too; on the last page the focus moves from Older (gone) to Newer.
    driver.find_element(By.ID, "older").send_keys(Keys.ENTER)
    _until(driver, lambda: _table_ids(driver) == order[100:], "the last page")
    assert not _page_state(driver)["older"] and _page_state(driver)["newer"]
    assert driver.switch_to.active_element.get_attribute("id") == "newer"
    driver.find_element(By.ID, "newer").click()
    _until(driver, lambda: _table_ids(driver) == order[50:100], "back to the second page")
    # A filter applied starts again at the newest of its rows.
    driver.find_element(By.ID, "label").send_keys("negative", Keys.ENTER)
    negative = [i for i in order if i in {r.id for r in rows if r.label == "negative"}]
    _until(driver, lambda: _table_ids(driver) == negative, "the negative rows, first page")
    assert not _page_state(driver)["older"] and not _page_state(driver)["newer"]
    store.close()
