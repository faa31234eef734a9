"""An outage under load logs its first refusal in full, then a count, then its end.

Behind a load balancer the API answers hundreds of requests a second; while Redis or
the database was down or refused the server, each refused request logged its own line,
the same text for as long as it lasted (2,000 requests, 2,000 lines). Now each kind of
refusal and cause is logged in full the first time, its repeats counted in one line per
minute, and one line says when none came for a while and how many there were. Distinct
causes are each logged in full, at their own level: a setting to fix (a role without
SELECT) an error, an outage a warning. The faults are real: a private redis-server
stopped, a PostgreSQL role refused a privilege, a TCP proxy to PostgreSQL cut
(tests/tcpproxy.py); ``bertstream serve`` runs as a subprocess, or the app under uvicorn
in process where the test reads the log records and shortens the windows.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from api import logthrottle
from api.app import create_app
from api.logthrottle import RefusalLog
from bench.faults import RedisServer
from contract.constants import RESULTS_TABLE
from contract.settings import Settings
from tests import test_db_refusals
from tests.polling import until
from tests.served_app import served
from tests.tcpproxy import proxied_pg
from tests.test_db_refusals import WorkerRole
from worker.process import ServeProc

#: A login role of the test's own, which it can refuse SELECT (tests/test_db_refusals.py).
worker_role = test_db_refusals.worker_role

#: Requests fired while a dependency is down: a few seconds of a busy load balancer's.
BURST = 1500


def _fire(url: str, requests: Sequence[tuple[str, str, dict[str, object] | None]],
          concurrency: int = 50) -> Counter[tuple[int, str]]:
    """Send ``requests`` (method, path, JSON body) ``concurrency`` at a time: how many
    answers of each (status, error code or "ok")."""
    async def run() -> Counter[tuple[int, str]]:
        counts: Counter[tuple[int, str]] = Counter()
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async def one(method: str, path: str, body: dict[str, object] | None) -> None:
                async with gate:
                    r = await http.request(method, path, json=body)
                code = r.json().get("error", {}).get("code", "ok") if r.status_code >= 400 \
                    else "ok"
                counts[(r.status_code, code)] += 1
            await asyncio.gather(*(one(*req) for req in requests))
        return counts
    return asyncio.run(run())


def _mixed(n: int, tag: str) -> list[tuple[str, str, dict[str, object] | None]]:
    """``n`` requests as a web app sends them: submits with and without a caller id, and
    status reads."""
    out: list[tuple[str, str, dict[str, object] | None]] = []
    for i in range(n):
        if i % 3 == 0:
            out.append(("POST", "/v1/tasks", {"text": f"the room {tag} {i}", "id": f"{tag}-{i}"}))
        elif i % 3 == 1:
            out.append(("POST", "/v1/tasks", {"text": f"the room {tag} {i}"}))
        else:
            out.append(("GET", f"/v1/tasks/{tag}-{i - 2}", None))
    return out


def _serve_log(api: ServeProc) -> str:
    """The whole output of ``bertstream serve`` so far (``ServeProc.log`` gives its tail),
    bertstream's lines without their time, level and logger (tests/test_serve_logging.py)."""
    api.log()  # flushes
    return re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ", "",
                  api.log_path.read_text(errors="replace"), flags=re.M)


_ENDED = r"none for \d+ s; (\d+) in all over \d+ s \((\d+) since the last line\)"


@pytest.fixture
def api_on_private_redis(redis_server: RedisServer, tmp_path: Path
                         ) -> Iterator[tuple[ServeProc, RedisServer]]:
    """``bertstream serve`` on a redis-server of the test's own and a SQLite file."""
    settings = Settings(broker_url=redis_server.url,
                        database_url=f"sqlite:///{tmp_path / 'results.db'}",
                        queue=f"bst-flood-{uuid.uuid4().hex[:8]}")
    api = ServeProc(settings, tmp_path / "serve.log").wait_ready()
    try:
        yield api, redis_server
    finally:
        api.stop()


def test_a_redis_outage_under_load_is_one_line_then_its_end(
        api_on_private_redis: tuple[ServeProc, RedisServer]) -> None:
    """Redis stopped under a burst of submits and reads: every one answered 503
    ``broker_unavailable``, one line with its cause in the server's log (not one per
    request); Redis back, the submits accepted again, and one line saying the refusals
    ended and how many there were."""
    api, server = api_on_private_redis
    server.stop()
    counts = _fire(api.url, _mixed(BURST, "down"))
    assert counts == {(503, "broker_unavailable"): BURST}, counts
    during = _serve_log(api)
    lines = re.findall(r"^answering 5\d\d\b.*$", during, re.M)
    assert len(lines) == 1, f"{len(lines)} lines for {BURST} refusals:\n" + "\n".join(lines[:5])
    assert lines[0].startswith("answering 503 broker_unavailable: cannot reach Redis at "), lines
    assert "Connection refused" in lines[0], lines
    server.start()
    back = _fire(api.url, _mixed(30, "up"))  # a read may come before its submit: a 404
    assert back[(202, "ok")] == 20 and all(status < 500 for status, _ in back), back
    ended = until(lambda: re.search(rf"^answering 503 broker_unavailable: {_ENDED}$",
                                    _serve_log(api), re.M),
                  timeout=logthrottle.QUIET_S + 10, what="the line of the refusals' end")
    assert int(ended.group(1)) == BURST, ended.group(0)
    assert len(re.findall(r"^answering 5\d\d ", _serve_log(api), re.M)) == 2
    # down again, and the server stopped before the end of its refusals: its count said
    server.stop()
    assert _fire(api.url, _mixed(100, "again")) == {(503, "broker_unavailable"): 100}
    api.stop()
    again = re.findall(r"^answering 5\d\d .*$", _serve_log(api), re.M)[2:]
    assert len(again) == 2 and again[0] == (
        "answering 503 broker_unavailable: cannot reach Redis at "
        f"{server.url}: start it with `redis-server` or set BERTSTREAM_BROKER_URL "
        f"(Error 111 connecting to 127.0.0.1:{server.port}. Connection refused.)"), again
    assert re.fullmatch(r"answering 503 broker_unavailable: 99 more like it since the last "
                        r"line, up to the server's stop; 100 in all over \d+ s",
                        again[1]), again  # over 0 s, or more on a loaded machine


def test_a_database_cut_under_mixed_traffic_is_one_line_and_long_polls_too(
        pg_url: str, redis_url: str, tmp_path: Path) -> None:
    """The database cut (a proxy in front of PostgreSQL) while long polls wait and submits
    come in: those with a caller id answered 503 ``database_unavailable``, the others
    accepted all along. One line for the refusals and one for the long polls' failed
    reads (polled every 100 ms), not one each; the 202s in between start no new round of
    lines."""
    proxy, proxied = proxied_pg(pg_url)
    settings = Settings(broker_url=redis_url, database_url=proxied,
                        queue=f"bst-flood-{uuid.uuid4().hex[:8]}", db_connect_timeout_s=2)
    from contract.results import ResultStore

    store = ResultStore.from_url(pg_url)
    store.create_schema()
    store.close()
    api = ServeProc(settings, tmp_path / "serve.log").wait_ready()
    try:
        with httpx.Client(base_url=api.url, timeout=30) as http:
            for i in range(3):
                assert http.post("/v1/tasks", json={"text": "the bed", "id": f"w{i}"}
                                 ).status_code == 202
        waits = [("GET", f"/v1/tasks/w{i}?wait=6", None) for i in range(3)]

        async def cut_while_waiting() -> Counter[tuple[int, str]]:
            polls = asyncio.create_task(asyncio.to_thread(_fire, api.url, waits))
            await asyncio.sleep(1)
            proxy.down()
            burst = await asyncio.to_thread(_fire, api.url, _mixed(BURST, "cut"))
            await polls
            return burst

        counts = asyncio.run(cut_while_waiting())
        third = BURST // 3
        # generated ids need no database; caller ids and status reads do
        assert counts == {(503, "database_unavailable"): BURST - third, (202, "ok"): third}, \
            counts
        log = _serve_log(api)
        refused = re.findall(r"^answering 5\d\d\b.*$", log, re.M)
        assert len(refused) == 1, f"{len(refused)} lines:\n" + "\n".join(refused[:5])
        assert "Connection refused" in refused[0] or "connection" in refused[0], refused
        polls = re.findall(r"^long poll: .*$", log, re.M)
        assert len(polls) == 1, f"{len(polls)} long poll lines:\n" + "\n".join(polls[:5])
        proxy.up()
        ended = until(lambda: re.search(rf"^answering 503 database_unavailable: {_ENDED}$",
                                        _serve_log(api), re.M),
                      timeout=logthrottle.QUIET_S + 10, what="the line of the refusals' end")
        assert int(ended.group(1)) == BURST - third, ended.group(0)
    finally:
        api.stop()
        proxy.down()


def _records(caplog: pytest.LogCaptureFixture, what: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(what + ":")]


def test_distinct_causes_are_each_logged_in_full_at_their_level_then_counted(
        worker_role: WorkerRole, redis_server: RedisServer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A role refused SELECT (a setting to fix: ERROR) and then Redis stopped (an outage:
    WARNING) under steady traffic: each logged in full at once, the second not hidden
    behind the first; each kind's count once per window (shortened here), at its own
    level; and each one's end once the GRANT and Redis are back, with its total."""
    monkeypatch.setattr(logthrottle, "EVERY_S", 2.0)
    monkeypatch.setattr(logthrottle, "QUIET_S", 2.0)
    monkeypatch.setattr(logthrottle, "TICK_S", 0.2)
    caplog.set_level(logging.WARNING, logger="api")
    settings = Settings(broker_url=redis_server.url, database_url=worker_role.url,
                        queue=f"bst-flood-{uuid.uuid4().hex[:8]}",
                        cache_dir=str(tmp_path / "cache"))
    misconfigured, unavailable = ("answering 503 database_misconfigured",
                                  "answering 503 broker_unavailable")
    reads = [("GET", "/v1/results?limit=5", None)] * 50
    submits: list[tuple[str, str, dict[str, object] | None]] = [
        ("POST", "/v1/tasks", {"text": f"the view {i}"}) for i in range(50)]
    answered: Counter[tuple[int, str]] = Counter()
    with served(create_app(settings)) as url:
        worker_role.sql(f"REVOKE SELECT ON {RESULTS_TABLE} FROM {worker_role.name}")
        answered += _fire(url, reads)
        first = [r for r in caplog.records if r.getMessage().startswith("answering 5")]
        assert len(first) == 1, f"{len(first)} lines for {len(reads)} refusals"
        assert first[0].getMessage().startswith(misconfigured + ": ")
        assert first[0].levelno == logging.ERROR
        assert re.search(f"GRANT SELECT.* ON {RESULTS_TABLE} TO {worker_role.name}",
                         first[0].getMessage()), first[0].getMessage()
        redis_server.stop()
        deadline = time.monotonic() + 5  # two windows and more of both refusals
        while time.monotonic() < deadline:
            answered += _fire(url, reads + submits)
        assert answered == {(503, "database_misconfigured"): answered[
            (503, "database_misconfigured")], (503, "broker_unavailable"): answered[
            (503, "broker_unavailable")]}, answered
        outage = _records(caplog, unavailable)
        assert outage[0].levelno == logging.WARNING, outage[0].getMessage()
        assert "cannot reach Redis" in outage[0].getMessage()
        worker_role.sql(f"GRANT SELECT ON {RESULTS_TABLE} TO {worker_role.name}")
        redis_server.start()
        assert _fire(url, reads[:5] + submits[:5]) == {(200, "ok"): 5, (202, "ok"): 5}
        for what in (misconfigured, unavailable):
            until(lambda w=what: any(re.fullmatch(f"{w}: {_ENDED}", r.getMessage())
                                     for r in caplog.records), timeout=10, what=what)
    for what, level, code in ((misconfigured, logging.ERROR, "database_misconfigured"),
                              (unavailable, logging.WARNING, "broker_unavailable")):
        records = _records(caplog, what)
        messages = [r.getMessage() for r in records]
        counted = [re.match(rf"{what}: (\d+) more like it in the last \d+ s; the latest: ",
                            m) for m in messages]
        summaries = [int(m.group(1)) for m in counted if m]
        assert summaries, messages
        assert all(r.levelno == level for r, m in zip(records, counted, strict=True) if m)
        ended = re.fullmatch(f"{what}: {_ENDED}", messages[-1])
        assert ended and records[-1].levelno == logging.WARNING, messages[-1]
        total = answered[(503, code)]
        assert int(ended.group(1)) == total, (messages[-1], total)
        # the first in full, a count per window, the end: a handful of lines in all
        assert len(records) == 1 + len(summaries) + 1, messages
        assert len(records) <= 6, messages
        assert 1 + sum(summaries) + int(ended.group(2)) == total, (messages, total)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def throttled(caplog: pytest.LogCaptureFixture) -> tuple[RefusalLog, _Clock,
                                                          Callable[[], list[str]]]:
    """A :class:`RefusalLog` on a clock the test moves (no ticker), and its lines."""
    clock = _Clock()
    logger = logging.getLogger("tests.log_flood")
    caplog.set_level(logging.INFO, logger="tests.log_flood")
    return (RefusalLog(logger, every_s=60, quiet_s=10, clock=clock, ticker=False), clock,
            lambda: [r.getMessage() for r in caplog.records if r.name == "tests.log_flood"])


def test_the_rules_of_the_lines_on_a_clock_the_test_moves(
        throttled: tuple[RefusalLog, _Clock, Callable[[], list[str]]]) -> None:
    """The first in full; repeats counted, one line per window; another cause of the same
    kind in full at once; the end after a quiet spell, and the next refusal in full again;
    a lone refusal has no end line."""
    refusals, clock, lines = throttled
    what = "answering 503 database_unavailable"
    for i in range(650):  # ten a second for 65 s
        clock.now = 1000 + i / 10
        refusals.note(what, "refused", logging.WARNING, f"{what}: %s", "connection refused")
    assert lines() == [f"{what}: connection refused",
                       f"{what}: 600 more like it in the last 60 s; the latest: {what}: "
                       "connection refused"]
    clock.now = 1065
    refusals.note(what, "timeout", logging.WARNING, f"{what}: %s", "statement timeout")
    assert lines()[-1] == f"{what}: statement timeout"
    clock.now = 1070
    refusals.tick()
    assert len(lines()) == 3 and refusals.followed == 2
    clock.now = 1075.1
    refusals.tick()  # both over: the timeout's a lone refusal, said in full already
    assert lines()[3:] == [f"{what}: none for 10 s; 650 in all over 65 s "
                           "(49 since the last line)"]
    assert refusals.followed == 0
    refusals.note(what, "refused", logging.WARNING, f"{what}: %s", "connection refused again")
    assert lines()[-1] == f"{what}: connection refused again"
    refusals.note(what, "refused", logging.WARNING, f"{what}: %s", "connection refused again")
    refusals.close()  # the server stops: what was not logged yet is said
    assert lines()[-1] == (f"{what}: 1 more like it since the last line, up to the server's "
                           "stop; 2 in all over 0 s")
    assert refusals.followed == 0


class _Records(logging.Handler):
    """The records of the loggers it is added to."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_bug_hit_by_every_request_is_one_traceback_not_one_per_request(
        redis_url: str, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug every request of a route meets (here a function of the route made to raise):
    each answered the JSON 500, its traceback logged once and its repeats counted. The
    error went on past the 500 to uvicorn, which logged "Exception in ASGI application"
    with the whole traceback again for every request, whatever the API's log summed."""
    import api.app
    from contract.results import ResultStore

    def bug(*_a: object, **_kw: object) -> object:
        raise RuntimeError("a bug in the stats")

    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    store.close()
    monkeypatch.setattr(api.app, "top_stats", bug)
    settings = Settings(broker_url=redis_url, database_url=sqlite_url,
                        queue=f"bst-flood-{uuid.uuid4().hex[:8]}")
    seen = _Records()
    with served(create_app(settings), log_level="info") as url:
        # after uvicorn's own logging configuration, which resets its loggers' handlers
        for name in ("uvicorn.error", "api"):
            logging.getLogger(name).addHandler(seen)
        try:
            answers = Counter(httpx.get(url + "/v1/stats", timeout=30).status_code
                              for _ in range(100))
            assert answers == {500: 100}, answers
            tracebacks = [r for r in seen.records if r.exc_info]
            assert len(tracebacks) == 1, (f"{len(tracebacks)} tracebacks: " + ", ".join(
                sorted({f"{r.name}: {r.getMessage()[:40]!r}" for r in tracebacks})))
            assert tracebacks[0].getMessage() == "unhandled error in the API"
            assert tracebacks[0].levelno == logging.ERROR
            # a load balancer's kept-alive connection: uvicorn closed it after each
            # error that reached it, and the next request on it was reset
            with httpx.Client(base_url=url, timeout=30) as http:
                kept = Counter(http.get("/v1/stats").status_code for _ in range(20))
            assert kept == {500: 20}, kept
        finally:
            for name in ("uvicorn.error", "api"):
                logging.getLogger(name).removeHandler(seen)
