"""The dashboard's script (``api/static/app.js``) under node with a minimal DOM of its own
(``tests/dashboard_driver.js``), against a real ``bertstream serve`` on SQLite and
PostgreSQL: what its refreshes draw as the rows change under it, as its clock, time zone
and timers go, and what it shows when a request fails."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from tests.tcpproxy import TcpProxy

HERE = Path(__file__).parent
APP_JS = HERE.parent / "api" / "static" / "app.js"
HOUR_MS = 3_600_000


class Page:
    """The script in a node process: ``page()`` fires its pending timers (one refresh per
    timer chain), ``page.do(...)`` runs a driver command; both return what it then shows."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.first: dict[str, Any] = self._read()  # what the page's load drew

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the driver ended (exit {self.proc.poll()})"
        return dict(json.loads(line))

    def do(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def __call__(self) -> dict[str, Any]:
        return self.do(do="tick")

    def event(self, id: str, type: str = "change", **more: Any) -> dict[str, Any]:  # noqa: A002
        return self.do(do="event", id=id, type=type, **more)


@pytest.fixture
def page() -> Iterator[Callable[..., Page]]:
    """Start the script on a server URL (``clock_ms``: this browser's clock minus the real
    one; ``tz``: its time zone; ``values``: the form's values at load, by element id;
    ``search``: the page URL's query string); the
    driver processes are stopped at teardown."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("the dashboard script test needs node (apt-get install -y nodejs)")
    pages: list[Page] = []

    def start(url: str, *, clock_ms: int = 0, tz: str = "UTC",
              values: dict[str, str] | None = None, search: str = "") -> Page:
        proc = subprocess.Popen([node, str(HERE / "dashboard_driver.js"), str(APP_JS), url],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={"PATH": "/usr/bin:/bin", "TZ": tz,
                                     "DRIVER_CLOCK_MS": str(clock_ms),
                                     "DRIVER_SEARCH": search,
                                     "DRIVER_VALUES": json.dumps(values or {})})
        pages.append(Page(proc))
        return pages[-1]

    yield start
    for p in pages:
        if p.proc.stdin is not None:
            p.proc.stdin.close()
        p.proc.terminate()
        p.proc.wait(timeout=10)
        if p.proc.stdout is not None:
            p.proc.stdout.close()


class Proxy:
    """A reverse proxy in front of ``bertstream serve`` (a real socket and real HTTP): it
    forwards every request, unless ``rule(path)`` says to answer otherwise: ``("html",
    status)`` answers an HTML error page as nginx does, ``("delay", seconds)`` forwards
    late."""

    def __init__(self, target: str) -> None:
        self.rule: Callable[[str], tuple[str, float] | None] = lambda _path: None
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                rule = proxy.rule(self.path)
                if rule is not None and rule[0] == "html":
                    status = int(rule[1])
                    body = (f"<html><head><title>{status}</title></head><body><center><h1>"
                            f"{status}</h1></center><hr><center>nginx</center></body>"
                            "</html>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if rule is not None and rule[0] == "delay":
                    time.sleep(rule[1])
                r = httpx.get(target + self.path, headers={
                    k: v for k, v in self.headers.items() if k.lower() in ("authorization", "accept")})
                self.send_response_only(r.status_code, r.reason_phrase)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                         "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy() -> Iterator[Callable[[str], Proxy]]:
    made: list[Proxy] = []

    def start(target: str) -> Proxy:
        made.append(Proxy(target))
        return made[-1]

    yield start
    for p in made:
        p.close()


@pytest.fixture
def lite(redis_url: str, sqlite_url: str, tmp_path: Path) -> Iterator[tuple[Settings, ResultStore]]:
    """Settings on SQLite (the script's logic does not depend on the database) and its store."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url,
                        queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"))
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    yield settings, store
    store.close()


def _rows(model: str, when: dt.datetime) -> list[ResultRecord]:
    return [ResultRecord(id=f"live{i}", text_sha256="0" * 64, text_chars=1, model=model,
                         status="done", finished_at=when, label="positive", score=0.9,
                         source="live") for i in range(3)]


def _row(i: int | str, label: str | None = "positive", *, minutes_ago: float = 1.0,
         source: str | None = "web", text: str = "fine", now: dt.datetime | None = None,
         ) -> ResultRecord:
    when = (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(minutes=minutes_ago)
    return ResultRecord(id=f"r-{i}", text_sha256="0" * 64, text_chars=len(text), model="m",
                        status="done", finished_at=when, label=label, score=0.5,
                        source=source, text=text)


def _per_bucket(drawn: dict[str, Any]) -> dict[str, int]:
    assert drawn["error"] == "", drawn
    out: dict[str, int] = {}
    for bar in drawn["bars"]:
        out[bar["bucket"]] = out.get(bar["bucket"], 0) + int(bar["count"])
    return out


def _per_label(drawn: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for bar in drawn["bars"]:
        if not bar.get("other"):
            out[bar["label"]] = out.get(bar["label"], 0) + int(bar["count"])
    return out


def _row_ids(drawn: dict[str, Any]) -> list[str]:
    return [row["attrs"]["data-id"] for row in drawn["rows"]]


def _live_reads(drawn: dict[str, Any]) -> int:
    return sum(1 for r in drawn["requests"] if r.startswith("/v1/live"))


def test_the_label_mix_follows_a_rescore_out_of_an_ended_bucket(
        settings: Settings, store: ResultStore, api_factory: Any, page: Any) -> None:
    """A re-score moves each task's latest row to a later bucket: the bucket that had
    ended loses the tasks, and the chart counts each task once."""
    now = dt.datetime.now(dt.timezone.utc)
    store.upsert(_rows("m", now - dt.timedelta(minutes=20)))
    refresh = page(api_factory(settings).url)
    before = _per_bucket(refresh.first)
    assert list(before.values()) == [3]
    store.upsert(_rows("m2", dt.datetime.now(dt.timezone.utc)))
    after = _per_bucket(refresh())
    assert sum(after.values()) == 3 and len(after) == 1 and after.keys() != before.keys(), after


PROPERTY_LABELS = {"constructor": 3, "__proto__": 2, "toString": 1, "hasOwnProperty": 4,
                   "positive": 1}


def test_labels_named_like_object_properties_get_colours_totals_and_the_filter(
        lite: tuple[Settings, ResultStore], api_factory: Any, page: Any) -> None:
    """Labels are the model's own names: one called ``constructor`` or ``__proto__`` is a
    label like any other, with its colour, its total and share, and its filter."""
    settings, store = lite
    store.upsert([_row(f"{label}-{n}", label) for label, count in PROPERTY_LABELS.items()
                  for n in range(count)])
    p = page(api_factory(settings).url)
    drawn = p.first
    assert drawn["error"] == "", drawn
    assert _per_label(drawn) == PROPERTY_LABELS
    for bar in drawn["bars"]:
        assert re.fullmatch(r"#[0-9a-f]{6}", bar["fill"]), bar
    legend = {item["attrs"]["data-label"]: item for item in drawn["legend"]}
    assert {k: int(v["attrs"]["data-count"]) for k, v in legend.items()} == PROPERTY_LABELS
    total = sum(PROPERTY_LABELS.values())
    for label, count in PROPERTY_LABELS.items():
        assert legend[label]["text"] == f"{label} {count} ({round(100 * count / total)}%)"
        assert re.fullmatch(r"#[0-9a-f]{6}", legend[label]["color"]), legend[label]
    assert len({item["color"] for item in drawn["legend"]}) == len(PROPERTY_LABELS)
    # The table's tags have the legend's colours; the filter reads one label's rows.
    for row in drawn["rows"]:
        tag = next(c for c in row["cells"][3]["inner"] if c["attrs"].get("class") == "tag")
        label = row["cells"][3]["text"]
        assert tag["style"]["background"] == legend[label]["color"], row
    for label, count in PROPERTY_LABELS.items():
        filtered = p.event("label", value=label)
        assert sorted(_row_ids(filtered)) == [f"r-{label}-{n}" for n in range(count)], filtered


def test_one_timer_chain_whatever_starts_a_refresh(
        lite: tuple[Settings, ResultStore], api_factory: Any, page: Any, proxy: Any) -> None:
    """A refresh started while another is in flight replaces it: one timer is pending
    afterwards, each later tick reads each route once, and the answers of the replaced
    refresh (slow here) never draw over the newer ones."""
    settings, store = lite
    store.upsert([_row(i, source="web") for i in range(4)] +
                 [_row(f"w{i}", "negative", source="weibo") for i in range(2)])
    front = proxy(api_factory(settings).url)
    p = page(front.url)
    assert p.first["timers"] == 1 and len(_row_ids(p.first)) == 6
    # A tick's refresh is in flight when the filter changes.
    slow = threading.Event()
    front.rule = lambda path: ("delay", 1.5) if slow.is_set() and "source=" not in path \
        and not path.startswith("/v1/live") else None
    slow.set()
    drawn = p.do(do="batch", steps=[{"do": "tick"},
                                    {"do": "event", "id": "source", "type": "change",
                                     "value": "weibo"}])
    time.sleep(2)  # the slow answers of the replaced refresh have arrived by now
    drawn = p.do(do="batch", steps=[])
    slow.clear()
    assert drawn["timers"] == 1, drawn["timers"]
    assert sorted(_row_ids(drawn)) == ["r-w0", "r-w1"], drawn["rows"]
    assert _per_label(drawn) == {"negative": 2}
    # More starts while a refresh is in flight: the search, the tab shown again.
    drawn = p.do(do="batch", steps=[{"do": "tick"}, {"do": "event", "id": "search",
                                                      "type": "submit"},
                                    {"do": "event", "id": "document",
                                     "type": "visibilitychange"}])
    assert drawn["timers"] == 1, drawn["timers"]
    for _ in range(3):
        drawn = p()
        assert drawn["timers"] == 1 and _live_reads(drawn) == 1, drawn["requests"]


def test_day_buckets_are_labelled_with_their_utc_date(
        lite: tuple[Settings, ResultStore], api_factory: Any, page: Any) -> None:
    """Day buckets start at UTC midnight: west of UTC the browser's local date of that
    instant is the day before, so the axis and the bars' titles give the UTC date."""
    settings, store = lite
    now = dt.datetime.now(dt.timezone.utc)
    store.upsert([_row(i, minutes_ago=1 + i * 24 * 60, now=now) for i in range(3)])
    p = page(api_factory(settings).url, tz="America/Los_Angeles")
    drawn = p.event("range", value="30d")
    assert drawn["error"] == "", drawn
    days = [(now - dt.timedelta(minutes=1 + i * 24 * 60)).date() for i in range(3)]
    assert sorted(_per_bucket(drawn)) == sorted(f"{d.isoformat()}T00:00:00.000Z" for d in days)
    texts = [t["text"] for t in drawn["texts"]]
    today = dt.datetime.now(dt.timezone.utc).date()
    assert f"{today:%b} {today.day}" in texts, texts  # the last tick: today, in UTC
    assert any("UTC" in t for t in texts), texts
    for bar in drawn["bars"]:
        day = dt.date.fromisoformat(bar["bucket"][:10])
        assert bar["title"].startswith(f"{day:%b} {day.day}, {day.year}"), bar


def test_the_other_group_is_drawn_apart_from_a_label_called_other(
        lite: tuple[Settings, ResultStore], api_factory: Any, page: Any) -> None:
    """Past the stats limit (100 labels) the rest come summed as ``other``: the chart
    and the legend show them as their own series, not as the label ``other``."""
    settings, store = lite
    now = dt.datetime.now(dt.timezone.utc)  # one bucket: the rest are 3 labels there
    rows = [_row(f"o{n}", "other", now=now) for n in range(5)]
    rows += [_row(f"l{n:03d}", f"l{n:03d}", now=now) for n in range(102)]  # l099..l101 are summed
    store.upsert(rows)
    drawn = page(api_factory(settings).url).first
    assert drawn["error"] == "", drawn
    labels = _per_label(drawn)
    assert labels["other"] == 5 and len(labels) == 100
    others = [b for b in drawn["bars"] if b.get("other")]
    assert sum(int(b["count"]) for b in others) == 3, drawn["bars"][-3:]
    assert {b["fill"] for b in others}.isdisjoint({b["fill"] for b in drawn["bars"]
                                                   if b.get("label") == "other"})
    legend = [item for item in drawn["legend"] if item["attrs"].get("data-other")]
    assert len(legend) == 1 and legend[0]["attrs"]["data-count"] == "3", drawn["legend"][-2:]
    assert legend[0]["text"] == "other labels 3 (3%)", legend[0]
    assert legend[0]["attrs"].get("data-label") is None
    assert all(b["title"].endswith(" · 3 other labels: 3") for b in others), others
    named = [i for i in drawn["legend"] if i["attrs"].get("data-label") == "other"]
    assert len(named) == 1 and named[0]["text"] == "other 5 (5%)"


def test_an_error_marks_the_rows_shown_as_stale(
        lite: tuple[Settings, ResultStore], api_factory: Any, page: Any) -> None:
    """A refused search (422) shows its status and message; the rows of the last good read
    stay but are marked as such, and the next good read clears the mark."""
    settings, store = lite
    store.upsert([_row(i) for i in range(3)])
    p = page(api_factory(settings).url)
    assert len(p.first["rows"]) == 3 and "data-stale" not in p.first["results"]["attrs"]
    drawn = p.do(do="batch", steps=[{"do": "set", "id": "q", "value": "x" * 201},
                                    {"do": "event", "id": "search", "type": "submit"}])
    _assert_stale(drawn)
    assert drawn["error"].startswith("HTTP 422 Unprocessable"), drawn["error"]
    assert "query.q" in drawn["error"], drawn["error"]
    drawn = p.do(do="batch", steps=[{"do": "set", "id": "q", "value": ""},
                                    {"do": "event", "id": "search", "type": "submit"}])
    assert drawn["error"] == "" and len(drawn["rows"]) == 3
    assert "data-stale" not in drawn["results"]["attrs"] and drawn["stale"]["hidden"]


def _assert_stale(drawn: dict[str, Any]) -> None:
    """No rows, or rows marked stale with a visible note saying so."""
    if drawn["rows"]:
        assert "data-stale" in drawn["results"]["attrs"], drawn["results"]
        assert not drawn["stale"]["hidden"] and drawn["stale"]["text"], drawn["stale"]


@pytest.mark.slow
def test_a_database_outage_marks_the_page_stale(pg_url: str, redis_url: str, tmp_path: Path,
                                                api_factory: Any, page: Any) -> None:
    """A 503 (the database unreachable, through a proxy the test cuts) shows the status and
    the API's message; the table and the chart say that what they show is old."""
    store = ResultStore.from_url(pg_url)
    store.create_schema()
    store.upsert([_row(i) for i in range(3)])
    store.close()
    url = sa.engine.make_url(pg_url)
    cut = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        proxied = url.set(host="127.0.0.1", port=cut.port).render_as_string(hide_password=False)
        settings = Settings(broker_url=redis_url, database_url=proxied,
                            queue=f"bst-test-{uuid.uuid4().hex[:8]}",
                            cache_dir=str(tmp_path / "cache"))
        p = page(api_factory(settings).url)
        assert len(p.first["rows"]) == 3
        cut.down()
        drawn = p.do(do="event", id="search", type="submit")
        _assert_stale(drawn)
        assert drawn["error"].startswith("HTTP 503 Service Unavailable"), drawn["error"]
        assert "database cannot be reached" in drawn["error"]
        assert drawn["chart"]["attrs"].get("data-stale") == "true", drawn["chart"]
        cut.up()
        drawn = p.do(do="event", id="search", type="submit")
        assert drawn["error"] == "" and len(drawn["rows"]) == 3
        assert "data-stale" not in drawn["results"]["attrs"]
        assert "data-stale" not in drawn["chart"]["attrs"]
    finally:
        cut.close()


def test_an_html_error_page_shows_its_http_status(
        lite: tuple[Settings, ResultStore], api_factory: Any, page: Any, proxy: Any) -> None:
    """A reverse proxy's own error page (HTML, 502) is reported by its status, not as a
    JSON parse error."""
    settings, store = lite
    store.upsert([_row(i) for i in range(2)])
    front = proxy(api_factory(settings).url)
    p = page(front.url)
    assert p.first["error"] == ""
    front.rule = lambda path: ("html", 502) if path.startswith("/v1/search") else None
    drawn = p.event("search", type="submit")
    assert drawn["error"] == "HTTP 502 Bad Gateway", drawn["error"]
    _assert_stale(drawn)
    front.rule = lambda path: ("html", 504) if path.startswith("/v1/stats") else None
    drawn = p.event("search", type="submit")
    assert drawn["error"] == "HTTP 504 Gateway Timeout", drawn["error"]
    assert drawn["chart"]["attrs"].get("data-stale") == "true"


@pytest.mark.parametrize("clock_ms", [HOUR_MS, -HOUR_MS], ids=["ahead", "behind"])
def test_a_skewed_browser_clock_shows_the_last_hour_at_once(
        lite: tuple[Settings, ResultStore], api_factory: Any, page: Any, clock_ms: int) -> None:
    """The browser's clock an hour off the server's: the page's first refresh already
    shows the rows of the server's last hour, in the chart and in the table."""
    settings, store = lite
    store.upsert([_row(i, minutes_ago=5) for i in range(3)])
    p = page(api_factory(settings).url, clock_ms=clock_ms)
    assert sum(_per_bucket(p.first).values()) == 3 and len(p.first["rows"]) == 3, p.first


@pytest.mark.parametrize("clock_ms", [HOUR_MS, -HOUR_MS], ids=["ahead", "behind"])
def test_a_skewed_browser_clock_does_not_freeze_an_hourly_chart(
        lite: tuple[Settings, ResultStore], api_factory: Any, page: Any, clock_ms: int) -> None:
    """A page loaded on 24 hours (a browser restores the form) with its clock an hour off:
    the hourly chart is read once a minute, not once the skew has passed."""
    settings, store = lite
    store.upsert([_row(i, minutes_ago=5) for i in range(3)])
    p = page(api_factory(settings).url, clock_ms=clock_ms, values={"range": "24h"})
    assert sum(_per_bucket(p.first).values()) == 3
    store.upsert([_row(f"n{i}", minutes_ago=0) for i in range(2)])
    assert sum(_per_bucket(p()).values()) == 3  # read again a minute later, not at once
    p.do(do="advance", ms=61_000)
    drawn = p()
    assert sum(_per_bucket(drawn).values()) == 5 and len(drawn["rows"]) == 5, drawn


def test_text_cells_take_their_direction_and_keep_the_whole_text(
        lite: tuple[Settings, ResultStore], api_factory: Any, page: Any) -> None:
    """A right-to-left text sets its own direction (``dir=auto``); a long text is clamped
    on screen and its whole text is the cell's title."""
    settings, store = lite
    long_text = "word " * 400
    store.upsert([_row("he", text="השירות היה מצוין"), _row("ar", text="الخدمة ممتازة"),
                  _row("long", text=long_text)])
    drawn = page(api_factory(settings).url).first
    for row in drawn["rows"]:
        cell = row["cells"][5]
        inner = [cell] + cell["inner"]
        assert any(c["attrs"].get("dir") == "auto" for c in inner), cell
        assert any(c["attrs"].get("title") == cell["text"] for c in inner), cell


def test_week_ticks_name_their_day(lite: tuple[Settings, ResultStore], api_factory: Any,
                                   page: Any) -> None:
    """Seven days of hourly bars: an axis of bare hours ("03:00 PM" six times) cannot be
    read, so each tick names its day as well."""
    settings, store = lite
    store.upsert([_row(i, minutes_ago=1 + i * 24 * 60) for i in range(3)])
    drawn = page(api_factory(settings).url).event("range", value="7d")
    assert drawn["error"] == "", drawn
    ticks = [t["text"] for t in drawn["texts"] if t["attrs"].get("y") == "254"]
    assert len(ticks) == 6, drawn["texts"]
    for tick in ticks:
        assert re.fullmatch(r"[A-Z][a-z]{2} \d{1,2}, \d\d:\d\d [AP]M", tick), ticks


@pytest.mark.parametrize(("search", "delay"), [
    ("", 5000), ("?refresh=20000", 20000), ("?refresh=-5", 250), ("?refresh=1", 250),
    ("?refresh=0", 250), ("?refresh=abc", 5000), ("?refresh=99999999999", 3600000)])
def test_the_refresh_interval_is_held_to_a_sane_range(
        lite: tuple[Settings, ResultStore], api_factory: Any, page: Any, search: str,
        delay: int) -> None:
    """``?refresh=`` sets the interval; a negative, zero or tiny one would poll the server
    without pause, a huge one would never refresh: it is held to 0.25 s .. 1 h."""
    settings, _store = lite
    p = page(api_factory(settings).url, search=search)
    assert p.first["delays"] == [delay]
    assert p()["delays"] == [delay]


@pytest.mark.parametrize(("rows", "axis"), [(1, ["0", "1"]), (3, ["0", "3"]),
                                            (4, ["0", "2", "4"])])
def test_the_count_axis_names_whole_counts_only(
        lite: tuple[Settings, ResultStore], api_factory: Any, page: Any, rows: int,
        axis: list[str]) -> None:
    """The count axis has lines at 0, half and the top: half of an odd top is no count,
    so that line goes unnamed (a top of 1 read "0, 1, 1")."""
    settings, store = lite
    now = dt.datetime.now(dt.timezone.utc)
    store.upsert([_row(i, now=now) for i in range(rows)])
    drawn = page(api_factory(settings).url).first
    assert _per_bucket(drawn) and sum(_per_bucket(drawn).values()) == rows
    named = [t["text"] for t in drawn["texts"] if t["attrs"].get("text-anchor") == "end"
             and t["attrs"].get("x") == "40"]
    assert named == axis, drawn["texts"]

