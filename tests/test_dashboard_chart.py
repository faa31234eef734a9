"""The label-mix chart as drawn by a real headless browser on a real ``bertstream serve``:
what sits where once the SVG is laid out."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.remote.webdriver import WebDriver

from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from tests import test_dashboard_browser
from tests.test_dashboard_browser import _until

#: The headless chromium fixture of the dashboard's browser test.
browser = test_dashboard_browser.browser


@pytest.mark.slow
def test_the_utc_note_stays_clear_of_the_bars(redis_url: str, sqlite_url: str, tmp_path: Path,
                                              api_factory: Any,
                                              browser: Callable[..., WebDriver]) -> None:
    """Day buckets say they are UTC days in a note at the chart's top right: the tallest
    bar (often today's, at the right) stops below the note rather than under it."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url,
                        queue=f"bst-dash-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "c"))
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    now = dt.datetime.now(dt.timezone.utc)
    store.upsert([ResultRecord(id=f"r{i}", text_sha256="0" * 64, text_chars=1, model="m",
                               status="done", label="positive", score=0.5, source="web",
                               text="x", finished_at=now - dt.timedelta(minutes=1 + i))
                  for i in range(4)])
    store.close()
    driver = browser(1280, 1000)
    driver.get(api_factory(settings).url + "/?refresh=500&range=30d")
    got = _until(driver, lambda: driver.execute_script(
        "const note = document.querySelector('#chart text.note');"
        "const bars = Array.from(document.querySelectorAll('#chart rect.bar'));"
        "if (!note || !bars.length) return null;"
        "const n = note.getBBox();"
        "return {noteBottom: n.y + n.height, noteLeft: n.x,"
        " barTop: Math.min(...bars.map(b => b.getBBox().y)),"
        " barRight: Math.max(...bars.map(b => b.getBBox().x + b.getBBox().width))};"),
        "the 30-day chart")
    assert got["barRight"] > got["noteLeft"], got  # today's bar is under the note's column
    assert got["barTop"] >= got["noteBottom"], got
