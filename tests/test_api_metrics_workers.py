"""``serve --workers N``: ``/metrics`` sums the counters and histograms of every process.

Each process kept its own registry and a scrape answered from whichever process took
it, so a counter read over successive scrapes went backwards (Prometheus saw resets)
and never held the total. The processes now share their counts through
prometheus_client's multiprocess mode, in a directory made (and removed) by ``serve``
or named by ``PROMETHEUS_MULTIPROC_DIR``, emptied at start. The gauges read from Redis
at scrape time are reported once, not once per process. Over a real ``bertstream serve``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from contract.settings import Settings
from worker.process import ServeProc

#: Rounds of requests to the counted route, :data:`BURST` at once on connections of their
#: own (so that every process takes some), each round followed by a scrape.
ROUNDS = 20
BURST = 3
ROUTE = "/readyz"


def scrape(api: ServeProc) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """The samples of one ``/metrics`` answer by family, on a connection of its own."""
    response = httpx.get(api.url + "/metrics", headers={"Connection": "close"}, timeout=10)
    assert response.status_code == 200
    return {family.name: [(s.name, s.labels, s.value) for s in family.samples]
            for family in text_string_to_metric_families(response.text)}


def counted(samples: dict[str, list[tuple[str, dict[str, str], float]]], family: str,
            sample: str) -> float:
    """The sum over statuses of ``sample`` of ``family`` for :data:`ROUTE`."""
    return sum(value for name, labels, value in samples.get(family, [])
               if name == sample and labels.get("route") == ROUTE)


def ask(api: ServeProc) -> None:
    """One request to :data:`ROUTE` on a connection of its own."""
    response = httpx.get(api.url + ROUTE, headers={"Connection": "close"}, timeout=10)
    assert response.status_code == 503, response.text  # no worker: not ready


def check_sums(api: ServeProc, served: Callable[[], bool] = lambda: True) -> None:
    """Rounds of requests and a scrape after each, at least :data:`ROUNDS` and until
    ``served()`` (every process took some): the request counter never goes back, never
    runs ahead of the requests made, and ends at their number; the histogram's count
    too; the gauges read from Redis come once."""
    readings: list[float] = []
    made = 0
    with ThreadPoolExecutor(BURST) as pool:
        while len(readings) < ROUNDS or not served():
            assert len(readings) < 10 * ROUNDS, "one process took every connection"
            list(pool.map(lambda _: ask(api), range(BURST)))
            made += BURST
            value = counted(scrape(api), "bertstream_api_requests",
                            "bertstream_api_requests_total")
            readings.append(value)
            # a request is counted just after its answer is sent: the scrape may come first
            assert made - BURST <= value <= made, readings
    assert readings == sorted(readings), readings
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(api)
        total = counted(samples, "bertstream_api_requests", "bertstream_api_requests_total")
        timed = counted(samples, "bertstream_api_request_seconds",
                        "bertstream_api_request_seconds_count")
        if (total, timed) == (made, made) or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # a poll interval for the last requests' counts
    assert (total, timed) == (made, made), readings
    for gauge in ("bertstream_redis_up", "bertstream_workers_alive"):
        assert len(samples[gauge]) == 1, samples[gauge]
    assert samples["bertstream_redis_up"][0][2] == 1
    assert samples["bertstream_workers_alive"][0][2] == 0


def both_served(api: ServeProc) -> Callable[[], bool]:
    """True once both server processes counted requests (a file of counters each in
    the directory ``serve`` names; without one, at once)."""
    found = re.search(r"kept in (\S+)", api.log())
    return lambda: not found or len(list(Path(found.group(1)).glob("counter_*.db"))) == 2


def shared_dir(api: ServeProc) -> Path:
    """The directory ``serve`` says the processes keep their counts in."""
    found = re.search(r"kept in (\S+)", api.log())
    assert found, api.log()
    return Path(found.group(1))


def test_metrics_sum_over_worker_processes(
        redis_url: str, sqlite_url: str, api_factory: Callable[..., ServeProc],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    api = api_factory(Settings(broker_url=redis_url, database_url=sqlite_url), "--workers", "2")
    check_sums(api, both_served(api))
    where = shared_dir(api)
    assert api.stop() == 0
    assert not where.exists()  # made by serve, removed by it


def test_metrics_dir_named_by_operator_is_emptied_at_start(
        redis_url: str, sqlite_url: str, api_factory: Callable[..., ServeProc],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    where = tmp_path / "prometheus"
    where.mkdir()
    # a previous run's counts, which would be summed in
    stale = MmapedDict(str(where / "counter_999999.db"))
    stale.write_value(mmap_key("bertstream_api_requests", "bertstream_api_requests_total",
                               ["route", "status"], [ROUTE, "200"],
                               "HTTP requests by route and status code"), 1000.0, 0.0)
    stale.close()
    (where / "notes.txt").write_text("not prometheus_client's")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(where))
    api = api_factory(Settings(broker_url=redis_url, database_url=sqlite_url), "--workers", "2")
    assert shared_dir(api) == where
    assert not (where / "counter_999999.db").exists()
    check_sums(api, both_served(api))
    assert api.stop() == 0
    assert (where / "notes.txt").read_text() == "not prometheus_client's"  # the operator's


def test_one_process_needs_no_directory(
        redis_url: str, sqlite_url: str, api_factory: Callable[..., ServeProc],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    api = api_factory(Settings(broker_url=redis_url, database_url=sqlite_url))
    check_sums(api)
    assert "kept in" not in api.log()


def test_the_directory_set_too_late_is_refused(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """prometheus_client picks where counts live when it is imported: set later (this
    process imported it long ago), the counts would stay in this process unshared, so
    ``ApiMetrics`` refuses to start (the guard reads an undocumented attribute)."""
    from api.metrics import MULTIPROC_ENV, ApiMetrics, multiprocess_dir

    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path / "late"))
    with pytest.raises(RuntimeError, match="after prometheus_client was imported"):
        ApiMetrics()
    monkeypatch.delenv(MULTIPROC_ENV)
    with multiprocess_dir(2) as shared:  # the variable lasts as long as the block
        assert shared is not None and shared.is_dir()
        assert os.environ[MULTIPROC_ENV] == str(shared)
    assert MULTIPROC_ENV not in os.environ and not shared.exists()
    ApiMetrics()  # in-process registry again
