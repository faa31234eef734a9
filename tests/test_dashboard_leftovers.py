"""Dashboard leftovers: counts worded in the singular when there is one, the offered labels
and sources as the driver reports them (the fields' datalists), a text search that runs out
of its read window before a page fills, and the shown page kept in the URL.

Real ``bertstream serve`` on SQLite; the script under node (``tests/dashboard_driver.js``)
and, for the URL, a real headless browser.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from selenium.webdriver.remote.webdriver import WebDriver

from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from tests import test_dashboard_browser, test_dashboard_js
from tests.test_dashboard_browser import _table_ids, _until

browser = test_dashboard_browser.browser
page = test_dashboard_js.page
lite = test_dashboard_js.lite


def _row(i: int | str, label: str | None = "positive", *, seconds_ago: float = 60.0,
         source: str = "web", text: str = "fine",
         now: dt.datetime | None = None) -> ResultRecord:
    when = (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(seconds=seconds_ago)
    return ResultRecord(id=f"r-{i}", text_sha256="0" * 64, text_chars=len(text), model="m",
                        status="done", finished_at=when, label=label, score=0.5,
                        source=source, text=text)


def _ids(drawn: dict[str, Any]) -> list[str]:
    return [row["attrs"]["data-id"] for row in drawn["rows"]]


def test_the_driver_reports_the_offered_labels_and_sources(
        lite: tuple[Settings, ResultStore], api_factory: Any, page: Any) -> None:
    """The label and source fields are text fields offering values in datalists: the driver
    reports those lists' options."""
    settings, store = lite
    store.upsert([_row(1, "positive", source="web"), _row(2, "negative", source="news"),
                  _row(3, "zeta", source="web")])
    drawn = page(api_factory(settings).url).first
    assert drawn["error"] == "", drawn
    assert drawn["labels"] == ["negative", "positive", "zeta"], drawn["labels"]
    assert drawn["sources"] == ["news", "web"], drawn["sources"]


def test_counts_of_one_are_worded_in_the_singular(
        lite: tuple[Settings, ResultStore], api_factory: Any, page: Any) -> None:
    """"1 row in the last minute", "row 51" for a page of one row, "1 other label" in a bar
    of the labels past the chart's hundred; Chinese has no plural, but a page of one row is
    "第 51 行" there too."""
    settings, store = lite
    now = dt.datetime.now(dt.timezone.utc)
    # 51 rows of l-000, one finished in the last minute; 99 more labels of two rows each
    # and a rare one of one row, summed as "other" past the chart's 100.
    rows = [_row("fresh", "l-000", seconds_ago=10, now=now)]
    rows += [_row(f"a{n:02d}", "l-000", seconds_ago=900 + n, now=now) for n in range(50)]
    rows += [_row(f"c{n}-{k}", f"l-{n:03d}", seconds_ago=1000 + n, now=now)
             for n in range(1, 100) for k in range(2)]
    rows += [_row("rare", "zzz-rare", seconds_ago=2000, now=now)]
    store.upsert(rows)
    p = page(api_factory(settings).url)
    drawn = p.first
    assert drawn["error"] == "", drawn
    assert drawn["words"]["finished"] == "1 row in the last minute", drawn["words"]
    others = [b for b in drawn["bars"] if b.get("other")]
    assert others and all(b["title"].endswith(" · 1 other label: 1") for b in others), others
    p.event("label", value="l-000")
    older = p.event("older", type="click")
    assert older["words"]["page"] == "row 51", older["words"]
    assert _ids(older) == ["r-a49"]
    chinese = p.event("lang", type="click")
    assert chinese["words"]["page"] == "第 51 行", chinese["words"]
    assert chinese["words"]["finished"] == "1 行(最近一分钟)", chinese["words"]


def _sparse(now: dt.datetime, total: int, needles: set[int]) -> list[ResultRecord]:
    """``total`` rows a second apart (``r-00000`` newest), the texts of ``needles`` holding
    "needle"."""
    return [_row(f"{n:05d}", seconds_ago=30 + n, now=now,
                 text="a needle here" if n in needles else "hay")
            for n in range(total)]


def test_a_text_search_goes_on_past_its_read_window(settings: Settings, store: ResultStore,
                                                   api_factory: Any) -> None:
    """Fewer matches than a page among the ``scan`` rows read: ``next_cursor`` goes on from
    the last row read (``scan_ended``), so the older matches are a page away; at the
    range's end there is no cursor. SQLite and PostgreSQL."""
    now = dt.datetime.now(dt.timezone.utc)
    store.upsert(_sparse(now, 130, {5, 100}))
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=10) as http:
        first = http.get("/v1/search", params={"q": "needle", "scan": 20, "limit": 50}).json()
        assert [r["id"] for r in first["items"]] == ["r-00005"], first
        assert first["scan_ended"] is True and first["next_cursor"], first
        found, cursor, pages = [], first["next_cursor"], 1
        while cursor:
            body = http.get("/v1/search", params={"q": "needle", "scan": 20, "limit": 50,
                                                  "cursor": cursor}).json()
            found += [r["id"] for r in body["items"]]
            cursor, pages = body["next_cursor"], pages + 1
        assert found == ["r-00100"] and pages == 7, (found, pages)
        assert body["scan_ended"] is False
        # A full page goes on from its last row, as before.
        full = http.get("/v1/search", params={"q": "hay", "scan": 20, "limit": 5}).json()
        assert full["scan_ended"] is False and len(full["items"]) == 5 and full["next_cursor"]


def test_the_page_says_a_text_search_ran_out_of_rows_to_read(
        lite: tuple[Settings, ResultStore], api_factory: Any, page: Any) -> None:
    """One match among the newest 5,000 rows and one older: the page says how many matched
    among the rows read and that Older reads further back; Older finds the older one."""
    settings, store = lite
    now = dt.datetime.now(dt.timezone.utc)
    store.upsert(_sparse(now, 5030, {10, 5020}))
    p = page(api_factory(settings).url, values={"range": "24h"})
    drawn = p.do(do="batch", steps=[{"do": "set", "id": "q", "value": "needle"},
                                   {"do": "event", "id": "search", "type": "submit"}])
    assert _ids(drawn) == ["r-00010"], drawn
    assert drawn["words"]["scan-note"] == ("1 match among the 5,000 rows read; Older reads the "
                                           "5,000 rows before them."), drawn["words"]
    assert drawn["words"]["page"] == "row 1"
    older = p.event("older", type="click")
    assert _ids(older) == ["r-05020"], older
    assert older["words"]["page"] == "row 2" and older["words"]["scan-note"] == ""
    chinese = p.do(do="batch", steps=[{"do": "event", "id": "newer", "type": "click"},
                                      {"do": "event", "id": "lang", "type": "click"}])
    assert chinese["words"]["scan-note"] == ("在读取的 5,000 行中有 1 条匹配;“较旧”读取"
                                             "之前的 5,000 行。"), chinese["words"]


def _rows(now: dt.datetime) -> list[ResultRecord]:
    return [_row(f"{n:03d}", seconds_ago=30 + n, now=now) for n in range(130)]


def _page(driver: WebDriver) -> str:
    return str(driver.execute_script("return document.getElementById('page').textContent"))


@pytest.mark.slow
def test_the_shown_page_lives_in_the_url(redis_url: str, sqlite_url: str, tmp_path: Path,
                                         api_factory: Any,
                                         browser: Callable[..., WebDriver]) -> None:
    """Older writes the page's cursor (a keyset position, not a page number) to the URL: a
    reload shows the same rows, numbered and with Newer as before, while new rows arrive;
    the link opened elsewhere shows the same rows, and Newer there goes to the newest."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url,
                        queue=f"bst-dash-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "c"))
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    now = dt.datetime.now(dt.timezone.utc)
    store.upsert(_rows(now))
    order = [f"r-{n:03d}" for n in range(130)]
    url = api_factory(settings).url
    driver = browser(1280, 1000)
    driver.get(url + "/?refresh=300&label=positive")
    _until(driver, lambda: _table_ids(driver) == order[:50], "the first page")
    driver.find_element("id", "older").click()
    _until(driver, lambda: _table_ids(driver) == order[50:100], "the second page")
    driver.find_element("id", "older").click()
    _until(driver, lambda: _table_ids(driver) == order[100:], "the third page")
    query = parse_qs(urlsplit(driver.current_url).query)
    assert query["label"] == ["positive"] and len(query["cursor"]) == 1, query
    link = driver.current_url
    store.upsert([_row(f"new-{n}", now=dt.datetime.now(dt.timezone.utc), seconds_ago=0)
                  for n in range(5)])
    driver.refresh()
    _until(driver, lambda: _table_ids(driver) == order[100:], "the third page after a reload")
    _until(driver, lambda: _page(driver) == "rows 101–130", "its numbers")
    driver.find_element("id", "newer").click()
    _until(driver, lambda: _table_ids(driver) == order[50:100], "back to the second page")
    other = browser(1280, 1000)
    other.get(link)
    _until(other, lambda: _table_ids(other) == order[100:], "the third page from the link")
    assert _page(other) == "30 rows from the linked position", _page(other)
    other.find_element("id", "newer").click()
    newest = [f"r-new-{n}" for n in (4, 3, 2, 1, 0)] + order[:45]
    _until(other, lambda: _table_ids(other) == newest, "the newest page")
    assert "cursor" not in parse_qs(urlsplit(other.current_url).query)
    store.close()
