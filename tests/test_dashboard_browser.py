"""The dashboard in a real headless browser (Debian's chromium through its chromedriver):
real worker, real ``bertstream serve``, real Redis and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

from contract.results import ResultRecord, ResultStore
from contract.settings import Settings

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Where the test also copies its screenshots (the README's picture comes from here).
SCREENSHOT_DIR = "BERTSTREAM_TEST_SCREENSHOT_DIR"

TEXTS = {
    "weibo": ["这家酒店的服务很好,房间也很干净。", "快递太慢了,包装也破了,很失望。",
              "今天的天气真不错,心情很好。", "客服态度很差,再也不买了。",
              "电影的剧情很精彩,演员也很出色。", "价格有点贵,但是质量还可以。"],
    "news": ["The room was spotless and the staff were lovely.",
             "Terrible service, we waited two hours for a cold meal.",
             "Markets closed higher after a quiet session.",
             "The update fixed the battery drain on older phones."],
}


HISTORY = {"positive": ["Great battery life.", "物流很快,好评。", "Friendly staff and a quiet room.",
                        "屏幕清晰,运行流畅。"],
           "negative": ["Not worth the price.", "味道一般,不会再来。", "The app crashes at login.",
                        "售后电话一直打不通。"]}


def _history(settings: Settings) -> dict[str, dict[str, Any]]:
    """Rows finished 2 to 55 minutes ago, written straight to the store, so the chart has a
    past to draw; the real worker's rows arrive on top of them."""
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    now = dt.datetime.now(dt.timezone.utc)
    records = []
    for i in range(160):
        label = "negative" if (i * 7) % 10 < 3 + i // 40 else "positive"
        text = HISTORY[label][i % len(HISTORY[label])]
        records.append(ResultRecord(
            id=f"h-{i:03d}", text_sha256="0" * 64, text_chars=len(text), model="tiny", text=text,
            status="done", label=label, score=0.8, scores={label: 0.8},
            source=("weibo", "news", "app")[i % 3],
            finished_at=now - dt.timedelta(minutes=55 - i * 53 / 160)))
    store.upsert(records)
    store.close()
    return {r.id: r.to_json() for r in records}


@pytest.fixture
def browser() -> Iterator[Callable[..., WebDriver]]:
    """Headless chromium drivers at a given window size; all are quit at teardown."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver fonts-noto-cjk)")
    drivers: list[WebDriver] = []

    def start(width: int, height: int, phone: bool = False) -> WebDriver:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--window-size={width},{height}", "--lang=en-US"):
            options.add_argument(arg)
        if phone:  # a window cannot be narrower than about 500 px: emulate the device instead
            options.add_experimental_option("mobileEmulation", {"deviceMetrics": {
                "width": width, "height": height, "pixelRatio": 2.0, "touch": True}})
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.quit()


@pytest.fixture
def pg_settings(redis_url: str, pg_url: str, tmp_path: Path, tiny_model_dir: Path) -> Settings:
    return Settings(broker_url=redis_url, database_url=pg_url, model=str(tiny_model_dir),
                    queue=f"bst-dash-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                    max_wait_ms=20)


def _submit_and_wait(url: str, headers: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Submit every text (bulk, per source) and wait for each row; the rows by id."""
    rows: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=url, timeout=60, headers=headers) as http:
        ids: list[str] = []
        for source, texts in TEXTS.items():
            r = http.post("/v1/tasks", json={"items": texts, "source": source})
            assert r.status_code == 202, r.text
            ids += r.json()["ids"]
        for task_id in ids:
            row = http.get(f"/v1/tasks/{task_id}", params={"wait": 30}).json()
            assert row["status"] == "done", row
            rows[task_id] = row
    return rows


def _until(driver: WebDriver, check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll the page until ``check()`` is truthy (the page refreshes itself)."""
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda _d: check(), what)


# The page redraws itself while the test reads it: each read is one script, so it sees
# one drawing rather than elements that a refresh has just replaced.
def _table_ids(driver: WebDriver) -> list[str]:
    return list(driver.execute_script(
        "return Array.from(document.querySelectorAll('#results tbody tr'), r => r.dataset.id)"))


def _row_text(driver: WebDriver, task_id: str) -> str:
    return str(driver.execute_script(
        "const r = document.querySelector(`#results tr[data-id='${arguments[0]}']`);"
        "return r ? r.innerText : '';", task_id))


def _bars(driver: WebDriver) -> dict[str, int]:
    """Counts per label drawn in the chart (the bars' data attributes)."""
    return dict(driver.execute_script(
        "const out = {};"
        "for (const b of document.querySelectorAll('#chart rect.bar'))"
        "  out[b.dataset.label] = (out[b.dataset.label] || 0) + Number(b.dataset.count);"
        "return out;"))


def _counts(rows: dict[str, dict[str, Any]], source: str | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in rows.values():
        if source is None or row["source"] == source:
            out[row["label"]] = out.get(row["label"], 0) + 1
    return out


def _shot(driver: WebDriver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_DIR):
        shutil.copy(path, Path(os.environ[SCREENSHOT_DIR]) / name)
    return path


@pytest.mark.slow
def test_dashboard_shows_live_rows_and_filters(pg_settings: Settings, api_factory: Any,
                                               worker_factory: Any, browser: Any,
                                               tmp_path: Path) -> None:
    settings = pg_settings.replace(api_tokens="dash-token")
    history = _history(settings)
    worker_factory(settings)
    api = api_factory(settings)
    driver = browser(1280, 1500)
    driver.get(api.url + "/?refresh=500")
    # Tokens are configured: the page asks for one, and keeps it in localStorage.
    form = _until(driver, lambda: driver.find_element(By.ID, "token-form").is_displayed(),
                  "the token form")
    assert form
    driver.find_element(By.ID, "token-input").send_keys("dash-token")
    driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    assert driver.execute_script("return localStorage.getItem('bertstream.token')") == "dash-token"
    _until(driver, lambda: driver.find_element(By.ID, "workers-alive").text == "1",
           "one live worker")
    # The worker's model shows with the start of its revision: two models of one name differ.
    [beat] = httpx.get(api.url + "/v1/live",
                       headers={"Authorization": "Bearer dash-token"}).json()["workers"]
    assert len(beat["revision"]) >= 12, beat
    shown = driver.find_element(By.CSS_SELECTOR, "#workers li").text
    assert shown.endswith(f" · {beat['model']} @{beat['revision'][:12]}"), shown

    # Rows flow in while the page is open: it shows them without a reload.
    live = _submit_and_wait(api.url, {"Authorization": "Bearer dash-token"})
    rows = {**history, **live}
    # The table holds the newest 50 rows: the worker's first.
    _until(driver, lambda: set(_table_ids(driver)[:len(live)]) == set(live)
           and len(_table_ids(driver)) == 50, "the worker's rows in the table")
    _until(driver, lambda: _bars(driver) == _counts(rows), "the chart's counts per label")
    assert int(driver.find_element(By.ID, "finished").text) == len(live)
    assert driver.find_element(By.ID, "q-interactive").text == "0"
    first = next(iter(live))
    cells = _row_text(driver, first)
    assert rows[first]["text"] in cells and rows[first]["label"] in cells
    href = driver.execute_script(
        f"return document.querySelector(\"#results tr[data-id='{first}'] a\").href")
    assert href == f"{api.url}/v1/tasks/{first}"
    shot = _shot(driver, tmp_path, "dashboard.png")

    # The source filter (typed, or picked from its list) changes both the chart and the table.
    driver.find_element(By.ID, "source").send_keys("weibo", Keys.ENTER)
    weibo = {i for i, r in rows.items() if r["source"] == "weibo"}
    _until(driver, lambda: set(_table_ids(driver)) <= weibo
           and set(_table_ids(driver)) >= weibo & set(live), "only weibo rows")
    _until(driver, lambda: _bars(driver) == _counts(rows, "weibo"), "the chart of weibo")
    assert sum(_bars(driver).values()) == len(weibo) < len(rows)

    # Text search (Chinese), then an id prefix; the link opens the row's JSON.
    driver.find_element(By.ID, "q").send_keys("酒店")
    driver.find_element(By.CSS_SELECTOR, "#search button[type=submit]").click()
    hotel = [i for i, r in rows.items() if "酒店" in r["text"]]
    _until(driver, lambda: _table_ids(driver) == hotel, "the one hotel review")
    driver.find_element(By.ID, "q").clear()
    driver.find_element(By.ID, "source").clear()
    driver.find_element(By.ID, "id").send_keys(first[:8])
    driver.find_element(By.CSS_SELECTOR, "#search button[type=submit]").click()
    _until(driver, lambda: _table_ids(driver) == [first], "the id prefix")
    driver.execute_script(f"document.querySelector(\"#results tr[data-id='{first}'] a\").click()")
    body = _until(driver, lambda: driver.find_element(By.ID, "json-body").text, "the row's JSON")
    assert f'"id": "{first}"' in body and '"status": "done"' in body

    # Another time range: hour bars of the same rows.
    driver.find_element(By.CSS_SELECTOR, "#json-view button").click()
    Select(driver.find_element(By.ID, "range")).select_by_value("24h")
    _until(driver, lambda: _bars(driver) == _counts(rows) and len(driver.execute_script(
        "return new Set(Array.from(document.querySelectorAll('#chart rect.bar'),"
        " b => b.dataset.bucket))")) <= 2, "the chart in hour bars")

    # Chinese labels; a phone-sized window still shows the table as cards.
    driver.find_element(By.ID, "lang").click()
    _until(driver, lambda: driver.find_element(By.CSS_SELECTOR, "[data-i18n=latest]").text
           == "最新结果", "the Chinese labels")
    phone = browser(390, 844, phone=True)
    phone.get(api.url + "/?refresh=500")
    phone.execute_script("localStorage.setItem('bertstream.token', 'dash-token')")
    phone.refresh()
    _until(phone, lambda: len(_table_ids(phone)) == 50, "the rows on a phone")
    width, inner = phone.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth]")
    assert inner == 390 and width <= inner, f"the page scrolls sideways on a phone ({width}px)"
    _shot(phone, tmp_path, "dashboard-phone.png")
    assert shot.exists()


LONG_SOURCE = "https://feeds.example.com/" + "partner-feed-" * 7 + "x" * 3  # 120, unbroken
LONG_LABEL = "label_" + "very" * 14  # 62, unbroken
LONG_ID = "id-" + "0123456789abcdef" * 7  # 115, unbroken
LONG_TEXT = "The room was fine but the wifi kept dropping. " * 60 + "z" * 300
HEBREW = "השירות היה מצוין והחדר היה נקי"


def _long_rows(settings: Settings) -> None:
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    now = dt.datetime.now(dt.timezone.utc)
    rows = [(LONG_ID, "web", "positive", "short"), ("src", LONG_SOURCE, "positive", "short"),
            ("lab", "web", LONG_LABEL, "short"), ("long", "web", "negative", LONG_TEXT),
            ("he", "web", "positive", HEBREW)]
    rows += [(f"n{i}", "web", "positive", "An ordinary review.") for i in range(5)]
    store.upsert([ResultRecord(id=i, text_sha256="0" * 64, text_chars=len(text), model="m",
                               status="done", label=label, score=0.5, source=source, text=text,
                               finished_at=now - dt.timedelta(seconds=n))
                  for n, (i, source, label, text) in enumerate(rows)])
    store.close()


@pytest.mark.slow
def test_long_values_keep_the_table_readable(redis_url: str, sqlite_url: str, tmp_path: Path,
                                             api_factory: Any, browser: Any) -> None:
    """A long source, label, id or unbroken token wraps inside its own column (no column
    takes the table's width); a long text is clamped to a few lines, whole in its title and
    on a click; a right-to-left text runs right to left; every field has a name."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url,
                        queue=f"bst-dash-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "c"))
    _long_rows(settings)
    api = api_factory(settings)
    driver = browser(1280, 1000)
    driver.get(api.url + "/?refresh=500")
    _until(driver, lambda: len(_table_ids(driver)) == 10, "the rows")
    got = driver.execute_script("""
        const wrap = document.querySelector('.table-wrap'), table = document.getElementById('results');
        const widths = {};
        table.querySelectorAll('thead th').forEach((th, i) => { widths[i] = th.getBoundingClientRect().width; });
        const overflow = [];
        table.querySelectorAll('tbody td').forEach((td) => {
          for (const e of [td, ...td.querySelectorAll('*')]) {
            // Sticking out of the cell, or content spilling out of its box (not cut, as an
            // ellipsis cuts it).
            const cell = td.getBoundingClientRect(), box = e.getBoundingClientRect();
            const spills = getComputedStyle(e).overflowX === 'visible' && e.scrollWidth > e.clientWidth + 1;
            if (spills || box.right > cell.right + 1 || box.left < cell.left - 1)
              overflow.push(td.parentNode.dataset.id + ':' + td.cellIndex + ':' + e.tagName);
          }
        });
        const text = document.querySelector("#results tr[data-id='long'] td:last-child");
        const clamp = text.querySelector('[title]') || text;
        const he = document.querySelector("#results tr[data-id='he'] td:last-child");
        const heInner = he.querySelector('[dir]') || he;
        const outside = Array.from(document.querySelectorAll('#chart text')).filter((t) => {
          const b = t.getBBox(); return b.x < 0 || b.x + b.width > 800; }).map(t => t.textContent);
        const selects = ['source', 'label'].map(i => document.getElementById(i).getBoundingClientRect().width);
        return {scroll: table.scrollWidth, room: wrap.clientWidth, widths, overflow, selects, outside,
                textHeight: text.getBoundingClientRect().height, title: clamp.getAttribute('title'),
                heDirection: getComputedStyle(heInner).direction};""")
    problems = []
    if got["scroll"] > got["room"]:
        problems.append(f"the table scrolls sideways ({got['scroll']} > {got['room']} px)")
    w = got["widths"]
    if w["2"] > 220:
        problems.append(f"the source column takes {w['2']:.0f} px")
    if w["5"] < 400 or w["1"] < 100:
        problems.append(f"the text and id columns are squeezed ({w['5']:.0f}, {w['1']:.0f} px)")
    if max(got["selects"]) > 300:
        problems.append(f"a long source or label widens its filter ({got['selects']} px)")
    if got["outside"]:
        problems.append(f"axis labels run past the chart: {got['outside']}")
    if got["overflow"]:
        problems.append(f"content overflows its cell: {got['overflow']}")
    if got["textHeight"] > 140:
        problems.append(f"the long text is not clamped ({got['textHeight']:.0f} px high)")
    if got["title"] != LONG_TEXT:
        problems.append("the long text is not whole in its title")
    if got["heDirection"] != "rtl":
        problems.append(f"the Hebrew text runs {got['heDirection']}")
    # A placeholder is no name (it goes once something is typed): a label or aria-label.
    names = {i: driver.find_element(By.ID, i).accessible_name
             for i in ("q", "id", "label", "source", "range")}
    labelled = driver.execute_script(
        "return ['q', 'id', 'label', 'source', 'range'].filter(i => {"
        "  const e = document.getElementById(i);"
        "  return !e.labels.length && !e.getAttribute('aria-label'); })")
    if not all(names.values()) or labelled:
        problems.append(f"fields without a label: {labelled}, names {names}")
    assert not problems, problems
    # A click shows the whole text, and it stays open across refreshes.
    driver.find_element(By.CSS_SELECTOR, "#results tr[data-id='long'] td:last-child > *").click()
    tall = "return document.querySelector(\"#results tr[data-id='long'] td:last-child\")" \
           ".getBoundingClientRect().height"
    _until(driver, lambda: driver.execute_script(tall) > 400, "the whole text")
    before = driver.execute_script("return document.body.dataset.refreshed")
    _until(driver, lambda: driver.execute_script("return document.body.dataset.refreshed")
           != before, "a refresh")
    assert driver.execute_script(tall) > 400
    _shot(driver, tmp_path, "dashboard-long-values.png")
    # On a phone the rows are cards: nothing long pushes the page sideways.
    phone = browser(390, 844, phone=True)
    phone.get(api.url + "/?refresh=500")
    _until(phone, lambda: len(_table_ids(phone)) == 10, "the rows on a phone")
    width, inner = phone.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth]")
    assert inner == 390 and width <= inner, f"the page scrolls sideways on a phone ({width}px)"
