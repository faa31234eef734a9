"""The dashboard's filters as an analyst uses them, in a real headless browser on a real
``bertstream serve``: a label past the chart's top 100 typed into the label field, a label
the API would refuse caught on the page, the filters kept in the page's URL (a reload and a
shared link show the same rows), and the stale-data note following the language switch."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.select import Select

from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from tests import test_dashboard_browser
from tests.tcpproxy import TcpProxy
from tests.test_dashboard_browser import _table_ids, _until

#: The headless chromium fixture of the dashboard's browser test.
browser = test_dashboard_browser.browser

#: 100 labels of two rows each fill the chart's top 100: the rare ones are summed as other.
COMMON = [f"topic_{n:03d}" for n in range(100)]
RARE = "zz_rare"
#: 64 code points (the API's limit) but 128 UTF-16 units: a browser's maxlength counts units.
ASTRAL = "\U0001f600" * 64


def _row(i: str, label: str | None, *, source: str = "web", minutes_ago: float = 1.0,
         text: str = "fine") -> ResultRecord:
    return ResultRecord(id=i, text_sha256="0" * 64, text_chars=len(text), model="m",
                        status="done", label=label, score=0.5, source=source, text=text,
                        finished_at=dt.datetime.now(dt.timezone.utc)
                        - dt.timedelta(minutes=minutes_ago))


@pytest.fixture
def served(redis_url: str, sqlite_url: str, tmp_path: Path, api_factory: Any) -> Any:
    """``bertstream serve`` on SQLite holding the rows: the common labels (two rows each,
    half on ``news``), one rare label and the 64-code-point one, all in the last hour."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url,
                        queue=f"bst-dash-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "c"))
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    rows = [_row(f"c-{label}-{k}", label, source=("web", "news")[k], minutes_ago=2 + k)
            for label in COMMON for k in range(2)]
    rows += [_row("rare-1", RARE, minutes_ago=30, text="the rare one"),
             _row("astral-1", ASTRAL, minutes_ago=31)]
    store.upsert(rows)
    store.close()
    return api_factory(settings)


@pytest.fixture
def many_sources(redis_url: str, sqlite_url: str, tmp_path: Path, api_factory: Any) -> Any:
    """``bertstream serve`` on SQLite with rows of 202 sources: ``a-000`` .. ``a-199`` fill
    the 200 the page's source list holds (in code point order), ``weibo`` and a source of
    128 characters (the longest a row holds) are past them."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url,
                        queue=f"bst-dash-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "c"))
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    rows = [_row(f"a-{n:03d}", "positive", source=f"a-{n:03d}", minutes_ago=2) for n in range(200)]
    rows += [_row("weibo-1", "negative", source="weibo", minutes_ago=30),
             _row("weibo-2", "neutral", source="weibo", minutes_ago=31),
             _row("long-1", "negative", source=LONG_SOURCE, minutes_ago=32)]
    store.upsert(rows)
    store.close()
    return api_factory(settings)


LONG_SOURCE = "feed-" + "\u00e9" * 123


def _submit(driver: WebDriver) -> None:
    driver.find_element(By.CSS_SELECTOR, "#search button[type=submit]").click()


def _type_label(driver: WebDriver, label: str) -> None:
    field = driver.find_element(By.ID, "label")
    # send_keys cannot type past the BMP in chromedriver: set the value as a paste would
    # (clear() would apply the emptied field first: a change event).
    driver.execute_script("arguments[0].value = arguments[1];"
                          "arguments[0].dispatchEvent(new Event('input'))", field, label)


@pytest.mark.slow
def test_a_label_past_the_top_100_can_be_typed(served: Any, browser: Callable[..., WebDriver],
                                               ) -> None:
    """The label field offers the chart's labels (a datalist) and takes any typed label:
    one summed in "other labels" by the chart still filters the table."""
    driver = browser(1280, 1000)
    driver.get(served.url + "/?refresh=500")
    _until(driver, lambda: len(_table_ids(driver)) == 50, "the rows")
    offered = _until(driver, lambda: driver.execute_script(
        "const f = document.getElementById('label'); return f.list &&"
        " Array.from(f.list.options, o => o.value)"), "the label field's datalist")
    assert set(COMMON) <= set(offered) and RARE not in offered, offered
    _type_label(driver, RARE)
    _submit(driver)
    _until(driver, lambda: _table_ids(driver) == ["rare-1"], "the rare label's row")
    # Enter in the field searches too, and a picked option is a typed label like another.
    field = driver.find_element(By.ID, "label")
    field.clear()
    field.send_keys("topic_042", Keys.ENTER)
    _until(driver, lambda: sorted(_table_ids(driver)) == ["c-topic_042-0", "c-topic_042-1"],
           "topic_042's rows")
    # Emptied, the field filters nothing.
    field.clear()
    field.send_keys(Keys.ENTER)
    _until(driver, lambda: len(_table_ids(driver)) == 50, "every label again")


@pytest.mark.slow
def test_a_label_is_checked_as_the_api_checks_it(served: Any,
                                                 browser: Callable[..., WebDriver]) -> None:
    """A label of 64 code points is one the API takes (even past 64 UTF-16 units); one of
    65 is refused on the page, saying why, without a request the API would refuse."""
    driver = browser(1280, 1000)
    driver.get(served.url + "/?refresh=60000")
    _until(driver, lambda: len(_table_ids(driver)) == 50, "the rows")
    _type_label(driver, ASTRAL)
    _submit(driver)
    _until(driver, lambda: _table_ids(driver) == ["astral-1"], "the 64-code-point label's row")
    assert driver.find_element(By.ID, "error").is_displayed() is False
    driver.execute_script("window.sent = []; const f = window.fetch;"
                          "window.fetch = (u, o) => { window.sent.push(u); return f(u, o); }")
    _type_label(driver, "x" * 65)
    _submit(driver)
    error = _until(driver, lambda: driver.find_element(By.ID, "error").text, "the error")
    assert "64" in error and "HTTP" not in error, error
    assert driver.execute_script("return document.getElementById('label').matches(':invalid')")
    sent = driver.execute_script("return window.sent")
    assert not [u for u in sent if u.startswith("/v1/search")], sent
    # The rows on screen are the last good read's, marked as such.
    assert _table_ids(driver) == ["astral-1"]
    assert driver.find_element(By.ID, "results").get_attribute("data-stale") == "true"
    _type_label(driver, RARE)
    _submit(driver)
    _until(driver, lambda: _table_ids(driver) == ["rare-1"], "the rare label's row")
    assert not driver.execute_script(
        "return document.getElementById('label').matches(':invalid')")
    assert driver.find_element(By.ID, "error").is_displayed() is False


def _type(driver: WebDriver, field_id: str, value: str, then: str = "") -> None:
    """Set a field's value as a paste would, then send ``then`` (Enter) to it."""
    field = driver.find_element(By.ID, field_id)
    driver.execute_script("arguments[0].value = arguments[1];"
                          "arguments[0].dispatchEvent(new Event('input'))", field, value)
    if then:
        field.send_keys(then)


def _chart_labels(driver: WebDriver) -> dict[str, int]:
    return dict(driver.execute_script(
        "const out = {};"
        "for (const b of document.querySelectorAll('#chart rect.bar'))"
        "  out[b.dataset.label] = (out[b.dataset.label] || 0) + Number(b.dataset.count);"
        "return out;"))


@pytest.mark.slow
def test_a_source_past_the_first_200_can_be_typed(many_sources: Any,
                                                  browser: Callable[..., WebDriver]) -> None:
    """The source field offers the first 200 sources (a datalist) and takes any typed one:
    a source past them filters the chart and the table; one longer than the API takes is
    refused on the page, without a request."""
    driver = browser(1280, 1000)
    driver.get(many_sources.url + "/?refresh=60000")
    _until(driver, lambda: len(_table_ids(driver)) == 50, "the rows")
    offered = _until(driver, lambda: driver.execute_script(
        "const f = document.getElementById('source'); return f.list &&"
        " f.list.options.length && Array.from(f.list.options, o => o.value)"),
        "the source field's datalist")
    assert offered == [f"a-{n:03d}" for n in range(200)], offered[-3:]
    _type(driver, "source", "weibo", Keys.ENTER)
    _until(driver, lambda: sorted(_table_ids(driver)) == ["weibo-1", "weibo-2"],
           "weibo's rows")
    _until(driver, lambda: _chart_labels(driver) == {"negative": 1, "neutral": 1},
           "weibo's chart")
    _type(driver, "source", LONG_SOURCE, Keys.ENTER)
    _until(driver, lambda: _table_ids(driver) == ["long-1"], "the long source's row")
    driver.execute_script("window.sent = []; const f = window.fetch;"
                          "window.fetch = (u, o) => { window.sent.push(u); return f(u, o); }")
    _type(driver, "source", "x" * 257, Keys.ENTER)  # the API takes 256
    error = _until(driver, lambda: driver.find_element(By.ID, "error").text, "the error")
    assert "256" in error and "HTTP" not in error, error
    sent = driver.execute_script("return window.sent")
    assert not [u for u in sent if "source=" in u], sent
    assert driver.execute_script("return document.getElementById('source').matches(':invalid')")
    assert driver.find_element(By.ID, "chart").get_attribute("data-stale") == "true"
    # Emptied, the field filters nothing.
    _type(driver, "source", "", Keys.ENTER)
    _until(driver, lambda: len(_table_ids(driver)) == 50, "every source again")
    assert driver.find_element(By.ID, "error").is_displayed() is False


def _query(driver: WebDriver) -> dict[str, list[str]]:
    return parse_qs(urlsplit(driver.current_url).query)


def _form(driver: WebDriver) -> dict[str, str]:
    return dict(driver.execute_script(
        "const out = {}; for (const i of ['source', 'range', 'label', 'q', 'id'])"
        "  out[i] = document.getElementById(i).value; return out;"))


@pytest.mark.slow
def test_the_filters_live_in_the_url(served: Any, browser: Callable[..., WebDriver]) -> None:
    """Each filter is written to the page's URL as it is applied: a reload, and the link
    opened in another browser, show the same filters and the same rows; the refresh
    interval stays in the URL."""
    driver = browser(1280, 1000)
    driver.get(served.url + "/?refresh=500")
    _until(driver, lambda: len(_table_ids(driver)) == 50, "the rows")
    _type(driver, "source", "news", Keys.ENTER)
    Select(driver.find_element(By.ID, "range")).select_by_value("24h")
    _type_label(driver, "topic_007")
    driver.find_element(By.ID, "q").send_keys("fin")
    _submit(driver)
    _until(driver, lambda: _table_ids(driver) == ["c-topic_007-1"], "the filtered row")
    want = {"source": "news", "range": "24h", "label": "topic_007", "q": "fin", "id": ""}
    query = _until(driver, lambda: _query(driver).get("label") and _query(driver), "the URL")
    assert query == {"refresh": ["500"], "source": ["news"], "range": ["24h"],
                     "label": ["topic_007"], "q": ["fin"]}, query
    link = driver.current_url
    driver.refresh()
    _until(driver, lambda: _table_ids(driver) == ["c-topic_007-1"], "the same row after a reload")
    assert _form(driver) == want
    other = browser(1280, 1000)
    other.get(link)
    _until(other, lambda: _table_ids(other) == ["c-topic_007-1"], "the same row from the link")
    assert _form(other) == want
    # A filter cleared leaves the URL; a range the page does not know reads as 1 hour.
    driver.find_element(By.ID, "q").clear()
    _submit(driver)
    _until(driver, lambda: "q" not in _query(driver), "the text gone from the URL")
    other.get(served.url + "/?range=5y&refresh=500")
    _until(other, lambda: len(_table_ids(other)) == 50, "the rows")
    assert _form(other)["range"] == "1h"


@pytest.mark.slow
def test_the_stale_note_follows_the_language_switch(
        redis_url: str, sqlite_url: str, tmp_path: Path, api_factory: Any,
        browser: Callable[..., WebDriver]) -> None:
    """After a failed refresh the note says since when the rows are; a switch of language
    rewrites it (and the "updated" line) at once, even while the next refresh hangs."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url,
                        queue=f"bst-dash-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "c"))
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    store.upsert([_row(f"r{i}", "positive") for i in range(3)])
    store.close()
    api = api_factory(settings)
    port = int(api.url.rsplit(":", 1)[1])
    cut = TcpProxy("127.0.0.1", port)
    try:
        driver = browser(1280, 1000)
        driver.get(f"http://127.0.0.1:{cut.port}/?refresh=500")
        _until(driver, lambda: len(_table_ids(driver)) == 3, "the rows")
        assert driver.find_element(By.ID, "updated").text.startswith("updated ")
        cut.down()
        note = _until(driver, lambda: driver.find_element(By.ID, "stale").text, "the stale note")
        assert note.startswith("Could not refresh"), note
        cut.up()
        cut.freeze()  # the switch's own refresh never answers: only the switch can redraw
        driver.find_element(By.ID, "lang").click()
        got = driver.execute_script(
            "return [document.getElementById('stale').textContent,"
            " document.getElementById('updated').textContent,"
            " document.querySelector('#results tbody td').dataset.th]")
        assert got[0].startswith("无法刷新"), got
        assert got[1].startswith("更新于"), got
        assert got[2] == "完成时间", got
        assert sorted(_table_ids(driver)) == ["r0", "r1", "r2"]
    finally:
        cut.close()
